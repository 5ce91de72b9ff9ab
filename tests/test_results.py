"""Tests of the Parquet results layer: append-only parts, open schema 2, readers, resume, schema 1.

The callback (``mmdsweep.sweep.callback``) is driven by a real Ray Tune run of toy trials and,
for the unit tests, by direct hook calls with fake trials.
"""

from __future__ import annotations

import math
import os
import pickle
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray
import ray.cloudpickle
from ray import tune
from ray.tune.search import Searcher

from mmdsweep import results as R
from mmdsweep.sweep.callback import ParquetResultsCallback

# The trainable and searcher live in this module, which Ray workers cannot import.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

SWEEP_ID = "sweep-test-001"
EXPERIMENT = "toy_experiment"
PARAM_TYPES = {
    "finetune.lr": "float",
    "kernel.type": "str",
    "kernel.bandwidth": "float",
    "sampler.timesteps": "int",
    "features.train": "str",
}
BASE = {"finetune.lr": 1e-5, "sampler.timesteps": 5, "features.train": "classifier"}
# One config per behaviour; "poly" trials have no kernel.bandwidth (conditional branch).
CONFIGS: list[dict[str, Any]] = [
    {**BASE, "mode": "complete", "kernel.type": "rbf", "kernel.bandwidth": 2.0},
    {**BASE, "mode": "diverge", "kernel.type": "poly"},
    {**BASE, "mode": "error", "kernel.type": "rbf", "kernel.bandwidth": 0.5, "sampler.timesteps": 10},
    {**BASE, "mode": "long", "kernel.type": "poly", "features.train": "clip"},
]
FIDS = {1: 50.0, 2: 30.0, 3: 40.0}  # best FID at step 2 for the completing trial
STOP_AT_STEP = 4  # Tune stop criterion; only the "long" trial gets there
EXPECTED_STATUS = {
    "complete": "completed",
    "diverge": "diverged",
    "error": "errored",
    "long": "early-stopped",
}
EXPECTED_REPORTS = {"complete": 3, "diverge": 2, "error": 2, "long": STOP_AT_STEP}


# --------------------------------------------------------------------------- fixtures and toys


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """One local Ray instance for the whole module."""
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=200 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


class FixedConfigs(Searcher):
    """Searcher handing out CONFIGS in order (flat dotted keys, some absent)."""

    def __init__(self, configs: list[dict[str, Any]]) -> None:
        super().__init__(metric="loss", mode="min")
        self._configs = list(configs)
        self._next = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self._next >= len(self._configs):
            return Searcher.FINISHED  # type: ignore[return-value]
        config = dict(self._configs[self._next])
        self._next += 1
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_bytes(pickle.dumps((self._configs, self._next)))

    def restore(self, checkpoint_path: str) -> None:
        self._configs, self._next = pickle.loads(Path(checkpoint_path).read_bytes())


def report_dict(step: int, fid: float, status: str, **extra: Any) -> dict[str, Any]:
    """A report following the trainer's contract."""
    return {
        "step": step,
        "loss": 1.0 / step if status != "diverged" else math.nan,
        "fid": fid,
        "kid": fid / 1000.0 if not math.isnan(fid) else math.nan,
        "fid_best": fid,
        "kid_best": fid / 1000.0,
        "bandwidth": 2.0,
        "lr": 1e-5,
        "elapsed_s": 0.1 * step,
        "timesteps": 5,
        "num_eval_samples": 64,
        "status": status,
        "fid@torchvision:mobilenet_v2": 2 * fid,  # an extra evaluation space
        "world_size": 2,
        "num_nodes": 1,
        "finite": status != "diverged",
        **extra,
    }


def toy_trainable(config: dict[str, Any]) -> None:
    """Pretend fine-tuning whose behaviour is chosen by config["mode"]."""
    mode = config["mode"]
    if mode == "complete":
        for step in (1, 2, 3):
            status = "completed" if step == 3 else "running"
            checkpoint = None
            if step == 2:  # checkpoint only at the best step
                ckpt_dir = tempfile.mkdtemp()
                Path(ckpt_dir, "model.txt").write_text("weights at step 2")
                checkpoint = tune.Checkpoint.from_directory(ckpt_dir)
            tune.report(report_dict(step, FIDS[step], status), checkpoint=checkpoint)
    elif mode == "diverge":
        tune.report(report_dict(1, 80.0, "running", sample_time_per_image_s=0.25))
        tune.report(report_dict(2, math.nan, "diverged"))
    elif mode == "error":
        tune.report(report_dict(1, 70.0, "running", checkpoint_path="/ckpt/error/step1"))
        tune.report(report_dict(2, math.nan, "running"))
        raise ValueError("boom at step 2\nsecond line of the message")
    else:  # "long": would run for ages; the Tune stop criterion ends it
        for step in range(1, 1000):
            tune.report(report_dict(step, 60.0 - step, "running"))
            time.sleep(0.05)


