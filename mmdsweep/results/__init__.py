"""Parquet results layer for mmdsweep sweeps.

A sweep writes two small Parquet files into its results directory:

* ``trials.parquet`` -- one row per Tune trial (searched parameters, status,
  best/final FID and KID, checkpoint, error).
* ``metrics.parquet`` -- one row per report (``ray.tune.report``) of a trial.

Both files are rewritten atomically by :class:`ParquetResultsCallback` after
every event, so a notebook may read them at any time while the sweep runs.
The column layout is documented in ``docs/results.md`` ("Parquet results
schema"); this module is the single source of truth for it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from ray.tune import Callback

from mmdsweep.fsio import atomic_path
from mmdsweep.results.layout import METRICS_FILE, TRIALS_FILE  # the directory layout is defined there

if TYPE_CHECKING:
    import pandas as pd
    from ray.train import Checkpoint  # base class of ray.tune.Checkpoint
    from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
"""Version of the Parquet layout: ``MAJOR`` or ``MAJOR.MINOR``.

A minor bump only adds nullable columns; a major bump may rename, retype or
remove columns. Readers refuse files written with a newer major version.
"""


META_SCHEMA_VERSION = b"mmdsweep.schema_version"
META_SWEEP_ID = b"mmdsweep.sweep_id"
META_EXPERIMENT_NAME = b"mmdsweep.experiment_name"
META_TABLE = b"mmdsweep.table"
META_PARAM_TYPES = b"mmdsweep.param_types"

PARAM_PREFIX = "param."

STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_EARLY_STOPPED = "early-stopped"
STATUS_DIVERGED = "diverged"
STATUS_ERRORED = "errored"
TRIAL_STATUSES = (STATUS_RUNNING, STATUS_COMPLETED, STATUS_EARLY_STOPPED, STATUS_DIVERGED, STATUS_ERRORED)

TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")

PARAM_ARROW_TYPES: dict[str, pa.DataType] = {
    "float": pa.float64(),
    "int": pa.int64(),
    "str": pa.string(),
}

METRICS_SCHEMA = pa.schema(
    [
        pa.field("sweep_id", pa.string(), nullable=False),
        pa.field("trial_id", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("loss", pa.float64()),
        pa.field("fid", pa.float64()),
        pa.field("kid", pa.float64()),
        pa.field("bandwidth", pa.float64()),
        pa.field("lr", pa.float64()),
        pa.field("elapsed_s", pa.float64()),
        pa.field("timesteps", pa.int64()),
        pa.field("time", TIMESTAMP_TYPE, nullable=False),
        pa.field("sample_time_per_image_s", pa.float64()),
    ]
)
"""Schema of ``metrics.parquet`` (without the file metadata)."""

_TRIAL_KEY_FIELDS = [
    pa.field("sweep_id", pa.string(), nullable=False),
    pa.field("trial_id", pa.string(), nullable=False),
]
_TRIAL_RESULT_FIELDS = [
    pa.field("status", pa.string(), nullable=False),
    pa.field("best_fid", pa.float64()),
    pa.field("best_kid", pa.float64()),
    pa.field("final_fid", pa.float64()),
    pa.field("final_kid", pa.float64()),
    pa.field("best_step", pa.int64()),
    pa.field("steps", pa.int64()),
    pa.field("timesteps", pa.int64()),
    pa.field("wall_time_s", pa.float64()),
    pa.field("num_eval_samples", pa.int64()),
    pa.field("best_checkpoint", pa.string()),
    pa.field("error", pa.string()),
    pa.field("started_at", TIMESTAMP_TYPE, nullable=False),
    pa.field("updated_at", TIMESTAMP_TYPE, nullable=False),
]


class SchemaVersionError(ValueError):
    """A Parquet file is not an mmdsweep results file or is too new to read."""


class ResultsPaths(NamedTuple):
    """Locations of the two result files of one sweep."""

    trials: Path
    metrics: Path


# --------------------------------------------------------------------------- schemas


def _normalize_param_types(param_types: Mapping[str, str]) -> dict[str, str]:
    """Validate ``{dotted name: "float"|"int"|"str"}`` and return a sorted copy."""
    out: dict[str, str] = {}
    for name in sorted(param_types):
        kind = param_types[name]
        if not isinstance(name, str) or not name:
            raise ValueError(f"parameter names must be non-empty strings, got {name!r}")
        if kind not in PARAM_ARROW_TYPES:
            raise ValueError(
                f"parameter {name!r} has type {kind!r}; expected one of {sorted(PARAM_ARROW_TYPES)}"
            )
        out[name] = kind
    return out


def param_column(name: str) -> str:
    """Column name in ``trials.parquet`` of the searched parameter ``name``."""
    return PARAM_PREFIX + name


def trials_schema(param_types: Mapping[str, str]) -> pa.Schema:
    """Schema of ``trials.parquet`` for a sweep searching ``param_types``."""
    types = _normalize_param_types(param_types)
    params = [pa.field(param_column(name), PARAM_ARROW_TYPES[kind]) for name, kind in types.items()]
    return pa.schema(_TRIAL_KEY_FIELDS + params + _TRIAL_RESULT_FIELDS)


def file_metadata(
    table: str, sweep_id: str, experiment_name: str, param_types: Mapping[str, str]
) -> dict[bytes, bytes]:
    """Key-value metadata stored in both Parquet files."""
    return {
        META_SCHEMA_VERSION: SCHEMA_VERSION.encode(),
        META_TABLE: table.encode(),
        META_SWEEP_ID: sweep_id.encode(),
        META_EXPERIMENT_NAME: experiment_name.encode(),
        META_PARAM_TYPES: json.dumps(_normalize_param_types(param_types), sort_keys=True).encode(),
    }


def param_types_from_space(space: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Infer ``{dotted name: "float"|"int"|"str"}`` from a search space.

    Understands Ray Tune domains (``tune.uniform``, ``tune.randint``,
    ``tune.choice``, ...), Optuna distributions and plain constants; nested
    dicts are flattened with dots. Categorical values that are all integers
    give ``"int"``, all real numbers ``"float"``, anything else ``"str"``.
    """
    out: dict[str, str] = {}
    for key, value in space.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(param_types_from_space(value, prefix=f"{name}."))
        else:
            out[name] = _domain_kind(value)
    return out


