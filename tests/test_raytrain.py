"""End-to-end tests of the Ray Tune + Ray Train (V2) plumbing with a toy per-worker loop.

The toy loop follows the per-worker contract of mmdsweep.sweep.raytrain: it gets its
reporter from the config, resumes from ``latest_checkpoint_dir()``, all-reduces
its metrics and reports (with a checkpoint) on every rank each step.

Ray sessions are shared between tests that fit a 2-CPU local Ray; the driver-kill test (which runs
Ray in subprocesses) shuts it down first. Workers spread over two nodes: tests/test_tune.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import ray
import torch

from mmdsweep.sweep import raytrain as rt
from mmdsweep.sweep.search import validate_space
from mmdsweep.train.distributed import all_reduce_metrics, average_gradients, broadcast_object
from mmdsweep.train.reporting import LocalReporter

REPO = Path(__file__).resolve().parents[1]
OBJECT_STORE = 150 * 1024 * 1024
SPACE: dict[str, Any] = {
    "finetune.lr": {"loguniform": [1e-3, 1e-1]},
    "kernel.type": {"choice": ["polynomial", "rbf"]},
    "kernel.bandwidth": {"loguniform": [0.1, 10.0], "when": {"kernel.type": "rbf"}},
}


# --------------------------------------------------------------------------- toy loop


def _append_event(opts: dict[str, Any], record: dict[str, Any]) -> None:
    if opts.get("event_dir"):
        with open(Path(opts["event_dir"]) / "events.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def _trial_level(opts: dict[str, Any], trial_id: str, rank: int) -> int:
    """Order in which trials first started (0, 1, ...), stable across restarts."""
    level = 0
    if opts.get("order_dir") and rank == 0:
        order_dir = Path(opts["order_dir"])
        mine = order_dir / trial_id
        if not mine.exists():
            mine.write_text(str(len(list(order_dir.iterdir()))))
        level = int(mine.read_text())
    return int(broadcast_object(level))


def _maybe_die(opts: dict[str, Any], rank: int, world: int, step: int) -> None:
    """Kill this worker process once (guarded by a marker file) on the last rank."""
    marker = opts.get("kill_marker")
    if marker and rank == world - 1 and step == opts["kill_at"] and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        time.sleep(1.0)  # let the controller register the report just made
        os.kill(os.getpid(), signal.SIGKILL)


def toy_loop(config: dict[str, Any]) -> None:
    """Per-worker loop: tiny linear regression, one report + checkpoint per step."""
    opts = config["toy"]
    rep = rt.get_reporter(config)
    rank, world = rep.rank, rep.world_size
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1).to(rep.device)
    opt = torch.optim.SGD(model.parameters(), lr=config["params"].get("finetune.lr", 0.05))
    start, last = 0, None
    with rep.latest_checkpoint_dir() as ckpt:
        if ckpt is not None:
            state = torch.load(ckpt / "state.pt")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start, last = state["step"] + 1, state["metrics"]
    level = _trial_level(opts, config["trial_id"], rank)
    steps = opts.get("steps_by_level", {}).get(str(level), opts["steps"])
    _append_event(opts, {"trial": config["trial_id"], "rank": rank, "start": start, "pid": os.getpid()})
    if start >= steps and last is not None:
        rep.report(last)  # contract: a finished run re-reports its final metrics once
        return
    gen = torch.Generator().manual_seed(1000 * rank)
    for step in range(start, steps):
        x = torch.randn(8, 2, generator=gen).to(rep.device)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        average_gradients(model)
        opt.step()
        metrics: dict[str, Any] = all_reduce_metrics({"loss": loss.item(), "rank_metric": float(rank + step)})
        metrics.update(step=step, start_step=start, world_size=world, level=level)
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                torch.save(
                    {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "metrics": metrics},
                    Path(tmp) / "state.pt",
                )
            rep.report(metrics, tmp if rank == 0 else None)
        if opts.get("progress_dir") and rank == 0:
            (Path(opts["progress_dir"]) / f"{config['trial_id']}.{step}").touch()
        _maybe_die(opts, rank, world, step)
        time.sleep(opts.get("sleep_s", 0.0))


def _results(grid: Any) -> list[Any]:
    """The ResultGrid's results as a list (ResultGrid is indexable, typed as not iterable)."""
    return [grid[i] for i in range(len(grid))]


def _metrics(result: Any) -> dict[str, Any]:
    assert result.metrics is not None, f"trial reported nothing: {result.error!r}"
    return dict(result.metrics)