class EventRecorder(tune.Callback):
    """Records the hook calls Tune makes, to replay them later (simulated resume)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any, Any]] = []

    def _fake(self, trial: Any) -> Any:
        fake = fake_trial(trial.trial_id, dict(trial.config))
        fake.pickled_error_file, fake.error_file = trial.pickled_error_file, trial.error_file
        return fake

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.events.append(("start", self._fake(trial), None))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.events.append(("result", self._fake(trial), dict(result)))

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        self.events.append(("checkpoint", self._fake(trial), checkpoint))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.events.append(("error", self._fake(trial), None))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.events.append(("complete", self._fake(trial), None))

    def replay(self, callback: ParquetResultsCallback) -> None:
        """Feed every recorded event to ``callback`` as Tune would."""
        callback.setup()
        for kind, trial, payload in self.events:
            if kind == "start":
                callback.on_trial_start(0, [], trial)
            elif kind == "result":
                callback.on_trial_result(0, [], trial, dict(payload))
            elif kind == "checkpoint":
                callback.on_checkpoint(0, [], trial, payload)
            elif kind == "error":
                callback.on_trial_error(0, [], trial)
            else:
                callback.on_trial_complete(0, [], trial)
        callback.on_experiment_end([])


def run_sweep(
    storage: Path, out_dir: Path, *extra_callbacks: tune.Callback
) -> tuple[ParquetResultsCallback, tune.ResultGrid]:
    """Run the four toy trials through Tune with the Parquet callback."""
    callback = ParquetResultsCallback(out_dir, SWEEP_ID, PARAM_TYPES, EXPERIMENT)
    tuner = tune.Tuner(
        tune.with_resources(toy_trainable, {"cpu": 1}),
        tune_config=tune.TuneConfig(search_alg=FixedConfigs(CONFIGS), num_samples=len(CONFIGS)),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(storage),
            stop={"step": STOP_AT_STEP},
            callbacks=[callback, *extra_callbacks],
            verbose=0,
        ),
    )
    return callback, tuner.fit()


@pytest.fixture(scope="module")
def sweep(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished toy sweep: results dir, storage dir, recorded events, trial id -> mode."""
    base = tmp_path_factory.mktemp("sweep")
    out_dir, storage = base / "results", base / "ray_results"
    recorder = EventRecorder()
    _, grid = run_sweep(storage, out_dir, recorder)
    results = [grid[i] for i in range(len(grid))]
    modes = {(r.metrics or {})["trial_id"]: (r.config or {})["mode"] for r in results}
    return {"out_dir": out_dir, "storage": storage, "recorder": recorder, "modes": modes}


# --------------------------------------------------------------------------- atomic write


def test_atomic_write_keeps_old_file_when_writer_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.parquet"
    R.atomic_write_table(pa.table({"x": [1, 2, 3]}), path)

    def failing_write(table: pa.Table, where: Any, **kwargs: Any) -> None:
        Path(where).write_bytes(b"PAR1 partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", failing_write)
    with pytest.raises(OSError, match="disk full"):
        R.atomic_write_table(pa.table({"x": [9]}), path)
    monkeypatch.undo()

    assert pq.read_table(path).column("x").to_pylist() == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]  # no temp file left