def _domain_kind(domain: Any) -> str:
    """Column kind of one search-space entry (see :func:`param_types_from_space`)."""
    cls = type(domain).__name__
    if cls in ("Float", "FloatDistribution", "UniformDistribution", "LogUniformDistribution"):
        return "float"
    if cls in ("Integer", "IntDistribution", "IntUniformDistribution", "IntLogUniformDistribution"):
        return "int"
    for attr in ("categories", "choices"):  # tune.choice / optuna CategoricalDistribution
        if hasattr(domain, attr):
            return _values_kind(getattr(domain, attr))
    if isinstance(domain, dict) and "grid_search" in domain:
        return _values_kind(domain["grid_search"])
    return _values_kind([domain])


def _values_kind(values: Iterable[Any]) -> str:
    """``"int"``, ``"float"`` or ``"str"`` for a collection of plain values."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "int"
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "float"
    return "str"


# --------------------------------------------------------------------------- writing


def atomic_write_table(table: pa.Table, path: str | os.PathLike[str], **write_options: Any) -> None:
    """Write ``table`` as Parquet to ``path`` atomically.

    The table is written to a hidden temporary file in the same directory,
    fsynced and moved over ``path`` with :func:`os.replace`. If anything fails
    the temporary file is removed and ``path`` keeps its previous content.
    Extra keyword arguments go to :func:`pyarrow.parquet.write_table`.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        pq.write_table(table, fh, **write_options)


# --------------------------------------------------------------------------- value coercion