def _events(event_dir: Path) -> list[dict[str, Any]]:
    path = event_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def ray_env() -> Iterator[None]:
    """Workers import this module and mmdsweep by name; reports are polled quickly."""
    mp = pytest.MonkeyPatch()
    paths = [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
    mp.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    mp.delenv("RAY_ADDRESS", raising=False)
    yield
    ray.shutdown()
    mp.undo()


_SHARED = {"local": False}


@pytest.fixture
def local_ray() -> None:
    """A shared local 2-CPU Ray (with dashboard), started once for the tests that fit it."""
    if ray.is_initialized() and not _SHARED["local"]:
        ray.shutdown()
    if not ray.is_initialized():
        rt.init_ray(num_cpus=2, object_store_memory=OBJECT_STORE)
        _SHARED["local"] = True


@pytest.fixture
def no_ray() -> None:
    """Tests that need their own cluster shape shut the shared session down first."""
    ray.shutdown()
    _SHARED["local"] = False


def _trainable(storage: Path, *, workers: int, cpus_per_worker: float, toy: dict[str, Any], **kw: Any) -> Any:
    return rt.make_trial_trainable(
        toy_loop,
        num_workers=workers,
        use_gpu=False,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=0.0,
        max_failures=kw.pop("max_failures", 0),
        storage_path=str(storage / "train"),
        base_loop_config={"toy": toy},
        **kw,
    )


def _sweep(trainable: Any, storage: Path, name: str, **kw: Any) -> Any:
    """``rt.run_sweep`` over :data:`SPACE`: one trial at a time minimising ``loss``, FIFO, silent,
    unless ``kw`` says otherwise."""
    options: dict[str, Any] = {
        "metrics": ["loss"],
        "modes": ["min"],
        "num_samples": 1,
        "max_concurrent_trials": 1,
        "scheduler": None,
        "verbose": 0,
        **kw,
    }
    return rt.run_sweep(trainable, params=validate_space(SPACE), storage_path=storage, name=name, **options)


# --------------------------------------------------------------------------- tests without Ray


def test_local_reporter_runs_the_same_loop_and_resumes(tmp_path: Path) -> None:
    toy = {"steps": 3}
    run_dir = rt.run_local(
        toy_loop, base_loop_config={"toy": toy}, params={"finetune.lr": 0.1}, run_dir=tmp_path
    )
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]
    assert all(r["start_step"] == 0 and r["world_size"] == 1 for r in lines)
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint_*"))
    assert kept == ["checkpoint_000001", "checkpoint_000002"]  # num_to_keep=2
    assert lines[-1]["checkpoint_path"].endswith("checkpoint_000002")
    # Same run dir, more steps: continues from the checkpoint of step 2.
    rt.run_local(toy_loop, base_loop_config={"toy": {"steps": 5}}, params={}, run_dir=tmp_path)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["start_step"]) for r in lines[3:]] == [(3, 3), (4, 3)]
    # Already final: re-reports the final metrics once, trains no further.
    rt.run_local(toy_loop, base_loop_config={"toy": {"steps": 5}}, params={}, run_dir=tmp_path)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and lines[-1]["step"] == 4
    reporter = LocalReporter(tmp_path)
    assert isinstance(reporter, rt.Reporter) and reporter.rank == 0 and reporter.world_size == 1
    with reporter.latest_checkpoint_dir() as d:
        assert d is not None and torch.load(d / "state.pt")["step"] == 4
    with LocalReporter(tmp_path / "fresh").latest_checkpoint_dir() as d:
        assert d is None


def test_max_concurrent_from_resources() -> None:
    assert rt.max_concurrent_from_resources(2, 0, 2, 0.5, 0, 0.5) == 1
    assert rt.max_concurrent_from_resources(2, 0, 1, 0.5, 0, 0.5) == 2
    assert rt.max_concurrent_from_resources(2, 0, 1, 1.5, 0, 0.5) == 1
    assert rt.max_concurrent_from_resources(64, 8, 2, 4, 1, 1) == 4  # GPU-bound
    assert rt.max_concurrent_from_resources(0.3 * 10, 0, 1, 0.2, 0, 0.1) == 10  # float rounding
    with pytest.raises(ValueError, match="one trial needs 2.5 CPU"):
        rt.max_concurrent_from_resources(2, 0, 2, 1, 0, 0.5)