def test_atomic_write_replaces_content_and_keeps_metadata(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "t.parquet"
    R.atomic_write_table(pa.table({"x": [1]}), path)
    table = pa.table({"y": ["a", "b"]}).replace_schema_metadata({b"k": b"v"})
    R.atomic_write_table(table, path)
    assert pq.read_table(path).column("y").to_pylist() == ["a", "b"]
    assert pq.read_schema(path).metadata[b"k"] == b"v"
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # readable by notebooks of other users


# --------------------------------------------------------------------------- a real Tune run


def test_trials_have_one_row_each_with_expected_status(sweep: dict[str, Any]) -> None:
    trials = R.read_trials(sweep["out_dir"])
    assert len(trials) == len(CONFIGS)
    assert trials["trial_id"].is_unique
    assert set(trials["sweep_id"]) == {SWEEP_ID}
    got = {sweep["modes"][tid]: status for tid, status in zip(trials["trial_id"], trials["status"])}
    assert got == EXPECTED_STATUS


def test_trials_scores_steps_and_checkpoints(sweep: dict[str, Any]) -> None:
    trials = R.read_trials(sweep["out_dir"])
    trials["mode"] = trials["trial_id"].map(sweep["modes"])
    rows = {row["mode"]: row for _, row in trials.iterrows()}

    complete = rows["complete"]
    assert complete["best_fid"] == 30.0 and complete["best_step"] == 2
    assert complete["final_fid"] == 40.0 and complete["final_kid"] == pytest.approx(0.04)
    assert complete["best_kid"] == pytest.approx(0.03)
    assert complete["steps"] == 3 and complete["timesteps"] == 5 and complete["num_eval_samples"] == 64
    assert complete["wall_time_s"] == pytest.approx(0.3)
    ckpt = Path(complete["best_checkpoint"])  # Tune's persisted copy of the step-2 checkpoint
    assert (ckpt / "model.txt").read_text() == "weights at step 2"
    assert str(sweep["storage"]) in str(ckpt)

    errored = rows["error"]
    assert errored["error"] == "ValueError: boom at step 2"
    assert errored["best_checkpoint"] == "/ckpt/error/step1"  # reported checkpoint_path
    assert errored["best_fid"] == 70.0 and errored["final_fid"] == 70.0  # NaN FID = not evaluated

    assert rows["diverge"]["best_fid"] == 80.0 and rows["diverge"]["steps"] == 2
    assert rows["long"]["steps"] == STOP_AT_STEP and rows["long"]["best_step"] == STOP_AT_STEP
    assert all(pd.isna(rows[m]["error"]) for m in ("complete", "diverge", "long"))
    assert (trials["updated_at"] >= trials["started_at"]).all()


def test_trials_param_columns_are_typed_with_nulls_for_absent_params(sweep: dict[str, Any]) -> None:
    schema = pq.read_schema(R.results_paths(sweep["out_dir"]).trials)
    assert schema.field("param.finetune.lr").type == pa.float64()
    assert schema.field("param.kernel.bandwidth").type == pa.float64()
    assert schema.field("param.sampler.timesteps").type == pa.int64()
    assert schema.field("param.kernel.type").type == pa.string()
    assert schema.field("param.features.train").type == pa.string()
    assert "param.mode" not in schema.names  # not a searched parameter
    expected = R.trials_schema(PARAM_TYPES)
    assert schema.remove_metadata().equals(expected.remove_metadata(), check_metadata=False)

    trials = R.read_trials(sweep["out_dir"])
    trials["mode"] = trials["trial_id"].map(sweep["modes"])
    bandwidth = dict(zip(trials["mode"], trials["param.kernel.bandwidth"]))
    assert bandwidth["complete"] == 2.0 and bandwidth["error"] == 0.5
    assert pd.isna(bandwidth["diverge"]) and pd.isna(bandwidth["long"])
    timesteps = dict(zip(trials["mode"], trials["param.sampler.timesteps"]))
    assert timesteps == {"complete": 5, "diverge": 5, "error": 10, "long": 5}
    assert str(trials["param.sampler.timesteps"].dtype) == "Int64"


def test_metrics_have_one_row_per_report(sweep: dict[str, Any]) -> None:
    metrics = R.read_metrics(sweep["out_dir"])
    metrics["mode"] = metrics["trial_id"].map(sweep["modes"])
    assert metrics.groupby("mode").size().to_dict() == EXPECTED_REPORTS
    assert not metrics.duplicated(["trial_id", "step"]).any()
    assert set(metrics["sweep_id"]) == {SWEEP_ID}

    diverged = metrics[metrics["mode"] == "diverge"].set_index("step")
    assert math.isnan(diverged.loc[2, "loss"])  # non-finite loss is kept as reported
    assert pd.isna(diverged.loc[2, "fid"])  # NaN FID ("not evaluated") is stored as null
    assert diverged.loc[1, "sample_time_per_image_s"] == 0.25
    assert pd.isna(diverged.loc[2, "sample_time_per_image_s"])
    assert str(metrics["time"].dtype) == "datetime64[us, UTC]"


def test_every_reported_metric_reaches_metrics_parquet_typed(sweep: dict[str, Any]) -> None:
    """Schema 1 dropped fid@<space>, world_size, num_nodes and status; schema 2 keeps every metric."""
    path = R.results_paths(sweep["out_dir"]).metrics
    schema = pq.read_schema(path)
    assert schema.names[: len(R.METRICS_CORE_SCHEMA)] == R.METRICS_CORE_SCHEMA.names
    types = {f.name: f.type for f in schema}
    assert types["fid@torchvision:mobilenet_v2"] == pa.float64()
    assert types["world_size"] == pa.int64() and types["num_nodes"] == pa.int64()
    assert types["status"] == pa.string() and types["finite"] == pa.bool_()
    assert types["checkpoint_path"] == pa.string()  # reported by one trial only
    assert types["training_iteration"] == pa.int64() and types["hostname"] == pa.string()  # Tune's own
    assert "config" not in types and not any(n.startswith("config/") for n in types)
    metrics = R.read_metrics(sweep["out_dir"])
    metrics["mode"] = metrics["trial_id"].map(sweep["modes"])
    complete = metrics[metrics["mode"] == "complete"].set_index("step")
    assert complete["fid@torchvision:mobilenet_v2"].to_dict() == {1: 100.0, 2: 60.0, 3: 80.0}
    assert list(complete["status"]) == ["running", "running", "completed"]
    assert (metrics["world_size"] == 2).all()
    assert complete["training_iteration"].tolist() == [1, 2, 3]


def test_files_readable_by_pyarrow_dataset_and_duckdb(sweep: dict[str, Any]) -> None:
    paths = R.results_paths(sweep["out_dir"])
    assert pads.dataset(paths.metrics).count_rows() == sum(EXPECTED_REPORTS.values())
    per_trial = sql(
        f"select trial_id, count(*) as n, max(step) as last from '{paths.metrics}' group by trial_id"
    ).fetchall()
    assert sorted(n for _, n, _ in per_trial) == sorted(EXPECTED_REPORTS.values())
    statuses = sql(f"select status, count(*) from '{paths.trials}' group by status").fetchall()
    assert dict(statuses) == {status: 1 for status in EXPECTED_STATUS.values()}
    joined = sql(
        f"""select t."param.kernel.type", min(m.fid) from '{paths.trials}' t
            join '{paths.metrics}' m using (trial_id) group by 1 order by 1"""
    ).fetchall()
    assert joined == [("poly", 56.0), ("rbf", 30.0)]
    # the parts a running sweep leaves, read directly: same rows after deduplication
    parts = f"{sweep['out_dir']}/metrics/*.parquet"
    n = sql(
        f"""select count(*) from (select * from read_parquet('{parts}', union_by_name=true)
            qualify row_number() over (partition by trial_id, step order by event_seq desc) = 1)"""
    ).fetchall()[0][0]
    assert n == sum(EXPECTED_REPORTS.values())


def test_metadata_records_version_sweep_and_experiment(sweep: dict[str, Any]) -> None:
    for name, path in R.results_paths(sweep["out_dir"])._asdict().items():
        meta = pq.read_schema(path).metadata
        assert meta[R.META_SCHEMA_VERSION] == b"2" == R.SCHEMA_VERSION.encode()
        assert meta[R.META_SWEEP_ID] == SWEEP_ID.encode()
        assert meta[R.META_EXPERIMENT_NAME] == EXPERIMENT.encode()
        assert meta[R.META_TABLE] == name.encode()
        last_part = R.list_parts(sweep["out_dir"], name)[-1][0]
        assert int(meta[R.META_COMPACTED_THROUGH]) == last_part
        assert R.schema_version(path) == R.SCHEMA_VERSION


# --------------------------------------------------------------------------- resume


def test_replaying_the_same_trials_into_a_new_callback_adds_nothing(
    sweep: dict[str, Any], tmp_path: Path
) -> None:
    """Simulated resume: a second callback on a copy of the dir gets every Tune event again."""
    out_dir = _copy_results(sweep["out_dir"], tmp_path / "results")
    before_trials, before_metrics = R.read_trials(out_dir), R.read_metrics(out_dir)
    assert len(sweep["recorder"].events) > len(before_metrics)

    sweep["recorder"].replay(ParquetResultsCallback(out_dir, SWEEP_ID, PARAM_TYPES, EXPERIMENT))

    after_trials, after_metrics = R.read_trials(out_dir), R.read_metrics(out_dir)
    assert len(after_trials) == len(CONFIGS) and after_trials["trial_id"].is_unique
    assert len(after_metrics) == len(before_metrics)
    assert not after_metrics.duplicated(["trial_id", "step"]).any()
    stable = [c for c in before_trials.columns if c not in ("updated_at", "event_seq")]
    pd.testing.assert_frame_equal(before_trials[stable], after_trials[stable])
    volatile = ["time", "event_seq", "training_iteration"]
    pd.testing.assert_frame_equal(before_metrics.drop(columns=volatile), after_metrics.drop(columns=volatile))
    # the redelivered rows are on disk twice; the reader shows each report once, the later copy
    raw = pq.read_table(out_dir / "metrics").num_rows
    assert raw == 2 * len(before_metrics)
    assert (after_metrics["event_seq"] > before_metrics["event_seq"].max()).all()


def test_tuner_restore_resumes_callback_from_its_files(sweep: dict[str, Any]) -> None:
    """Real resume: Tuner.restore unpickles the callback from tuner.pkl; it reopens the directory.

    The errored trial runs again from scratch (no checkpoint), re-reports steps 1 and 2 and fails
    again: those reports are delivered twice and must appear once; nothing else changes.
    """
    out_dir = sweep["out_dir"]
    before_trials, before_metrics = R.read_trials(out_dir), R.read_metrics(out_dir)

    restored = tune.Tuner.restore(str(sweep["storage"] / EXPERIMENT), toy_trainable, resume_errored=True)
    restored.fit()

    trials, metrics = R.read_trials(out_dir), R.read_metrics(out_dir)
    assert sorted(trials["trial_id"]) == sorted(before_trials["trial_id"])
    assert len(metrics) == len(before_metrics)
    assert not metrics.duplicated(["trial_id", "step"]).any()
    assert dict(zip(trials["trial_id"], trials["status"])) == dict(
        zip(before_trials["trial_id"], before_trials["status"])
    )
    errored = trials[trials["status"] == "errored"].iloc[0]
    earlier = before_trials.set_index("trial_id").loc[errored["trial_id"]]
    assert errored["updated_at"] > earlier["updated_at"]  # it really ran again
    assert errored["error"] == "ValueError: boom at step 2"
    rerun = metrics[metrics["trial_id"] == errored["trial_id"]]
    assert list(rerun["step"]) == [1, 2]
    assert (rerun["event_seq"] > before_metrics["event_seq"].max()).all()  # the later copy won


def sql(query: str) -> Any:
    """Run a DuckDB query (typed Any: duckdb's stubs allow a None relation)."""
    return duckdb.sql(query)


def _copy_results(src: Path, dst: Path) -> Path:
    """Copy a results directory (compacted files and parts) to ``dst``."""
    import shutil

    shutil.copytree(src, dst)
    return dst


def fake_trial(trial_id: str, config: dict[str, Any] | None = None) -> Any:
    """A stand-in for ray.tune.experiment.Trial (typed Any for the hooks)."""
    return _FakeTrial(trial_id, config)


class _FakeTrial:
    """Just enough of ray.tune.experiment.Trial for direct hook calls."""

    def __init__(self, trial_id: str, config: dict[str, Any] | None = None) -> None:
        self.trial_id = trial_id
        self.config = config or {}
        self.checkpoint = None
        self.pickled_error_file: str | None = None
        self.error_file: str | None = None

    def get_pickled_error(self) -> None:
        return None

    def get_error(self) -> str:
        return "Failure # 1 (occurred at now)\nTraceback...\nRuntimeError: replayed"


def callback(out: Path, sweep_id: str = "s", params: dict[str, str] | None = None, **kw: Any) -> Any:
    """A callback on ``out`` that never flushes on its own (unless told)."""
    kw.setdefault("flush_every", 10**6)
    kw.setdefault("flush_seconds", 10**6)
    return ParquetResultsCallback(out, sweep_id, params if params is not None else {"a": "float"}, "e", **kw)


def n_rows(out: Path, table: str = "metrics") -> int:
    try:
        return R.read_results_table(out, table).num_rows
    except FileNotFoundError:
        return 0


# --------------------------------------------------------------------------- units without Ray


def test_status_rules_and_checkpoint_attribution(tmp_path: Path) -> None:
    cb = callback(tmp_path, params={"kernel.type": "str"})
    stopped, done, diverged = fake_trial("a"), fake_trial("b"), fake_trial("c")
    (tmp_path / "ck1").mkdir()
    (tmp_path / "ck2").mkdir()
    cb.on_trial_start(0, [], stopped)
    cb.on_trial_result(0, [], stopped, report_dict(1, 10.0, "running"))
    cb.on_checkpoint(0, [], stopped, tune.Checkpoint.from_directory(str(tmp_path / "ck1")))
    cb.on_trial_result(0, [], stopped, report_dict(2, 12.0, "running"))
    cb.on_checkpoint(0, [], stopped, tune.Checkpoint.from_directory(str(tmp_path / "ck2")))
    cb.on_trial_complete(0, [], stopped)
    cb.on_trial_result(0, [], done, report_dict(1, 5.0, "completed"))
    cb.on_trial_complete(0, [], done)
    cb.on_trial_result(0, [], diverged, report_dict(1, math.nan, "diverged"))
    cb.on_trial_complete(0, [], diverged)

    trials = R.read_trials(tmp_path).set_index("trial_id")
    assert trials["status"].to_dict() == {"a": "early-stopped", "b": "completed", "c": "diverged"}
    assert trials.loc["a", "best_checkpoint"] == str(tmp_path / "ck1")  # best step 1, not latest
    assert trials.loc["b", "best_checkpoint"] is None or pd.isna(trials.loc["b", "best_checkpoint"])
    assert pd.isna(trials.loc["c", "best_fid"])


def test_recover_records_error_but_keeps_running(tmp_path: Path) -> None:
    cb = callback(tmp_path, params={})
    trial = fake_trial("a")
    cb.on_trial_result(0, [], trial, report_dict(1, 10.0, "running"))
    cb.on_trial_recover(0, [], trial)
    row = R.read_trials(tmp_path).iloc[0]
    assert row["status"] == "running" and row["error"] == "RuntimeError: replayed"


def test_resume_refuses_other_sweep_and_keeps_old_param_columns(tmp_path: Path) -> None:
    cb = callback(tmp_path, "s1", {"a": "int", "b": "str"})
    cb.on_trial_result(0, [], fake_trial("t", {"a": 3, "b": "x"}), report_dict(1, 1.0, "running"))
    cb.flush()
    with pytest.raises(ValueError, match="belongs to sweep 's1'"):
        callback(tmp_path, "s2", {"a": "int"})
    with pytest.raises(ValueError, match="was 'int'"):
        callback(tmp_path, "s1", {"a": "float"})
    resumed = callback(tmp_path, "s1", {"a": "int"})
    resumed.on_trial_start(0, [], fake_trial("t"))
    resumed.flush()
    row = R.read_trials(tmp_path).iloc[0]
    assert row["param.a"] == 3 and row["param.b"] == "x"


def test_callback_pickles_config_only_and_reloads(tmp_path: Path) -> None:
    cb = callback(tmp_path)
    for step in range(1, 6):
        cb.on_trial_result(0, [], fake_trial("t", {"a": 0.5}), report_dict(step, 1.0, "running"))
    cb.flush()
    blob = pickle.dumps(cb)
    assert len(blob) < 2000  # rows are not pickled, only the configuration
    clone = pickle.loads(blob)
    assert clone.writer.trial_rows()["t"].steps == 5
    assert n_rows(tmp_path) == 5


def test_schema_version_refuses_newer_major_and_foreign_files(tmp_path: Path) -> None:
    newer = tmp_path / "newer.parquet"
    pq.write_table(pa.table({"x": [1]}).replace_schema_metadata({R.META_SCHEMA_VERSION: b"3.0"}), newer)
    with pytest.raises(R.SchemaVersionError, match="schema 3.0"):
        R.schema_version(newer)
    minor = tmp_path / "minor.parquet"
    pq.write_table(pa.table({"x": [1]}).replace_schema_metadata({R.META_SCHEMA_VERSION: b"2.3"}), minor)
    assert R.schema_version(minor) == "2.3"
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1]}), foreign)
    with pytest.raises(R.SchemaVersionError, match="no mmdsweep.schema_version"):
        R.schema_version(foreign)
    os.makedirs(tmp_path / "d")
    (tmp_path / "d" / R.TRIALS_FILE).write_bytes(newer.read_bytes())
    with pytest.raises(R.SchemaVersionError):
        R.read_trials(tmp_path / "d")


