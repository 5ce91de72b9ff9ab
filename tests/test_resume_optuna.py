"""Interrupt and kill a sweep with an Optuna SQLite storage, then resume (issue 10, faults 5-6, part 4).

One sweep of 3 tiny trials (one at a time, 3 reports each) is stopped four times:

1. SIGINT during the first trial: the driver exits non-zero, exports nothing, and no Optuna trial
   is marked FAIL (before: exit 0, export, and the orphan clean-up FAILed the running trial,
   which the resume then hit with ``UpdateFinishedTrialError``);
2. SIGKILL of the driver alone during a trial;
3. SIGKILL of the driver and its local Ray (its process group) right after a trial completes, then a
   plain start without ``--resume``, which must refuse (exit 2, naming ``--resume``);
4. SIGKILL between trials (a moment after a completion);

each followed by ``--resume``. At the end: every trial exactly once and completed, every report
(steps 1-3 of each trial) in ``metrics.parquet``, the study's states agreeing with
``trials.parquet`` (COMPLETE for each completed trial, FAIL only for orphans marked as such), the trials completed
before the kills unchanged, no
traceback in any output, and none of the killed drivers' Ray processes alive (checked by the
pids and start times each driver recorded, and by its Ray session name).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest
import yaml
from conftest import sweep_yaml

from mmdsweep.results import read_metrics, read_trials

STEPS = 3


def _start(p: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "1"  # snapshot often, so that each kill has state to resume
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mmdsweep.tune", str(p), "--quiet", *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _frame(read: Callable[[Path], pd.DataFrame], sdir: Path) -> pd.DataFrame:
    try:
        return read(sdir)
    except (FileNotFoundError, OSError, ValueError):
        return pd.DataFrame()


def _completed(sdir: Path) -> int:
    t = _frame(read_trials, sdir)
    return int((t["status"] == "completed").sum()) if len(t) else 0


def _reports(sdir: Path) -> int:
    return len(_frame(read_metrics, sdir))


def _wait(cond: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, timeout: float = 600) -> bool:
    """Poll ``cond``; False if the sweep ended first (it must then have ended well)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            assert proc.returncode == 0, log.read_text()[-4000:]
            return False
        time.sleep(0.25)
    raise AssertionError(f"timed out; output:\n{log.read_text()[-4000:]}")


def _kill_driver(proc: subprocess.Popen[bytes], sdir: Path, *, group: bool = False) -> dict[str, Any]:
    """SIGKILL the driver only (its Ray processes are left behind, as after an OOM kill), or with
    ``group`` its whole process group (the driver and the local Ray it started, as a preempted node)."""
    session = json.loads((sdir / "ray_session.json").read_text())
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return dict(session)


def _alive(session: dict[str, Any]) -> list[str]:
    left = []
    for ident in session.get("processes") or []:
        try:
            p = psutil.Process(ident["pid"])
            if abs(p.create_time() - ident["create_time"]) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{ident['pid']} {ident['name']}")
        except psutil.NoSuchProcess:
            pass
    name = Path(session["session_dir"]).name if session.get("session_dir") else None
    if name:
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            if name in " ".join(p.info.get("cmdline") or []) and p.info.get("status") != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.info['cmdline'])[:80]}")
    return left


