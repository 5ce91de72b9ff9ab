"""The real experiments (experiments/cifar10.yaml, lsun.yaml) end to end, in their real formats.

``realscale_fixture`` writes random-weight stand-ins with the real architectures and on-disk
formats (the Hub's google/ddpm-cifar10-32 config in a Hugging Face cache entry, a reduced
google/ddpm-ema-church-256, clean-fid's Inception TorchScript interface, open_clip ViT-B-32
weights, CIFAR-10's python pickles, an LSUN LMDB). The sweeps run through the real CLI in a
subprocess, the experiment files unchanged except for ``--set`` overrides that shrink the budget
(steps, samples, trials, search space) and point the paths at the stand-ins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from realscale_fixture import CIFAR10_UNET_CONFIG, RealScale, realscale  # noqa: F401 (fixture)

from mmdsweep import tune

ROOT = Path(__file__).resolve().parents[1]


def _flow(obj: Any) -> str:
    """A ``--set`` value in YAML flow style (parse_override reads the value as YAML)."""
    return yaml.safe_dump(obj, default_flow_style=True, width=10_000, sort_keys=False).strip()


def common_overrides(rs: RealScale, out: Path) -> list[str]:
    """Budget and paths shared by both experiments: 2 trials x 2 steps, 1 CPU worker, local Ray."""
    sets = {
        "data.num_workers": 0,
        "features.inception_path": str(rs.inception),
        "features.clip_pretrained": str(rs.clip),
        "pretrain.cache_dir": str(rs.cache),
        "finetune.steps": 2,
        "finetune.batch_size": 2,
        "finetune.eval_every": 2,
        "finetune.device": "cpu",
        "finetune.threads": 2,
        "eval.num_samples": 2,
        "eval.batch_size": 2,
        "eval.kid_subsets": 2,
        "eval.kid_subset_size": 2,
        "eval.final_seeds": [1, 2, 3],
        "eval.speed_timesteps": [1],
        "eval.num_reference": None,  # the experiments' 50,000 is refused up front for a few dozen images
        "eval.baselines": False,
        "search.num_samples": 2,
        "search.grace_period": 1,
        "search.max_concurrent_trials": 1,
        "search.storage": f"sqlite:///{out / 'optuna.db'}",
        "resources.num_workers": 1,
        "resources.use_gpu": False,
        "resources.gpus_per_worker": 0,
        "resources.cpus_per_worker": 1.5,
        "resources.trial_cpus": 0.5,
        "resources.address": "local",
        "resources.num_cpus": 2,
        "resources.object_store_memory": 200 * 1024 * 1024,
        "output.dir": str(out),
        "output.storage": None,
    }
    args: list[str] = []
    for key, value in sets.items():
        args += ["--set", f"{key}={_flow(value)}"]
    return args


def run_cli(module: str, args: list[str], rs: RealScale, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(rs.env())
    env.update({"PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "2"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


def _trial_errors(sdir: Path) -> str:
    """Tune's error files of the sweep's trials (the whole tracebacks), for a failure message."""
    texts = [f"--- {p.relative_to(sdir)}\n{p.read_text()[-3000:]}" for p in sorted(sdir.rglob("error.txt"))]
    return "\n".join(texts) or "(no error.txt under the sweep)"


def check_sweep(sdir: Path, printed: str, *, resolution: int, num_trials: int) -> None:
    """The sweep's Parquet files, its exports (loaded with plain diffusers) and the report."""
    trials = pd.read_parquet(sdir / "trials.parquet")
    metrics = pd.read_parquet(sdir / "metrics.parquet")
    assert len(trials) == num_trials and trials["trial_id"].is_unique, trials
    assert set(trials["status"]) <= {"completed", "early-stopped"}, (
        f"{trials[['trial_id', 'status', 'error']].to_string()}\n{_trial_errors(sdir)}"
    )
    assert trials["best_fid"].notna().all(), trials
    assert set(metrics["trial_id"]) == set(trials["trial_id"])
    assert (metrics["step"] == 2).sum() >= 1 and metrics["fid"].notna().all()
    assert "Leaderboard" in printed and "Pareto front" in printed
    meta = json.loads((sdir / "sweep.json").read_text())
    assert meta["exports"], meta
    from diffusers import DDIMPipeline

    for T, rel in meta["exports"].items():
        d = sdir / rel
        info = json.loads((d / "mmdsweep.json").read_text())
        assert info["num_inference_steps"] == int(T)
        pipe = DDIMPipeline.from_pretrained(d)
        assert pipe.unet.config.sample_size == resolution
        images = pipe(batch_size=1, num_inference_steps=int(T), eta=0.0, output_type="np").images
        assert images.shape == (1, resolution, resolution, 3)
        assert images.min() >= 0.0 and images.max() <= 1.0
    speed = pd.read_parquet(sdir / "speed.parquet")
    assert {"base"} <= set(speed["model"])