def test_param_types_validation_and_inference() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        R.trials_schema({"a": "double"})
    space = {
        "finetune": {"lr": tune.loguniform(1e-6, 1e-4)},
        "kernel.type": tune.choice(["rbf", "poly"]),
        "sampler.timesteps": tune.choice([2, 5, 10]),
        "kernel.bandwidth": tune.choice([None, 1, 2.5]),
        "steps": tune.randint(1, 10),
        "seed": 3,
    }
    assert R.param_types_from_space(space) == {
        "finetune.lr": "float",
        "kernel.type": "str",
        "sampler.timesteps": "int",
        "kernel.bandwidth": "float",
        "steps": "int",
        "seed": "int",
    }


# --------------------------------------------------------------------------- append-only parts


def test_results_package_imports_neither_ray_nor_torch() -> None:
    import subprocess

    code = "import sys, mmdsweep.results; print(sorted(m for m in ('ray', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_writes_append_parts_and_never_rewrite(tmp_path: Path) -> None:
    """The old callback rewrote both files whole after every event; parts are written once."""
    cb = callback(tmp_path, flush_every=10)
    trials = [fake_trial(f"t{i}", {"a": float(i)}) for i in range(5)]
    seen: dict[Path, tuple[int, int]] = {}
    for step in range(1, 21):
        for trial in trials:
            cb.on_trial_result(0, [], trial, report_dict(step, 1.0, "running"))
        for _, path in R.list_parts(tmp_path, "metrics"):
            stat = path.stat()
            assert seen.setdefault(path, (stat.st_ino, stat.st_mtime_ns)) == (stat.st_ino, stat.st_mtime_ns)
    assert len(R.list_parts(tmp_path, "metrics")) == 10  # 100 events, a part per 10
    assert not R.results_paths(tmp_path).metrics.exists()  # compacted only when the sweep ends
    assert n_rows(tmp_path) == 100
    cb.on_experiment_end([])
    compacted = pq.read_table(R.results_paths(tmp_path).metrics)
    assert compacted.num_rows == 100
    assert compacted.column("trial_id").to_pylist() == sorted(compacted.column("trial_id").to_pylist())