def test_scheduler_and_argument_checks(tmp_path: Path) -> None:
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    assert isinstance(rt.make_scheduler(None, ["a", "b"], ["min", "max"]), FIFOScheduler)
    asha = rt.make_scheduler({"grace_period": 1, "reduction_factor": 2, "max_t": 4}, ["a"], ["min"])
    assert isinstance(asha, AsyncHyperBandScheduler)
    with pytest.raises(ValueError, match="single objective"):
        rt.make_scheduler({"type": "asha"}, ["a", "b"], ["min", "max"])
    with pytest.raises(ValueError, match="unknown ASHA option"):
        rt.make_scheduler({"grace": 1}, ["a"], ["min"])
    with pytest.raises(ValueError, match="unknown scheduler type"):
        rt.make_scheduler({"type": "pbt"}, ["a"], ["min"])
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        _sweep(lambda c: None, tmp_path, "missing", resume=True)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "x").touch()
    with pytest.raises(FileExistsError, match="resume=True"):
        _sweep(lambda c: None, tmp_path, "exists")
    with pytest.raises(ValueError, match="trial_cpus"):
        _trainable(tmp_path, workers=1, cpus_per_worker=1, toy={}, trial_cpus=0)


# --------------------------------------------------------------------------- shared local Ray


@pytest.mark.slow
def test_init_ray_is_idempotent_and_has_state_api(local_ray: None) -> None:
    from ray.util.state import list_nodes

    rt.init_ray(num_cpus=2)  # already initialised: no-op
    assert ray.cluster_resources()["CPU"] == 2
    # the dashboard (State API) is up: it may take a while to answer on a loaded 2-core machine
    deadline, nodes, err = time.monotonic() + 180, None, None
    while nodes is None and time.monotonic() < deadline:
        try:
            nodes = list_nodes(timeout=30)
        except Exception as e:  # noqa: BLE001 - not up yet: retry until the deadline
            err = e
            time.sleep(2)
    assert nodes is not None, f"State API did not answer within 180 s: {err!r}"
    assert len(nodes) == 1


@pytest.mark.slow
def test_two_worker_trials_multi_objective_with_optuna_storage(local_ray: None, tmp_path: Path) -> None:
    steps = 3
    url = f"sqlite:///{tmp_path}/optuna/study.db"
    # 0.25 + 2 x 0.25 CPU per trial: both 2-worker trials run at the same time on 2 CPUs.
    trainable = _trainable(tmp_path, workers=2, cpus_per_worker=0.25, toy={"steps": steps}, trial_cpus=0.25)
    concurrent = rt.max_concurrent_from_resources(2, 0, 2, 0.25, 0.0, 0.25)
    assert concurrent == 2
    grid = _sweep(
        trainable,
        tmp_path,
        "mo",
        metrics=["loss", "rank_metric"],
        modes=["min", "max"],
        num_samples=2,
        max_concurrent_trials=concurrent,
        searcher_seed=0,
        optuna_storage=url,
    )
    assert len(grid) == 2 and grid.num_errors == 0
    for result in _results(grid):
        m = _metrics(result)
        assert m["world_size"] == 2 and m["training_iteration"] == steps and m["step"] == steps - 1
        # rank r reports rank + step: the value reaching Tune is the mean over both ranks.
        df = result.metrics_dataframe
        assert list(df["rank_metric"]) == [s + 0.5 for s in range(steps)]
        assert set(result.config) <= set(SPACE) and "finetune.lr" in result.config
        assert ("kernel.bandwidth" in result.config) == (result.config["kernel.type"] == "rbf")
        assert Path(m["checkpoint_path"]).parent.name == f"train_{m['trial_id']}"
    study = optuna.load_study(study_name="mo", storage=url)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    told = sorted(v for t in study.trials for v in t.values)
    got = sorted(v for r in _results(grid) for v in (_metrics(r)["loss"], _metrics(r)["rank_metric"]))
    assert told == pytest.approx(got)
    assert all("kernel.type" in t.params for t in study.trials)