def _utcnow() -> dt.datetime:
    """Current time, timezone-aware UTC."""
    return dt.datetime.now(dt.timezone.utc)


def _as_float(value: Any) -> float | None:
    """``float(value)``; ``None`` for missing or unconvertible values (NaN kept)."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _finite(value: Any) -> float | None:
    """``float(value)`` if finite, else ``None`` (NaN means "not evaluated")."""
    out = _as_float(value)
    return out if out is not None and math.isfinite(out) else None


def _as_int(value: Any) -> int | None:
    """``int(value)`` for integral values; ``None`` for missing or non-integral."""
    number = _as_float(value) if not isinstance(value, int) else value
    if number is None or (isinstance(number, float) and not number.is_integer()):
        return None
    return int(number)


def _coerce_param(name: str, value: Any, kind: str) -> Any:
    """Convert a config value to the column ``kind``; ``None`` stays null."""
    if value is None:
        return None
    if kind == "str":
        return str(value)
    converted = _as_int(value) if kind == "int" else _as_float(value)
    if converted is None:
        logger.warning("parameter %s=%r is not a valid %s; stored as null", name, value, kind)
    return converted


def _config_value(config: Mapping[str, Any], dotted: str) -> Any:
    """Look ``dotted`` up in a flat config, falling back to nested dicts."""
    if dotted in config:
        return config[dotted]
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _checkpoint_uri(checkpoint: Checkpoint | None) -> str | None:
    """Location of a Tune checkpoint: a local path or a ``scheme://`` URI."""
    if checkpoint is None:
        return None
    path = str(checkpoint.path)
    fs_type = getattr(getattr(checkpoint, "filesystem", None), "type_name", "local")
    if fs_type in ("local", "") or "://" in path:
        return path
    return f"{fs_type}://{path}"


def _first_line(text: str) -> str:
    """First non-empty line of ``text`` (stripped)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return text.strip()


def _format_exception(exc: BaseException) -> str:
    """``"Type: first line"`` of the user's exception behind a Ray error."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    message = _first_line(str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def trial_error_message(trial: Trial) -> str:
    """First line of the error that made ``trial`` fail, as ``"Type: message"``.

    Tune's error hooks get no exception object; Tune has just written the
    error (pickled, and as text) into the trial's driver-side directory, so it
    is read from there, then from the trial's storage as a fallback.
    """
    exc = _pickled_trial_error(trial)
    if exc is not None:
        return _format_exception(exc)
    text = _text_trial_error(trial)
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Failure #")]
    # The last line of a traceback names the exception and its message.
    return lines[-1] if lines else "unknown error"


def _pickled_trial_error(trial: Trial) -> BaseException | None:
    """The trial's pickled error, from the driver's staging dir or storage."""
    import ray.cloudpickle as cloudpickle

    with contextlib.suppress(Exception):
        local = trial.pickled_error_file
        if local and os.path.exists(local):
            with open(local, "rb") as fh:
                return cloudpickle.load(fh)
    with contextlib.suppress(Exception):
        return trial.get_pickled_error()
    return None


def _text_trial_error(trial: Trial) -> str | None:
    """The trial's error text file, from the driver's staging dir or storage."""
    with contextlib.suppress(Exception):
        local = trial.error_file
        if local and os.path.exists(local):
            return Path(local).read_text()
    with contextlib.suppress(Exception):
        return trial.get_error()  # type: ignore[return-value]
    return None


# --------------------------------------------------------------------------- in-memory tables