def test_flush_every_n_events_or_t_seconds(tmp_path: Path) -> None:
    now = [0.0]
    cb = callback(tmp_path, flush_every=3, flush_seconds=5.0)
    cb.writer._clock = lambda: now[0]
    t = fake_trial("t")
    cb.on_trial_result(0, [], t, report_dict(1, 1.0, "running"))
    cb.on_trial_result(0, [], t, report_dict(2, 1.0, "running"))
    assert n_rows(tmp_path) == 0
    cb.on_trial_result(0, [], t, report_dict(3, 1.0, "running"))
    assert n_rows(tmp_path) == 3  # N events
    cb.on_trial_result(0, [], t, report_dict(4, 1.0, "running"))
    now[0] = 4.9
    cb.on_step_end(0, [])
    assert n_rows(tmp_path) == 3
    now[0] = 5.1
    cb.on_step_end(0, [])  # T seconds, without a new event
    assert n_rows(tmp_path) == 4


def test_event_between_flushes_reaches_disk_at_trial_end_and_experiment_end(tmp_path: Path) -> None:
    cb = callback(tmp_path)
    a, b = fake_trial("a"), fake_trial("b")
    cb.on_trial_result(0, [], a, report_dict(1, 1.0, "running"))
    cb.on_trial_result(0, [], b, report_dict(1, 1.0, "running"))
    assert n_rows(tmp_path) == 0
    cb.on_trial_complete(0, [], a)
    assert n_rows(tmp_path) == 2  # everything buffered, not only trial a's
    cb.on_trial_result(0, [], b, report_dict(2, 1.0, "running"))
    cb.on_experiment_end([])
    assert pq.read_table(R.results_paths(tmp_path).metrics).num_rows == 3