@pytest.mark.slow
# five driver starts: ~4-6 min on an idle 2-core machine, far more when other sweeps share the cores
@pytest.mark.timeout(2400)
def test_interrupt_and_kills_then_resume_keep_the_optuna_study_true(tiny_root: Path, tmp_path: Path) -> None:
    import optuna

    db = tmp_path / "optuna.db"
    p = sweep_yaml(
        tiny_root,
        tmp_path,
        num_samples=3,
        scheduler="fifo",
        max_concurrent_trials=1,
        storage=f"sqlite:///{db}",
        space={"finetune.lr": {"loguniform": [1.0e-5, 1.0e-4]}, "sampler.timesteps": {"choice": [2, 3]}},
    )
    cfg = yaml.safe_load(p.read_text())
    cfg["finetune"]["steps"] = STEPS
    p.write_text(yaml.safe_dump(cfg))
    sdir = tmp_path / "results" / "sweep"
    log = tmp_path / "driver.log"
    t0 = time.time()
    killed: list[dict[str, Any]] = []

    # 1. SIGINT during the first trial: non-zero exit, no export, no FAIL in the study
    proc = _start(p, log)
    assert _wait(lambda: _reports(sdir) >= 1, proc, log)
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()[-4000:]
    assert "sweep interrupted" in log.read_text()
    assert not (sdir / "exported").exists()
    assert json.loads((sdir / "sweep.json").read_text())["status"] == "interrupted"
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{db}")
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]

    # 2. SIGKILL during a trial
    proc = _start(p, log, "--resume")
    n = _reports(sdir)
    if _wait(lambda: _reports(sdir) > n and _completed(sdir) < 3, proc, log):
        killed.append(_kill_driver(proc, sdir))
    # 3. SIGKILL of the driver and its local Ray (the process group) right after a trial completes;
    #    then a plain start (no --resume) refuses to clobber the sweep, naming --resume
    proc = _start(p, log, "--resume")
    c = _completed(sdir)
    if _wait(lambda: _completed(sdir) > c, proc, log):
        killed.append(_kill_driver(proc, sdir, group=True))
        refused = subprocess.run(
            [sys.executable, "-m", "mmdsweep.tune", str(p), "--quiet"],
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
            timeout=300,
        )
        assert refused.returncode == 2 and "--resume" in refused.stdout + refused.stderr, (
            refused.stdout + refused.stderr
        )
    before = _frame(read_trials, sdir)
    done_before = before[before["status"] == "completed"] if len(before) else before
    assert len(done_before) >= 1
    # 4. SIGKILL between trials
    proc = _start(p, log, "--resume")
    c = _completed(sdir)
    if _wait(lambda: _completed(sdir) > c, proc, log) and proc.poll() is None:
        time.sleep(2.0)
        if proc.poll() is None:
            killed.append(_kill_driver(proc, sdir))
    # the last resume finishes the sweep
    if _completed(sdir) < 3 or not (sdir / "exported").exists():
        proc = _start(p, log, "--resume")
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    elapsed = time.time() - t0

    out = log.read_text()
    # the driver's own output: no traceback. Lines prefixed "(TrainController pid=...)" are Ray's
    # actors' logs forwarded to the driver (e.g. an autoscaler request timing out on a busy CPU,
    # logged with its stack by Ray itself on any start, not only on resume); left to log quieting.
    driver_lines = [line for line in out.splitlines() if not line.lstrip("\x1b[0123456789m").startswith("(")]
    assert not [line for line in driver_lines if "Traceback" in line], out[-6000:]
    assert "UpdateFinishedTrialError" not in out
    assert len(killed) >= 2, "the sweep ended before the kills"
    trials = read_trials(sdir)
    assert trials["trial_id"].is_unique and len(trials) == 3, trials[["trial_id", "status"]]
    assert (trials["status"] == "completed").all(), trials[["trial_id", "status"]]
    # nothing completed before the kills was lost or changed by the resumes
    now = trials.set_index("trial_id")
    for _, row in done_before.iterrows():
        assert now.loc[row["trial_id"], "best_fid"] == pytest.approx(row["best_fid"])
    metrics = read_metrics(sdir)
    assert not metrics.duplicated(subset=["trial_id", "step"]).any()
    for tid, group in metrics.groupby("trial_id"):
        assert sorted(group["step"]) == list(range(1, STEPS + 1)), (tid, sorted(group["step"]))
    # the study agrees with trials.parquet: one COMPLETE per completed trial, FAIL only for marked orphans
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{db}")
    states = [t.state for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3, states
    assert sorted(t.params["finetune.lr"] for t in complete) == pytest.approx(
        sorted(trials["param.finetune.lr"])
    )
    assert sorted(t.value for t in complete) == pytest.approx(sorted(trials["final_fid"]), rel=1e-6)
    for t in study.trials:
        assert t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL), states
        if t.state == optuna.trial.TrialState.FAIL:
            assert "mmdsweep_orphan" in t.user_attrs, t
    meta = json.loads((sdir / "sweep.json").read_text())
    assert meta["status"] == "finished" and meta["exports"]
    # no Ray process of a killed driver is left
    for session in killed:
        assert not _alive(session), _alive(session)
    print(f"interrupt + {len(killed)} kills + resumes: {elapsed:.0f} s")