@pytest.mark.slow
def test_asha_early_stopping_does_not_deadlock_next_trials(local_ray: None, tmp_path: Path) -> None:
    """Each trial needs the whole 2-CPU cluster (0.5 driver + 1.5 worker), so a worker
    placement group leaked by an early-stopped trial would block the next one."""
    order = tmp_path / "order"
    order.mkdir()
    trainable = _trainable(
        tmp_path, workers=1, cpus_per_worker=1.5, toy={"steps": 4, "order_dir": str(order)}
    )
    assert rt.max_concurrent_from_resources(2, 0, 1, 1.5, 0, 0.5) == 1
    t0 = time.monotonic()
    grid = _sweep(
        trainable,
        tmp_path,
        "asha",
        metrics=["level"],  # later trials are worse: ASHA stops them at the first rung
        num_samples=4,
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": 4},
        searcher_seed=0,
        optuna_storage=f"sqlite:///{tmp_path}/asha.db",
    )
    elapsed = time.monotonic() - t0
    errors = [repr(r.error) for r in _results(grid) if r.error]
    assert errors == [], errors
    iters = sorted((_metrics(r)["level"], _metrics(r)["training_iteration"]) for r in _results(grid))
    assert iters == [(0, 4), (1, 1), (2, 1), (3, 1)]
    # Stopped trials reach Optuna as COMPLETE with their last value.
    study = optuna.load_study(study_name="asha", storage=f"sqlite:///{tmp_path}/asha.db")
    assert sorted((t.state.name, t.value) for t in study.trials) == [("COMPLETE", float(v)) for v in range(4)]
    # A leaked placement group blocks the next trial for good, so any finite bound detects it; 600 s (the
    # sweep takes ~90 s on an idle 2-core machine) keeps the check from failing on a merely busy machine.
    assert elapsed < 600, f"sweep took {elapsed:.0f}s: trials probably waited for leaked resources"


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint(local_ray: None, tmp_path: Path) -> None:
    events = tmp_path / "events"
    events.mkdir()
    toy = {"steps": 5, "kill_marker": str(tmp_path / "killed"), "kill_at": 2, "event_dir": str(events)}
    trainable = _trainable(tmp_path, workers=2, cpus_per_worker=0.5, toy=toy, max_failures=1)
    grid = _sweep(trainable, tmp_path, "kill")
    assert (tmp_path / "killed").exists(), "the worker was never killed"
    result = grid[0]
    assert result.error is None
    assert _metrics(result)["step"] == 4
    starts = [e["start"] for e in _events(events) if e["rank"] == 0]
    assert len(starts) == 2 and starts[0] == 0
    assert 1 <= starts[1] <= 3, f"restarted at step {starts[1]} instead of after a checkpoint"
    assert _metrics(result)["start_step"] == starts[1]
    assert result.metrics_dataframe is not None
    steps = list(result.metrics_dataframe["step"])
    assert steps.count(0) == 1  # the restarted run did not begin from scratch


# --------------------------------------------------------------------------- own cluster shapes


DRIVER_SCRIPT = """
import json, sys
from pathlib import Path
from mmdsweep.sweep import raytrain as rt
from mmdsweep.train.reporting import LocalReporter
from mmdsweep.sweep.search import validate_space
from test_raytrain import OBJECT_STORE, SPACE, toy_loop

mode, root = sys.argv[1], Path(sys.argv[2])
toy = json.loads((root / "toy.json").read_text())
rt.init_ray(num_cpus=2, object_store_memory=OBJECT_STORE)
trainable = rt.make_trial_trainable(
    toy_loop, num_workers=1, use_gpu=False, cpus_per_worker=0.5, gpus_per_worker=0.0,
    max_failures=0, storage_path=str(root / "train"), base_loop_config={"toy": toy},
)
grid = rt.run_sweep(
    trainable, params=validate_space(SPACE), metrics=["loss"], modes=["min"], num_samples=3,
    max_concurrent_trials=2, scheduler=None, storage_path=str(root), name="sweep",
    resume=mode == "resume", searcher_seed=0, optuna_storage=f"sqlite:///{root}/optuna.db",
    experiment_checkpoint_s=1, verbose=0,
)
out = [
    {"trial_id": r.metrics.get("trial_id"), "error": repr(r.error) if r.error else None,
     "step": r.metrics.get("step"), "level": r.metrics.get("level")}
    for r in grid
]
(root / (mode + ".json")).write_text(json.dumps(out))
"""


def _trial_statuses(exp_dir: Path) -> dict[str, str]:
    """Trial id -> status from Tune's newest experiment-state snapshot."""
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (json.JSONDecodeError, OSError):
        return {}  # being rewritten
    out = {}
    for trial_json, _meta in data.get("trial_data", []):
        trial = json.loads(trial_json)
        out[trial["trial_id"]] = trial["status"]
    return out