_CHILD = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from mmdsweep.results import ResultsWriter
w = ResultsWriter({out!r}, "s", {{}}, "e", flush_every=10**6, flush_seconds=10**6)
w.install_shutdown_hooks()
for step in range(1, 4):
    w.trial_result("t", {{}}, {{"step": step, "loss": 0.5}})
print("ready", flush=True)
mode = {mode!r}
if mode == "exit":
    sys.exit(0)
time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["sigterm", "exit", "sigkill"])
def test_buffered_events_survive_driver_shutdown(tmp_path: Path, mode: str) -> None:
    """SIGTERM and a normal exit flush; after SIGKILL the next writer recovers the write-ahead log."""
    import signal
    import subprocess

    out = tmp_path / "res"
    code = _CHILD.format(root=str(Path(__file__).resolve().parents[1]), out=str(out), mode=mode)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    if mode != "exit":
        proc.send_signal(signal.SIGTERM if mode == "sigterm" else signal.SIGKILL)
    proc.wait(timeout=30)
    if mode == "sigkill":
        assert n_rows(out) == 0 and list((out / ".results-wal").glob("wal-*.jsonl"))
        R.ResultsWriter(out, "s", {}, "e")  # what a resumed sweep does first
        assert not list((out / ".results-wal").glob("wal-*.jsonl"))
    else:
        assert proc.returncode == (0 if mode == "exit" else -signal.SIGTERM)
    metrics = R.read_metrics(out)
    assert metrics["step"].tolist() == [1, 2, 3] and (metrics["loss"] == 0.5).all()


def test_redelivered_report_after_restore_appears_once_with_the_later_values(tmp_path: Path) -> None:
    cb = callback(tmp_path)
    t = fake_trial("t")
    for step in (1, 2, 3):
        cb.on_trial_result(
            0, [], t, {**report_dict(step, 10.0 + step, "running"), "training_iteration": step}
        )
    cb.flush()
    restored = pickle.loads(pickle.dumps(cb))  # what Tuner.restore does
    # Tune restored the trial from its iteration-1 checkpoint: steps 2 and 3 come again
    for step in (2, 3, 4):
        restored.on_trial_result(
            0, [], t, {**report_dict(step, 20.0 + step, "running"), "training_iteration": step}
        )
    restored.on_experiment_end([])
    metrics = R.read_metrics(tmp_path).set_index("step")
    assert metrics.index.tolist() == [1, 2, 3, 4]
    assert metrics["fid"].tolist() == [11.0, 22.0, 23.0, 24.0]
    assert metrics["event_seq"].is_monotonic_increasing