# ----------------------------------------------------------------------------- fast unit checks


def _study(tmp: Path) -> tuple[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp / 'o.db'}"
    return url, optuna.create_study(study_name="sw", storage=url)


def test_orphans_stay_running_while_the_sweep_is_unfinished(tmp_path: Path) -> None:
    import optuna

    from mmdsweep.sweep.search import close_orphan_trials

    url, study = _study(tmp_path)
    study.ask()
    assert close_orphan_trials(url, "sw", sweep_finished=False) == 0
    assert [t.state for t in optuna.load_study(study_name="sw", storage=url).trials] == [
        optuna.trial.TrialState.RUNNING
    ]
    assert close_orphan_trials(url, "sw", sweep_finished=True) == 1
    (t,) = optuna.load_study(study_name="sw", storage=url).trials
    assert t.state == optuna.trial.TrialState.FAIL and "mmdsweep_orphan" in t.user_attrs


def test_guarded_searcher_never_writes_to_a_finished_trial(tmp_path: Path) -> None:
    """A trial Optuna already holds as COMPLETE (told before Tune's last snapshot) is left alone."""
    import optuna

    from mmdsweep.sweep import raytrain, search

    url = f"sqlite:///{tmp_path / 'o.db'}"
    params = search.validate_space({"finetune.lr": {"loguniform": [1e-5, 1e-3]}})
    searcher = search.make_searcher(params, ["fid"], ["min"], seed=0, storage=url, study_name="sw")
    raytrain._guard(searcher)
    assert type(searcher).__name__ == "GuardedOptunaSearch"
    import pickle

    assert type(pickle.loads(pickle.dumps(searcher))).__name__ == "GuardedOptunaSearch"
    searcher.suggest("t1")
    searcher.on_trial_result("t1", {"fid": 3.0, "training_iteration": 1})
    searcher.on_trial_complete("t1", {"fid": 2.0, "training_iteration": 2})
    # the driver died before Tune saved that the trial ended: Tune replays it on resume
    searcher._completed_trials.discard("t1")
    searcher.on_trial_result("t1", {"fid": 2.5, "training_iteration": 1})  # before: UpdateFinishedTrialError
    searcher.on_trial_complete("t1", {"fid": 2.5, "training_iteration": 2})
    (t,) = optuna.load_study(study_name="sw", storage=url).trials
    assert t.state == optuna.trial.TrialState.COMPLETE and t.value == 2.0


def test_release_stale_ray_stops_only_the_recorded_processes(tmp_path: Path) -> None:
    from mmdsweep.sweep import raytrain

    session = tmp_path / "session_2026-01-01_00-00-00_000000_1"
    # a "worker" whose command line names the session (as Ray's workers do)
    ours = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", f"--session-dir={session}"]
    )
    recorded = subprocess.Popen(["sleep", "121"])  # a "raylet" recorded by pid
    unrelated = subprocess.Popen(["sleep", "122"])
    try:
        info = {
            "driver": {"pid": 999999, "create_time": 0.0, "name": "python"},
            "session_dir": str(session),
            "processes": [raytrain._proc_identity(recorded.pid)],
        }
        (tmp_path / raytrain.RAY_SESSION_FILE).write_text(json.dumps(info))
        assert raytrain.release_stale_ray(tmp_path, timeout=5) == 2
        assert ours.wait(timeout=10) is not None and recorded.wait(timeout=10) is not None
        assert unrelated.poll() is None
        assert not (tmp_path / raytrain.RAY_SESSION_FILE).exists()
        # a live driver: refused, nothing stopped
        info["driver"] = raytrain._proc_identity(unrelated.pid)
        (tmp_path / raytrain.RAY_SESSION_FILE).write_text(json.dumps(info))
        with pytest.raises(RuntimeError, match="still alive"):
            raytrain.release_stale_ray(tmp_path)
        assert unrelated.poll() is None
    finally:
        for p in (ours, recorded, unrelated):
            p.kill()
            p.wait()
