"""Shared fixtures: a tiny embedded-default experiment whose DDPM/classifier are pretrained once."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def test_threads() -> int:
    """``MMDSWEEP_TEST_THREADS`` (0 when unset): the torch thread count to run the tests with.

    ``scripts/test.sh`` runs the tests marked ``threads`` (numerics that could depend on the
    number of threads) again with 1 and with 2 threads, so a property that holds with one count
    only is caught on any machine.
    """
    return int(os.environ.get("MMDSWEEP_TEST_THREADS") or 0)


test_threads.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    if test_threads():
        import torch

        torch.set_num_threads(test_threads())


def tiny_config(root: Path) -> dict:
    """A digits experiment small enough to pretrain and fine-tune in seconds on 2 cores."""
    return {
        "name": "tiny",
        "seed": 0,
        "data": {"dataset": "digits", "resolution": 8},
        "pretrain": {
            "steps": 80,
            "batch_size": 32,
            "lr": 0.002,
            "lr_warmup": 10,
            "block_out_channels": [16, 32],
            "classifier_steps": 80,
            "cache_dir": str(root / "cache"),
        },
        "sampler": {"name": "ddim", "timesteps": 3},
        "features": {"train": "classifier", "eval": "classifier"},
        "kernel": {"type": "polynomial"},
        "finetune": {
            "steps": 4,
            "batch_size": 8,
            "lr": 1.0e-4,
            "eval_every": 2,
            "threads": test_threads() or 1,
        },
        "eval": {"num_samples": 48, "batch_size": 48, "kid_subsets": 2, "kid_subset_size": 24},
        "search": {
            "num_samples": 3,
            "scheduler": "fifo",
            "space": {
                "finetune.lr": {"loguniform": [1.0e-5, 1.0e-3]},
                "sampler.timesteps": {"choice": [2, 3]},
            },
        },
        "resources": {"num_workers": 1, "cpus_per_worker": 0.5, "trial_cpus": 0.25},
        "output": {"dir": str(root / "results"), "name": "sweep"},
    }


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding ``tiny.yaml`` with the pretrained model already in its cache."""
    from mmdsweep.config import load_experiment
    from mmdsweep.train.pretrain import run_pretrain

    root = tmp_path_factory.mktemp("tiny")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(root)))
    run_pretrain(load_experiment(path), show_progress=False)
    return root


@pytest.fixture()
def tiny_yaml(tiny_root: Path, tmp_path: Path) -> Path:
    """A per-test copy of the tiny experiment (own output dir, shared pretrain cache)."""
    cfg = tiny_config(tiny_root)
    cfg["output"]["dir"] = str(tmp_path / "results")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


SWEEP_SPACE = {
    # 1e30 makes the first Adam step blow the weights up: that trial must be recorded as diverged
    "finetune.lr": {"choice": [1.0e-4, 3.0e-4, 1.0e30]},
    "sampler.timesteps": {"choice": [2, 3]},
}


def sweep_yaml(tiny_root: Path, out: Path, **search: object) -> Path:
    """A tiny sweep experiment writing under ``out`` (ASHA-friendly: a report every step)."""
    cfg = tiny_config(tiny_root)
    cfg["output"]["dir"] = str(out / "results")
    cfg["finetune"].update({"steps": 4, "eval_every": 1, "grad_clip": None})
    cfg["search"].update(search)
    cfg["resources"]["num_cpus"] = 2
    cfg["resources"]["object_store_memory"] = 200 * 1024 * 1024
    p = out / "sweep.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def run_tune_cli(
    args: list[str], *, quiet: bool = True, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``python -m mmdsweep.tune ARGS [--quiet]`` in its own process group (so a test can kill it whole);
    ``env``: extra environment variables."""
    import sys

    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "mmdsweep.tune", *args, *(["--quiet"] if quiet else [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


class SweepRun(tuple):  # type: ignore[type-arg]
    """``(results dir, printed output)`` of the shared sweep, with what the live readers saw while it ran:
    ``counts`` (reader name -> distinct reports seen, read after read) and ``failures`` (failed reads)."""

    counts: dict[str, list[int]]
    failures: list[str]


@pytest.fixture(scope="session")
def tiny_sweep(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> SweepRun:
    """One real sweep (Optuna + ASHA + Ray Train, 4 trials, one diverging), shared by several tests.

    Returns the sweep's results directory and what the CLI printed. While it runs, every reader of
    ``live_reading.readers`` reads its results in a loop (tests/test_live_readers.py checks them);
    the results are flushed every 0.5 s so that the readers see the tables grow.
    """
    import threading

    from live_reading import read_while

    out = tmp_path_factory.mktemp("sweep")
    p = sweep_yaml(
        tiny_root,
        out,
        num_samples=4,
        scheduler="asha",
        grace_period=1,
        reduction_factor=2,
        seed=3,
        space=SWEEP_SPACE,
    )
    sdir = out / "results" / "sweep"
    # with Tune's progress table; parts flushed while trials run, not only at their end
    proc = run_tune_cli([str(p)], quiet=False, env={"MMDSWEEP_RESULTS_FLUSH_SECONDS": "0.5"})
    lines: list[str] = []
    drain = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    drain.start()  # a full pipe would block the sweep
    counts, failures = read_while(sdir, lambda: proc.poll() is None, pause=0.2)
    drain.join(timeout=60)
    printed = "".join(lines)
    assert proc.wait(timeout=60) == 0, printed[-4000:]
    run = SweepRun((sdir, printed))
    run.counts, run.failures = counts, failures
    return run


@pytest.fixture(scope="module")
def one_thread(request: pytest.FixtureRequest) -> None:
    """One intra-op torch thread (or ``MMDSWEEP_TEST_THREADS``) for a whole test module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Tiny models on a busy 2-core machine are much faster, and stable, without OpenMP spinning.
    The previous thread count is restored when the module is done.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(test_threads() or 1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