def test_dedup_key_is_the_step_not_tunes_renumbered_iteration(tmp_path: Path) -> None:
    """After a restore Tune numbers iterations from its checkpoint while Train resumes from a later
    one: iteration 2 was step 4 before the restore and is step 6 after it. Both reports stay."""
    cb = callback(tmp_path)
    t = fake_trial("t")
    cb.on_trial_result(0, [], t, {**report_dict(2, 5.0, "running"), "training_iteration": 1})
    cb.on_trial_result(0, [], t, {**report_dict(4, 4.0, "running"), "training_iteration": 2})
    cb.flush()
    restored = pickle.loads(pickle.dumps(cb))
    restored.on_trial_result(0, [], t, {**report_dict(6, 3.0, "completed"), "training_iteration": 2})
    restored.on_experiment_end([])
    metrics = R.read_metrics(tmp_path)
    assert metrics["step"].tolist() == [2, 4, 6]
    assert metrics["training_iteration"].tolist() == [1, 2, 2]


def test_report_carried_after_resume_is_written_as_its_own_row(tmp_path: Path) -> None:
    """Fault 6: the driver died after the run's step-4 checkpoint but before Tune saw the step-4
    report; the resumed run carries that report (``resumed_report``) with its next one."""
    cb = callback(tmp_path)
    t = fake_trial("t")
    cb.on_trial_result(0, [], t, {**report_dict(2, 5.0, "running"), "training_iteration": 1})
    cb.flush()
    restored = pickle.loads(pickle.dumps(cb))
    step4 = report_dict(4, 4.0, "running", checkpoint_path="/ckpt/4")
    restored.on_trial_result(
        0, [], t, {**report_dict(6, 4.5, "completed"), "training_iteration": 2, "resumed_report": step4}
    )
    restored.on_trial_complete(0, [], t)
    restored.on_experiment_end([])
    metrics = R.read_metrics(tmp_path).set_index("step")
    assert metrics.index.tolist() == [2, 4, 6]
    assert metrics.loc[4, "fid"] == 4.0 and pd.isna(metrics.loc[4, "training_iteration"])
    assert not any(c.startswith("resumed_report") for c in metrics.columns)
    trial = R.read_trials(tmp_path).iloc[0]
    assert trial["best_fid"] == 4.0 and trial["best_step"] == 4 and trial["best_checkpoint"] == "/ckpt/4"
    assert trial["final_fid"] == 4.5 and trial["status"] == "completed"


def test_open_columns_types_and_promotion(tmp_path: Path) -> None:
    import numpy as np

    cb = callback(tmp_path, flush_every=1)
    t = fake_trial("t")
    cb.on_trial_result(
        0, [], t, {"step": 1, "n": 1, "x": np.float32(0.5), "flag": np.bool_(True), "tags": [1, 2]}
    )
    cb.on_trial_result(0, [], t, {"step": 2, "n": 2.5, "late": "yes", "time": "reported"})
    table = R.read_results_table(tmp_path, "metrics")
    types = {f.name: f.type for f in table.schema}
    assert types["n"] == pa.float64() and table.column("n").to_pylist() == [1.0, 2.5]  # int part promoted
    assert types["x"] == pa.float64() and types["flag"] == pa.bool_()
    assert table.column("tags").to_pylist() == ["[1, 2]", None]
    assert table.column("late").to_pylist() == [None, "yes"]
    assert table.column("reported.time").to_pylist() == [None, "reported"]  # core name kept free
    assert types["time"] == R.TIMESTAMP_TYPE


def test_parts_sort_newest_first_so_glob_readers_see_every_column(tmp_path: Path) -> None:
    import polars as pl

    cb = callback(tmp_path, flush_every=1)
    t = fake_trial("t")
    cb.on_trial_result(0, [], t, {"step": 1, "loss": 1.0})
    cb.on_trial_result(0, [], t, {"step": 2, "loss": 0.5, "fid@space": 3.0})
    glob = str(tmp_path / "metrics" / "*.parquet")
    frame = pl.read_parquet(glob, missing_columns="insert")
    assert "fid@space" in frame.columns and frame.height == 2
    assert "fid@space" in pd.read_parquet(tmp_path / "metrics").columns
    assert len(sql(f"select * from read_parquet('{glob}', union_by_name=true)").fetchall()[0]) == len(
        frame.columns
    )


def test_temporary_files_are_invisible_to_readers(tmp_path: Path) -> None:
    import polars as pl

    cb = callback(tmp_path, flush_every=1)
    cb.on_trial_result(0, [], fake_trial("t"), {"step": 1, "loss": 1.0})
    (tmp_path / "metrics" / ".part-999999990-deadbeef.parquet.0123.tmp").write_bytes(b"PAR1 torn")
    glob = str(tmp_path / "metrics" / "*.parquet")
    assert pl.read_parquet(glob).height == 1
    assert len(pd.read_parquet(tmp_path / "metrics")) == 1
    assert sql(f"select count(*) from read_parquet('{glob}')").fetchall()[0][0] == 1
    assert n_rows(tmp_path) == 1