@dataclass
class _TrialRow:
    """Mutable state of one trial; becomes one row of ``trials.parquet``."""

    trial_id: str
    params: dict[str, Any]
    started_at: dt.datetime
    updated_at: dt.datetime
    status: str = STATUS_RUNNING
    best_fid: float | None = None
    best_kid: float | None = None
    final_fid: float | None = None
    final_kid: float | None = None
    best_step: int | None = None
    steps: int | None = None
    timesteps: int | None = None
    wall_time_s: float | None = None
    num_eval_samples: int | None = None
    best_checkpoint: str | None = None
    error: str | None = None
    # Driver-side only, not stored:
    latest_checkpoint: str | None = field(default=None, repr=False)
    last_step: int | None = field(default=None, repr=False)

    def apply_report(self, step: int, report: Mapping[str, Any], now: dt.datetime) -> None:
        """Fold one Tune report into the row."""
        self.status = _status_of_report(report.get("status"))
        self.steps = step
        self.last_step = step
        self.updated_at = now
        self._apply_scores(step, report)
        for attr, key in (("timesteps", "timesteps"), ("num_eval_samples", "num_eval_samples")):
            value = _as_int(report.get(key))
            if value is not None:
                setattr(self, attr, value)
        elapsed = _as_float(report.get("elapsed_s"))
        if elapsed is not None:
            self.wall_time_s = elapsed

    def _apply_scores(self, step: int, report: Mapping[str, Any]) -> None:
        """Update best/final FID and KID and the best step's checkpoint."""
        fid, kid = _finite(report.get("fid")), _finite(report.get("kid"))
        if fid is not None:
            self.final_fid = fid
            if self.best_fid is None or fid < self.best_fid:
                self.best_fid, self.best_step = fid, step
                self.best_checkpoint = _reported_checkpoint(report)
            elif step == self.best_step and _reported_checkpoint(report):
                self.best_checkpoint = _reported_checkpoint(report)
        if kid is not None:
            self.final_kid = kid
            if self.best_kid is None or kid < self.best_kid:
                self.best_kid = kid

    def record_checkpoint(self, uri: str | None) -> None:
        """A Tune checkpoint arrived; it belongs to the trial's latest report."""
        if uri is None:
            return
        self.latest_checkpoint = uri
        if self.best_checkpoint is None and self.last_step is not None and self.last_step == self.best_step:
            self.best_checkpoint = uri

    def to_record(self, sweep_id: str, param_types: Mapping[str, str]) -> dict[str, Any]:
        """Row as a dict keyed by ``trials.parquet`` column names."""
        record: dict[str, Any] = {"sweep_id": sweep_id, "trial_id": self.trial_id}
        for name, kind in param_types.items():
            record[param_column(name)] = _coerce_param(name, self.params.get(name), kind)
        for fld in _TRIAL_RESULT_FIELDS:
            record[fld.name] = getattr(self, fld.name)
        if record["best_checkpoint"] is None:
            record["best_checkpoint"] = self.latest_checkpoint
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> _TrialRow:
        """Rebuild a row read back from ``trials.parquet``."""
        params = {
            key[len(PARAM_PREFIX) :]: value for key, value in record.items() if key.startswith(PARAM_PREFIX)
        }
        known = {fld.name for fld in _TRIAL_RESULT_FIELDS}
        values = {key: value for key, value in record.items() if key in known}
        return cls(trial_id=record["trial_id"], params=params, **values)


def _status_of_report(value: Any) -> str:
    """Trial status implied by a report's ``status`` field."""
    if value == STATUS_DIVERGED:
        return STATUS_DIVERGED
    if value == STATUS_COMPLETED:
        return STATUS_COMPLETED
    return STATUS_RUNNING


def _reported_checkpoint(report: Mapping[str, Any]) -> str | None:
    """The ``checkpoint_path`` a trial reported itself, if any."""
    value = report.get("checkpoint_path")
    return str(value) if value else None