def run_report(sdir: Path, rs: RealScale) -> Path:
    res = run_cli("mmdsweep.report", [str(sdir), "--num-samples", "4", "--device", "cpu"], rs, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    html = sorted(sdir.rglob("*.html"))
    assert html, res.stdout
    assert "<html" in html[0].read_text()[:2000].lower()
    return html[0]


CIFAR_SPACE = {
    "finetune.lr": {"loguniform": [1.0e-6, 5.0e-5]},
    "sampler.timesteps": {"choice": [1, 2]},
    "features.train": {"choice": ["inception", "clip"]},
    "kernel.type": {"choice": ["polynomial", "rbf"]},
    "kernel.bandwidth": {"loguniform": [0.25, 4.0], "when": {"kernel.type": "rbf"}},
}

LSUN_SPACE = {
    "finetune.lr": {"loguniform": [5.0e-7, 1.0e-5]},
    "sampler.timesteps": {"choice": [1, 2]},
    "features.train": {"choice": ["inception", "clip"]},
    "kernel.type": {"choice": ["polynomial", "rbf", "rbf_mixture"]},
    "kernel.bandwidth": {"loguniform": [0.25, 4.0], "when": {"kernel.type": "rbf"}},
}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~8 min on an idle 2-core machine (35.7M-parameter UNet on the CPU)
def test_cifar10_sweep_end_to_end(realscale: RealScale, tmp_path: Path) -> None:  # noqa: F811
    """The Hub's exact google/ddpm-cifar10-32 (found through HF_HUB_CACHE by its repo id)."""
    rs = realscale
    out = tmp_path / "cifar10"
    args = [str(ROOT / "experiments" / "cifar10.yaml"), "--quiet", *common_overrides(rs, out)]
    args += ["--set", f"data.root={rs.cifar10}", "--set", f"search.space={_flow(CIFAR_SPACE)}"]
    t0 = time.time()
    res = run_cli("mmdsweep.tune", args, rs, timeout=1500)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    sdir = out / "sweep"
    check_sweep(sdir, res.stdout, resolution=32, num_trials=2)
    run_report(sdir, rs)
    print(f"cifar10 sweep + report: {time.time() - t0:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_lsun_sweep_end_to_end(realscale: RealScale, tmp_path: Path) -> None:  # noqa: F811
    """google/ddpm-ema-church-256's architecture at a reduced resolution, LSUN's LMDB format."""
    rs = realscale
    out = tmp_path / "lsun"
    args = [str(ROOT / "experiments" / "lsun.yaml"), "--quiet", *common_overrides(rs, out)]
    args += [
        "--set", f"data.root={rs.lsun}",
        "--set", f"data.resolution={rs.church_sample_size}",
        "--set", "finetune.real_batch_size=null",
        "--set", "output.checkpoints_to_keep=null",
        "--set", f"search.space={_flow(LSUN_SPACE)}",
    ]  # fmt: skip
    t0 = time.time()
    res = run_cli("mmdsweep.tune", args, rs, timeout=1500)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    sdir = out / "sweep"
    check_sweep(sdir, res.stdout, resolution=rs.church_sample_size, num_trials=2)
    run_report(sdir, rs)
    print(f"lsun sweep + report: {time.time() - t0:.0f} s")


# ----------------------------------------------------------------------------- cheap checks


def test_asha_grace_period_beyond_the_evaluations_fails_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """cifar10.yaml has grace_period 2; with steps=2, eval_every=2 a trial reports once."""
    rc = tune.main(
        [
            str(ROOT / "experiments" / "cifar10.yaml"),
            "--dry-run",
            "--set", "finetune.steps=2",
            "--set", "finetune.eval_every=2",
            "--set", f"output.dir={tmp_path}",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "search.grace_period: must be <= the number of evaluations per trial" in err
    assert err.count("\n") == 1


def test_sweep_json_names_the_cached_snapshot_of_a_hub_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.path may be a repository id in the HF cache; sweep.json must name a loadable directory."""
    from realscale_fixture import CIFAR10_SCHEDULER_CONFIG, write_hub_model

    from mmdsweep.assets.models import load_denoiser
    from mmdsweep.config import load_experiment

    tiny = {**CIFAR10_UNET_CONFIG, "block_out_channels": [32, 32, 32, 32], "sample_size": 8}
    snapshot = write_hub_model(tmp_path / "hub", "google/ddpm-cifar10-32", tiny, CIFAR10_SCHEDULER_CONFIG)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    exp = load_experiment(ROOT / "experiments" / "cifar10.yaml")
    base = tune._base_model_dir(exp, "google/ddpm-cifar10-32")
    assert Path(base) == snapshot.resolve()
    assert load_denoiser(base).resolution == 8