def _run_driver(root: Path, mode: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    log = open(root / f"{mode}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, str(root / "driver.py"), mode, str(root)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


def _wait_for_kill_point(
    root: Path, proc: subprocess.Popen[bytes], timeout: float
) -> tuple[set[str], set[str]]:
    """Wait until one trial finished (in Tune's snapshot) and another reported twice.

    Returns (finished trial ids, interrupted trial ids).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (root / "fresh.log").read_text()[-3000:]
        statuses = _trial_statuses(root / "sweep")
        done = {t for t, s in statuses.items() if s == "TERMINATED"}
        progressed = {p.name.split(".")[0] for p in (root / "progress").iterdir() if p.name.endswith(".1")}
        if done and progressed - done:
            return done, progressed - done
        time.sleep(0.3)
    raise AssertionError("sweep never reached the kill point:\n" + (root / "fresh.log").read_text()[-3000:])


@pytest.mark.slow
def test_driver_sigkill_then_resume_runs_every_trial_once(no_ray: None, tmp_path: Path) -> None:
    for sub in ("progress", "events", "order"):
        (tmp_path / sub).mkdir()
    toy = {
        "steps": 8,
        "steps_by_level": {"0": 2},  # the first trial finishes quickly, the others are interrupted
        "sleep_s": 0.5,
        "progress_dir": str(tmp_path / "progress"),
        "event_dir": str(tmp_path / "events"),
        "order_dir": str(tmp_path / "order"),
    }
    (tmp_path / "toy.json").write_text(json.dumps(toy))
    (tmp_path / "driver.py").write_text(DRIVER_SCRIPT)
    proc = _run_driver(tmp_path, "fresh")
    try:
        finished_before, interrupted = _wait_for_kill_point(tmp_path, proc, timeout=240)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (tmp_path / "fresh.json").exists()

    resumed = _run_driver(tmp_path, "resume")
    with contextlib.suppress(subprocess.TimeoutExpired):
        resumed.wait(timeout=300)
    if resumed.poll() is None:
        resumed.kill()
        resumed.wait()
    log = (tmp_path / "resume.log").read_text()[-3000:]
    assert resumed.returncode == 0, log
    out = json.loads((tmp_path / "resume.json").read_text())
    ids = [r["trial_id"] for r in out]
    assert len(ids) == 3 and len(set(ids)) == 3, out
    assert all(r["error"] is None for r in out), out
    assert all(r["step"] == (1 if r["level"] == 0 else 7) for r in out), out
    starts: dict[str, list[int]] = {}
    for e in _events(tmp_path / "events"):
        starts.setdefault(e["trial"], []).append(e["start"])
    for trial in finished_before:
        assert starts[trial] == [0], f"finished trial {trial} ran again: {starts[trial]}"
    assert all(len(starts[t]) == 2 and starts[t][1] >= 1 for t in interrupted), starts
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{tmp_path}/optuna.db")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def test_progress_table_survives_conditional_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial without a conditional parameter (``kernel.bandwidth`` of a polynomial-kernel trial) used to end the
    sweep: Ray 2.60's "Current best trial" line looks every parameter column up without a default (KeyError). Our
    reporter prints the table with an empty cell instead."""
    from ray.tune import CLIReporter
    from ray.tune.experiment import Trial

    from mmdsweep.sweep.raytrain import progress_reporter

    class StubTrial(Trial):  # type: ignore[misc]
        local_experiment_path = "/tmp/sweep"  # no storage: the table only needs these two
        local_path = None

    def trial(cfg: dict[str, object], fid: float) -> Trial:
        t = StubTrial("fn", config=cfg, stub=True)
        t.run_metadata.last_result = {"fid": fid, "config": cfg, "training_iteration": 1}
        return t

    trials = [
        trial({"kernel.type": "rbf", "kernel.bandwidth": 0.5}, 2.0),
        trial({"kernel.type": "polynomial"}, 1.0),
    ]
    columns = ["kernel.type", "kernel.bandwidth"]
    import ray.tune.utils.log as tune_log

    # a quiet sweep earlier in the same process sets Tune's global verbosity to 0 (no table at all)
    monkeypatch.setattr(tune_log, "verbosity", tune_log.Verbosity.V1_EXPERIMENT)
    text = progress_reporter(columns, ["fid"], ["min"])._progress_str(trials, False)
    lines = [line for line in text.splitlines() if "polynomial" in line or "rbf" in line]
    assert len(lines) == 2
    poly = next(line for line in lines if "polynomial" in line)
    assert [c.strip() for c in poly.split("|")][
        5
    ] == ""  # the bandwidth cell of the polynomial trial is empty
    stock = CLIReporter(
        parameter_columns=columns,
        metric_columns={"fid": "fid"},
        sort_by_metric=True,
        metric="fid",
        mode="min",
    )
    with pytest.raises(KeyError):  # what the sweep died of
        stock._progress_str(trials, False)