class _MetricsRows:
    """Column-wise store of metrics rows, unique on ``(trial_id, step)``.

    A report for a ``(trial_id, step)`` already stored replaces the old row
    (a trial restored from an older checkpoint re-reports steps).
    """

    def __init__(self) -> None:
        self._columns: dict[str, list[Any]] = {name: [] for name in METRICS_SCHEMA.names}
        self._index: dict[tuple[str, int], int] = {}

    def __len__(self) -> int:
        return len(self._index)

    def upsert(self, row: Mapping[str, Any]) -> None:
        """Insert ``row`` or replace the row with the same trial and step."""
        key = (row["trial_id"], row["step"])
        position = self._index.get(key)
        if position is None:
            self._index[key] = len(self._columns["step"])
            for name, column in self._columns.items():
                column.append(row.get(name))
        else:
            for name, column in self._columns.items():
                column[position] = row.get(name)

    def to_table(self, metadata: Mapping[bytes, bytes]) -> pa.Table:
        """All rows, sorted by trial and step, as an Arrow table."""
        table = pa.Table.from_pydict(self._columns, schema=METRICS_SCHEMA.with_metadata(metadata))
        return table.sort_by([("trial_id", "ascending"), ("step", "ascending")])


def _metrics_row(
    sweep_id: str, trial_id: str, step: int, report: Mapping[str, Any], now: dt.datetime
) -> dict:
    """One ``metrics.parquet`` row from a Tune report."""
    return {
        "sweep_id": sweep_id,
        "trial_id": trial_id,
        "step": step,
        "loss": _as_float(report.get("loss")),
        "fid": _finite(report.get("fid")),
        "kid": _finite(report.get("kid")),
        "bandwidth": _finite(report.get("bandwidth")),
        "lr": _as_float(report.get("lr")),
        "elapsed_s": _as_float(report.get("elapsed_s")),
        "timesteps": _as_int(report.get("timesteps")),
        "time": now,
        "sample_time_per_image_s": _finite(report.get("sample_time_per_image_s")),
    }


def _report_step(report: Mapping[str, Any]) -> int:
    """The report's ``step``; Tune's ``training_iteration`` if it has none."""
    step = _as_int(report.get("step"))
    if step is None:
        step = _as_int(report.get("training_iteration"))
    return step if step is not None else 0


# --------------------------------------------------------------------------- the callback