def test_compaction_keeps_rows_and_readers_merge_newer_parts(tmp_path: Path) -> None:
    cb = callback(tmp_path, flush_every=2)
    t = fake_trial("t")
    for step in range(1, 6):
        cb.on_trial_result(0, [], t, report_dict(step, float(step), "running"))
    cb.on_experiment_end([])
    before = R.read_metrics(tmp_path)
    assert pq.read_table(tmp_path / "metrics.parquet").num_rows == 5
    resumed = callback(tmp_path, flush_every=1)  # the sweep is resumed after it was compacted
    resumed.on_trial_result(0, [], t, report_dict(6, 6.0, "running"))
    after = R.read_metrics(tmp_path)
    assert len(after) == 6 and pq.read_table(tmp_path / "metrics.parquet").num_rows == 5
    pd.testing.assert_frame_equal(after.iloc[:5], before)
    resumed.on_experiment_end([])
    assert R.compact(tmp_path, prune=True) == {"trials": 1, "metrics": 6}
    assert R.list_parts(tmp_path, "metrics") == []
    assert len(R.read_metrics(tmp_path)) == 6


# --------------------------------------------------------------------------- schema 1

V1_DIR = Path(__file__).parent / "data" / "results_v1"


def test_schema1_files_written_by_the_first_release_are_read(tmp_path: Path) -> None:
    assert R.schema_version(V1_DIR / "metrics.parquet") == "1"
    trials = R.read_trials(V1_DIR).set_index("trial_id")
    assert trials.loc["a0", "status"] == "completed" and trials.loc["b0", "status"] == "errored"
    assert trials.loc["a0", "best_fid"] == 30.0 and trials.loc["a0", "param.sampler.timesteps"] == 5
    metrics = R.read_metrics(V1_DIR)
    assert len(metrics) == 6 and metrics["step"].tolist() == [2, 4, 6, 2, 4, 6]
    assert "world_size" not in metrics.columns  # schema 1 dropped it
    assert metrics["event_seq"].notna().all() and metrics["training_iteration"].isna().all()


def test_schema1_sweep_resumes_and_compacts_to_schema2(tmp_path: Path) -> None:
    out = _copy_results(V1_DIR, tmp_path / "v1")
    cb = ParquetResultsCallback(out, "sweep-v1", {"finetune.lr": "float"}, "digits_v1")
    cb.on_trial_result(
        0,
        [],
        fake_trial("c0", {"finetune.lr": 1e-3}),
        {**report_dict(2, 50.0, "running"), "training_iteration": 1},
    )
    cb.on_experiment_end([])
    assert R.schema_version(out / "metrics.parquet") == "2"
    metrics = R.read_metrics(out)
    assert len(metrics) == 7 and metrics["trial_id"].tolist().count("a0") == 3
    assert metrics.loc[metrics["trial_id"] == "c0", "world_size"].tolist() == [2]
    trials = R.read_trials(out).set_index("trial_id")
    assert set(trials.index) == {"a0", "b0", "c0"} and trials.loc["a0", "best_fid"] == 30.0
    assert trials.loc["a0", "param.sampler.timesteps"] == 5  # a parameter of the first run only


def test_trial_error_names_the_worker_exception_behind_ray_train_wrappers() -> None:
    """Ray Train reports a failed trial as WorkerGroupError; the row names the worker's error."""
    from types import SimpleNamespace

    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback, WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from mmdsweep.sweep.callback import trial_error_message

    def message(exc: BaseException, tmp: Path | None = None) -> str:
        if tmp is None:
            return trial_error_message(
                SimpleNamespace(pickled_error_file=None, get_pickled_error=lambda: exc)
            )
        path = tmp / "error.pkl"  # as Tune writes it: cloudpickle of the exception
        path.write_bytes(ray.cloudpickle.dumps(exc))
        return trial_error_message(SimpleNamespace(pickled_error_file=str(path)))

    user = UserExceptionWithTraceback(
        ValueError("kernel bandwidth must be > 0\nsecond line"), "Traceback ..."
    )
    other = UserExceptionWithTraceback(RuntimeError("rank 3 failed too"), "Traceback ...")
    group = WorkerGroupError("[Rank 1] ...\n[Rank 3] ...", {3: other, 1: user})
    with tempfile.TemporaryDirectory() as tmp:
        assert message(group, Path(tmp)) == "ValueError: kernel bandwidth must be > 0 (worker rank 1)"
    assert (
        message(ControllerError(RuntimeError("no checkpoint to resume")))
        == "RuntimeError: no checkpoint to resume"
    )

    died = ActorDiedError(
        ActorDiedErrorContext(
            error_message="The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR "
            "Worker exit detail: Task was killed due to the node running low on memory.",
            actor_id=b"\x01" * 16,
            class_name="RayTrainWorker",
        )
    )
    killed = WorkerGroupError(
        "[Rank 0] ...", {0: WorkerHealthCheckFailedError("Worker health check failed.", died)}
    )
    got = message(killed)
    assert got.startswith("ActorDiedError: The actor died unexpectedly") and got.endswith(
        "(worker rank 0)"
    ), got
    assert "running low on memory" in got, got
    assert message(ValueError("plain")) == "ValueError: plain"