class ParquetResultsCallback(Callback):
    """Tune callback that keeps ``trials.parquet`` and ``metrics.parquet`` current.

    Args:
        out_dir: Local directory of the sweep's results (created if missing).
        sweep_id: Identifier stored in every row and in the file metadata.
        param_types: Searched parameters, ``{dotted name: "float"|"int"|"str"}``.
        experiment_name: Tune experiment name, stored in the file metadata.

    If the files exist already (a resumed sweep), they are loaded: trials keep
    their rows and metrics rows are deduplicated on ``(trial_id, step)``.
    Tune pickles callbacks into ``tuner.pkl`` and ``Tuner.restore`` unpickles
    them without calling ``__init__``; unpickling therefore reloads the files
    from ``out_dir`` as well. Tune calls the hooks from its driver loop
    thread; the callback is not meant to be shared between threads.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        sweep_id: str,
        param_types: Mapping[str, str],
        experiment_name: str,
    ) -> None:
        if not sweep_id:
            raise ValueError("sweep_id must be a non-empty string")
        self.out_dir = Path(out_dir)
        self.sweep_id = sweep_id
        self.experiment_name = experiment_name
        self.param_types = _normalize_param_types(param_types)
        self._reset()

    # ---- pickling (Tuner stores callbacks in tuner.pkl) --------------------

    def __getstate__(self) -> dict[str, Any]:
        """Pickle only the configuration; the data lives in the files."""
        return {
            "out_dir": str(self.out_dir),
            "sweep_id": self.sweep_id,
            "experiment_name": self.experiment_name,
            "param_types": dict(self.param_types),
        }

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        """Restore the configuration and reload the files written so far."""
        self.out_dir = Path(state["out_dir"])
        self.sweep_id = state["sweep_id"]
        self.experiment_name = state["experiment_name"]
        self.param_types = _normalize_param_types(state["param_types"])
        self._reset()

    def _reset(self) -> None:
        """Empty in-memory tables, then load what ``out_dir`` already holds."""
        self._trials: dict[str, _TrialRow] = {}
        self._metrics = _MetricsRows()
        self._dirty_trials = True
        self._dirty_metrics = True
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._load_existing()

    def _load_existing(self) -> None:
        """Load rows of a previous run of this sweep (resume)."""
        paths = self.paths
        if paths.trials.exists():
            table = self._read_own(paths.trials)
            self._merge_param_types(table.schema.metadata or {})
            for record in table.to_pylist():
                self._trials[record["trial_id"]] = _TrialRow.from_record(record)
        if paths.metrics.exists():
            for record in self._read_own(paths.metrics).to_pylist():
                self._metrics.upsert(record)

    def _read_own(self, path: Path) -> pa.Table:
        """Read a results file, checking its version and that it is this sweep's."""
        schema_version(path)
        table = pq.read_table(path)
        found = (table.schema.metadata or {}).get(META_SWEEP_ID, b"").decode()
        if found != self.sweep_id:
            raise ValueError(f"{path} belongs to sweep {found!r}, not {self.sweep_id!r}")
        return table

    def _merge_param_types(self, metadata: Mapping[bytes, bytes]) -> None:
        """Keep parameter columns of an earlier run that this run does not list."""
        previous = json.loads(metadata.get(META_PARAM_TYPES, b"{}").decode())
        for name, kind in previous.items():
            current = self.param_types.get(name)
            if current is not None and current != kind:
                raise ValueError(f"parameter {name!r} was {kind!r} in the existing results, now {current!r}")
        self.param_types = _normalize_param_types({**previous, **self.param_types})

    # ---- public helpers ----------------------------------------------------

    @property
    def paths(self) -> ResultsPaths:
        """Paths of the two result files."""
        return results_paths(self.out_dir)

    def flush(self, force: bool = False) -> None:
        """Rewrite the result files that changed (both with ``force``)."""
        if self._dirty_trials or force:
            atomic_write_table(self.trials_table(), self.paths.trials)
            self._dirty_trials = False
        if self._dirty_metrics or force:
            atomic_write_table(self._metrics.to_table(self._metadata("metrics")), self.paths.metrics)
            self._dirty_metrics = False

    def trials_table(self) -> pa.Table:
        """Current content of ``trials.parquet`` as an Arrow table."""
        schema = trials_schema(self.param_types).with_metadata(self._metadata("trials"))
        records = [row.to_record(self.sweep_id, self.param_types) for row in self._trials.values()]
        return pa.Table.from_pylist(records, schema=schema)

    def metrics_table(self) -> pa.Table:
        """Current content of ``metrics.parquet`` as an Arrow table."""
        return self._metrics.to_table(self._metadata("metrics"))

    def _metadata(self, table: str) -> dict[bytes, bytes]:
        """File metadata for ``table`` ("trials" or "metrics")."""
        return file_metadata(table, self.sweep_id, self.experiment_name, self.param_types)

    def _row(self, trial: Trial) -> _TrialRow:
        """The row of ``trial``, created on first sight."""
        row = self._trials.get(trial.trial_id)
        if row is None:
            now = _utcnow()
            params = {name: _config_value(trial.config or {}, name) for name in self.param_types}
            row = _TrialRow(trial_id=trial.trial_id, params=params, started_at=now, updated_at=now)
            self._trials[trial.trial_id] = row
            self._dirty_trials = True
        return row

    # ---- Tune hooks --------------------------------------------------------

    def setup(self, stop: Any = None, num_samples: Any = None, total_num_samples: Any = None, **info: Any):
        """Write the (possibly empty or reloaded) files before the first trial."""
        self.flush(force=True)

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        """Add the trial's row; a restarted finished trial is running again."""
        row = self._row(trial)
        if row.status != STATUS_RUNNING:
            row.status, row.updated_at = STATUS_RUNNING, _utcnow()
            self._dirty_trials = True
        self.flush()

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any):
        """Append a metrics row and update the trial's row."""
        now = _utcnow()
        step = _report_step(result)
        self._metrics.upsert(_metrics_row(self.sweep_id, trial.trial_id, step, result, now))
        self._row(trial).apply_report(step, result, now)
        self._dirty_metrics = self._dirty_trials = True
        self.flush()

    def on_checkpoint(
        self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: Checkpoint, **info: Any
    ):
        """Attribute a Tune checkpoint to the trial's latest report."""
        self._row(trial).record_checkpoint(_checkpoint_uri(checkpoint))
        self._dirty_trials = True
        self.flush()

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        """Record the error of a failure Tune will retry; the trial keeps running."""
        row = self._row(trial)
        row.error, row.updated_at = trial_error_message(trial), _utcnow()
        self._dirty_trials = True
        self.flush()

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        """Mark the trial errored with the first line of its error."""
        row = self._row(trial)
        row.status, row.error, row.updated_at = STATUS_ERRORED, trial_error_message(trial), _utcnow()
        self._dirty_trials = True
        self.flush()

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        """Finish the row: completed/diverged as reported, otherwise early-stopped."""
        row = self._row(trial)
        if row.status not in (STATUS_COMPLETED, STATUS_DIVERGED):
            row.status = STATUS_EARLY_STOPPED
        if row.latest_checkpoint is None:
            row.latest_checkpoint = _checkpoint_uri(trial.checkpoint)
        row.updated_at = _utcnow()
        self._dirty_trials = True
        self.flush()

    def on_experiment_end(self, trials: list[Trial], **info: Any):
        """Final rewrite of both files."""
        self.flush(force=True)


# --------------------------------------------------------------------------- reading


def results_paths(results_dir: str | os.PathLike[str]) -> ResultsPaths:
    """Paths of ``trials.parquet`` and ``metrics.parquet`` in ``results_dir``."""
    base = Path(results_dir)
    return ResultsPaths(trials=base / TRIALS_FILE, metrics=base / METRICS_FILE)


def _major(version: str) -> int:
    """Major part of a ``MAJOR[.MINOR]`` version string."""
    try:
        return int(version.split(".", 1)[0])
    except ValueError as exc:
        raise SchemaVersionError(f"malformed mmdsweep schema version {version!r}") from exc


def schema_version(path: str | os.PathLike[str]) -> str:
    """Schema version of a results file; refuses files of a newer major version.

    Raises:
        SchemaVersionError: the file has no mmdsweep version metadata, or was
            written by a newer major schema than this code understands.
    """
    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(META_SCHEMA_VERSION)
    if raw is None:
        raise SchemaVersionError(f"{path} has no {META_SCHEMA_VERSION.decode()} metadata")
    version = raw.decode()
    if _major(version) > _major(SCHEMA_VERSION):
        raise SchemaVersionError(
            f"{path} was written with results schema {version}; this mmdsweep reads schema "
            f"{SCHEMA_VERSION} (major {_major(SCHEMA_VERSION)}). Upgrade mmdsweep to read it."
        )
    return version


def read_table(path: str | os.PathLike[str]) -> pa.Table:
    """Read one results file as an Arrow table after checking its version."""
    schema_version(path)
    return pq.read_table(path)


def _pandas_type(arrow_type: pa.DataType) -> Any:
    """Keep integer columns integral in pandas (nullable ``Int64``)."""
    import pandas as pd

    return pd.Int64Dtype() if pa.types.is_integer(arrow_type) else None


def read_trials(results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """``trials.parquet`` of a sweep as a DataFrame (integers as ``Int64``)."""
    return read_table(results_paths(results_dir).trials).to_pandas(types_mapper=_pandas_type)


def read_metrics(results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """``metrics.parquet`` of a sweep as a DataFrame (integers as ``Int64``)."""
    return read_table(results_paths(results_dir).metrics).to_pandas(types_mapper=_pandas_type)
