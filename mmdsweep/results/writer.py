"""The append-only writer behind the sweep's results callback (no Ray, no torch).

:class:`ResultsWriter` turns trial events (start, report, checkpoint, error, completion) into
rows of the ``trials`` and ``metrics`` tables and writes them as immutable part files
(:mod:`mmdsweep.results.files`), one pair per *flush*: every ``flush_every`` events, when the
oldest unwritten event is ``flush_seconds`` old, when a trial ends, on :meth:`close` (the sweep
ends: then the parts are compacted into ``trials.parquet``/``metrics.parquet``), at interpreter
exit and on SIGTERM (:meth:`install_shutdown_hooks`). The cost per event is constant: nothing
already written is read or rewritten.

Crash safety: before an event is buffered it is appended as one JSON line to a write-ahead log
``.results-wal/wal-<seq>-<token>.jsonl`` (one per flush; deleted once its parts are written).
A driver killed with SIGKILL loses no event it had received: the next writer on the directory
(a resumed sweep) writes the log's events as the parts they were meant to become.

Resume: a writer opened on a directory that already holds results continues it (part and event
sequence numbers, trial rows with their best scores); a report delivered again after a restore
is written again and readers keep the last row per ``(trial_id, step)``.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import logging
import math
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from mmdsweep.results import files
from mmdsweep.results.reader import check_version, read_results_table
from mmdsweep.results.schema import (
    META_COMPACTED_THROUGH,
    META_PARAM_TYPES,
    META_SCHEMA_VERSION,
    META_SWEEP_ID,
    METRICS_CORE_SCHEMA,
    PARAM_PREFIX,
    RESUMED_REPORT_KEY,
    SCHEMA_VERSION,
    STATUS_COMPLETED,
    STATUS_DIVERGED,
    STATUS_EARLY_STOPPED,
    STATUS_ERRORED,
    STATUS_RUNNING,
    TIMESTAMP_TYPE,
    TRIAL_RESULT_FIELDS,
    file_metadata,
    flatten_report,
    normalize_param_types,
    param_column,
    python_value,
    trials_schema,
    value_type,
    wider_type,
)

logger = logging.getLogger(__name__)

META_LAST_EVENT_SEQ = b"mmdsweep.last_event_seq"
_CORE = set(METRICS_CORE_SCHEMA.names)
_TIME_FIELDS = ("time", "started_at", "updated_at")

# --------------------------------------------------------------------------- value coercion


def utcnow() -> dt.datetime:
    """Current time, timezone-aware UTC."""
    return dt.datetime.now(dt.timezone.utc)


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _finite(value: Any) -> float | None:
    out = _as_float(value)
    return out if out is not None and math.isfinite(out) else None


def _as_int(value: Any) -> int | None:
    number = _as_float(value) if not isinstance(value, int) else value
    if number is None or (isinstance(number, float) and not number.is_integer()):
        return None
    return int(number)


def _coerce_param(name: str, value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "str":
        return str(value)
    converted = _as_int(value) if kind == "int" else _as_float(value)
    if converted is None:
        logger.warning("parameter %s=%r is not a valid %s; stored as null", name, value, kind)
    return converted


def config_value(config: Mapping[str, Any], dotted: str) -> Any:
    """Look ``dotted`` up in a flat config, falling back to nested dicts."""
    if dotted in config:
        return config[dotted]
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def report_step(report: Mapping[str, Any]) -> int:
    """The report's ``step``; Tune's ``training_iteration`` if it has none."""
    step = _as_int(report.get("step"))
    if step is None:
        step = _as_int(report.get("training_iteration"))
    return step if step is not None else 0


# --------------------------------------------------------------------------- trial rows


@dataclass
class TrialRow:
    """Mutable state of one trial; becomes one row of ``trials``."""

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
    latest_checkpoint: str | None = field(default=None, repr=False)  # driver-side only
    last_step: int | None = field(default=None, repr=False)

    def apply_report(self, step: int, report: Mapping[str, Any], now: dt.datetime) -> None:
        """Fold one report into the row."""
        self.status = _status_of_report(report.get("status"))
        self.steps = step
        self.last_step = step
        self.updated_at = now
        fid, kid = _finite(report.get("fid")), _finite(report.get("kid"))
        reported_ckpt = str(report["checkpoint_path"]) if report.get("checkpoint_path") else None
        if fid is not None:
            self.final_fid = fid
            if self.best_fid is None or fid < self.best_fid:
                self.best_fid, self.best_step = fid, step
                self.best_checkpoint = reported_ckpt
            elif step == self.best_step and reported_ckpt:
                self.best_checkpoint = reported_ckpt
        if kid is not None:
            self.final_kid = kid
            if self.best_kid is None or kid < self.best_kid:
                self.best_kid = kid
        for attr in ("timesteps", "num_eval_samples"):
            value = _as_int(report.get(attr))
            if value is not None:
                setattr(self, attr, value)
        elapsed = _as_float(report.get("elapsed_s"))
        if elapsed is not None:
            self.wall_time_s = elapsed

    def record_checkpoint(self, uri: str | None) -> None:
        """A Tune checkpoint arrived; it belongs to the trial's latest report."""
        if uri is None:
            return
        self.latest_checkpoint = uri
        if self.best_checkpoint is None and self.last_step is not None and self.last_step == self.best_step:
            self.best_checkpoint = uri

    def to_record(self, sweep_id: str, param_types: Mapping[str, str]) -> dict[str, Any]:
        """Row as a dict keyed by ``trials`` column names (without ``event_seq``)."""
        record: dict[str, Any] = {"sweep_id": sweep_id, "trial_id": self.trial_id}
        for name, kind in param_types.items():
            record[param_column(name)] = _coerce_param(name, self.params.get(name), kind)
        for fld in TRIAL_RESULT_FIELDS:
            record[fld.name] = getattr(self, fld.name)
        if record["best_checkpoint"] is None:
            record["best_checkpoint"] = self.latest_checkpoint
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrialRow:
        """Rebuild a row read back from ``trials``."""
        params = {k[len(PARAM_PREFIX) :]: v for k, v in record.items() if k.startswith(PARAM_PREFIX)}
        known = {fld.name for fld in TRIAL_RESULT_FIELDS}
        values = {k: v for k, v in record.items() if k in known}
        row = cls(trial_id=record["trial_id"], params=params, **values)
        row.last_step = row.steps
        return row


def _status_of_report(value: Any) -> str:
    if value == STATUS_DIVERGED:
        return STATUS_DIVERGED
    if value == STATUS_COMPLETED:
        return STATUS_COMPLETED
    return STATUS_RUNNING


# --------------------------------------------------------------------------- JSON lines


def _to_json(row: Mapping[str, Any]) -> str:
    out = {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in row.items()}
    return json.dumps(out, default=str)  # NaN/inf as JSON5-style literals; json reads them back


def _from_json(line: str) -> dict[str, Any]:
    row = json.loads(line)
    for key in _TIME_FIELDS:
        if isinstance(row.get(key), str):
            row[key] = dt.datetime.fromisoformat(row[key])
    return row


# --------------------------------------------------------------------------- the writer

_OPEN_WRITERS: weakref.WeakSet[ResultsWriter] = weakref.WeakSet()


def _flush_open_writers() -> None:
    """atexit: write what every open writer still buffers."""
    for writer in list(_OPEN_WRITERS):
        with contextlib.suppress(Exception):
            writer.flush()


atexit.register(_flush_open_writers)


class ResultsWriter:
    """Append-only writer of one sweep's ``trials``/``metrics`` parts (see the module docstring).

    Args:
        out_dir: the sweep's results directory (created if missing).
        sweep_id: identifier stored in every row and in the file metadata.
        param_types: searched parameters, ``{dotted name: "float"|"int"|"str"}``.
        experiment_name: stored in the file metadata.
        flush_every: write parts after this many buffered events.
        flush_seconds: ... or when the oldest buffered event is this old (checked on every event
            and on :meth:`tick`).
        wal_fsync: fsync the write-ahead log after every event (survives power loss, not only a
            killed process; costs a disk sync per event).

    Raises:
        ValueError: the directory holds another sweep's results, or a parameter's type changed.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        sweep_id: str,
        param_types: Mapping[str, str],
        experiment_name: str,
        *,
        flush_every: int = 1000,
        flush_seconds: float = 10.0,
        wal_fsync: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not sweep_id:
            raise ValueError("sweep_id must be a non-empty string")
        if flush_every < 1 or not flush_seconds > 0:
            raise ValueError(
                f"flush_every must be >= 1 and flush_seconds > 0, got {flush_every}, {flush_seconds}"
            )
        self.out_dir = Path(out_dir)
        self.sweep_id = sweep_id
        self.experiment_name = experiment_name
        self.param_types = normalize_param_types(param_types)
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.wal_fsync = wal_fsync
        self._clock = clock
        self._lock = threading.RLock()
        self._flushing = False
        self._token = files.new_token()
        self._trials: dict[str, TrialRow] = {}
        self._metric_rows: list[dict[str, Any]] = []
        self._dirty: dict[str, int] = {}  # trial id -> event_seq of its latest change
        self._columns: dict[str, pa.DataType] = {}  # open metrics columns, in order of first sight
        self._first_pending: float | None = None
        self._wal: Any = None
        self._seq = 0  # last part sequence number written
        self._event_seq = 0  # next event sequence number
        self._open()
        _OPEN_WRITERS.add(self)

    # ---- opening (fresh or resumed) ------------------------------------------

    def _open(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._scan_disk()
        self._recover_wal()
        if files.has_results(self.out_dir):
            self._load_trials()
        else:  # an empty trials part carries the schema and the metadata from the start
            self._write_part("trials", self._seq + 1, self._trials_table([]), self._token)
            self._seq += 1

    def _scan_disk(self) -> None:
        """Highest part and event sequence numbers, and the open column types, on disk."""
        newest_metrics: pa.Schema | None = None
        for table in files.TABLES:
            sources: list[Path] = []
            compacted = files.compacted_path(self.out_dir, table)
            if compacted.is_file():
                sources.append(compacted)
            parts = files.list_parts(self.out_dir, table)
            sources += [p for _, p in parts]
            if parts:
                self._seq = max(self._seq, parts[-1][0])
            for path in sources:
                meta = _read_footer(path)
                md = meta.schema.to_arrow_schema().metadata or {}
                check_version(md, path)
                found = md.get(META_SWEEP_ID, b"").decode()
                if found != self.sweep_id:
                    raise ValueError(f"{path} belongs to sweep {found!r}, not {self.sweep_id!r}")
                if META_COMPACTED_THROUGH in md:
                    self._seq = max(self._seq, int(md[META_COMPACTED_THROUGH].decode()))
                last = (
                    int(md[META_LAST_EVENT_SEQ].decode()) if META_LAST_EVENT_SEQ in md else meta.num_rows - 1
                )
                self._event_seq = max(self._event_seq, last + 1)
                if table == "metrics" and (newest_metrics is None or path != compacted):
                    newest_metrics = meta.schema.to_arrow_schema()
        for wal_seq, _ in self._wal_files():
            self._seq = max(self._seq, wal_seq)
        if newest_metrics is not None:
            # parts' column sets only grow: the newest file has them all (compacted: the union)
            for fld in newest_metrics:
                if fld.name not in _CORE and not pa.types.is_null(fld.type):
                    self._columns[fld.name] = fld.type

    def _wal_files(self) -> list[tuple[int, Path]]:
        wal_dir = self.out_dir / files.WAL_DIR
        found = []
        for path in wal_dir.glob("wal-*-*.jsonl") if wal_dir.is_dir() else []:
            with contextlib.suppress(ValueError):
                found.append((int(path.name.split("-")[1]), path))
        return sorted(found)

    def _recover_wal(self) -> None:
        """Write the parts of flushes a killed writer had logged but not finished."""
        for seq, path in self._wal_files():
            token = path.stem.split("-", 2)[2]
            metrics, trials = _read_wal(path)
            for row in metrics + trials:
                if row.get("sweep_id") != self.sweep_id:
                    raise ValueError(
                        f"{path} belongs to sweep {row.get('sweep_id')!r}, not {self.sweep_id!r}"
                    )
                self._event_seq = max(self._event_seq, int(row["event_seq"]) + 1)
            present = {t: any(s == seq for s, _ in files.list_parts(self.out_dir, t)) for t in files.TABLES}
            if metrics and not present["metrics"]:
                for row in metrics:
                    self._note_types(row)
                self._write_part("metrics", seq, self._metrics_table(metrics), token)
            if trials and not present["trials"]:
                latest = {r["trial_id"]: r for r in trials}
                self._write_part("trials", seq, self._trials_table(list(latest.values())), token)
            path.unlink()
            logger.info("results: recovered %d reports from %s", len(metrics), path.name)

    def _load_trials(self) -> None:
        table = read_results_table(self.out_dir, "trials")
        previous = json.loads((table.schema.metadata or {}).get(META_PARAM_TYPES, b"{}").decode())
        for name, kind in previous.items():
            current = self.param_types.get(name)
            if current is not None and current != kind:
                raise ValueError(f"parameter {name!r} was {kind!r} in the existing results, now {current!r}")
        self.param_types = normalize_param_types({**previous, **self.param_types})
        for record in table.to_pylist():
            self._trials[record["trial_id"]] = TrialRow.from_record(record)

    # ---- events -----------------------------------------------------------------

    def _row(self, trial_id: str, config: Mapping[str, Any] | None) -> TrialRow:
        row = self._trials.get(trial_id)
        if row is None:
            now = utcnow()
            params = {name: config_value(config or {}, name) for name in self.param_types}
            row = TrialRow(trial_id=trial_id, params=params, started_at=now, updated_at=now)
            self._trials[trial_id] = row
        return row

    def trial_started(self, trial_id: str, config: Mapping[str, Any] | None = None) -> None:
        """A trial (re)starts: add its row; a restarted finished trial is running again."""
        with self._lock:
            row = self._row(trial_id, config)
            if row.status != STATUS_RUNNING:
                row.status, row.updated_at = STATUS_RUNNING, utcnow()
            self._log(None, row)

    def trial_result(
        self, trial_id: str, config: Mapping[str, Any] | None, result: Mapping[str, Any]
    ) -> None:
        """One report: a metrics row (every metric its own column) and the trial's row updated.

        A report carrying ``resumed_report`` (the report its run resumed from, which a killed
        driver may never have received) first writes that report as its own row.
        """
        with self._lock:
            row = self._row(trial_id, config)
            carried = result.get(RESUMED_REPORT_KEY)
            if isinstance(carried, Mapping):
                self._report(row, carried, None)
            self._report(row, result, _as_int(result.get("training_iteration")))
        self.maybe_flush()

    def _report(self, row: TrialRow, report: Mapping[str, Any], iteration: int | None) -> None:
        now = utcnow()
        step = report_step(report)
        metrics = {
            "sweep_id": self.sweep_id,
            "trial_id": row.trial_id,
            "step": step,
            "training_iteration": iteration,
            "event_seq": 0,
            "time": now,
            **flatten_report(report),
        }
        row.apply_report(step, report, now)
        self._log(metrics, row)

    def checkpoint(self, trial_id: str, uri: str | None) -> None:
        """A checkpoint of the trial's latest report arrived."""
        with self._lock:
            row = self._row(trial_id, None)
            row.record_checkpoint(uri)
            self._log(None, row)

    def trial_recovering(self, trial_id: str, error: str) -> None:
        """A failure Tune will retry: record the error; the trial keeps running."""
        with self._lock:
            row = self._row(trial_id, None)
            row.error, row.updated_at = error, utcnow()
            self._log(None, row)
        self.flush()

    def trial_errored(self, trial_id: str, error: str) -> None:
        """The trial failed for good."""
        with self._lock:
            row = self._row(trial_id, None)
            row.status, row.error, row.updated_at = STATUS_ERRORED, error, utcnow()
            self._log(None, row)
        self.flush()

    def trial_completed(self, trial_id: str, checkpoint_uri: str | None = None) -> None:
        """The trial ended: completed/diverged as reported, otherwise early-stopped; flushes."""
        with self._lock:
            row = self._row(trial_id, None)
            if row.status not in (STATUS_COMPLETED, STATUS_DIVERGED):
                row.status = STATUS_EARLY_STOPPED
            if row.latest_checkpoint is None:
                row.latest_checkpoint = checkpoint_uri
            row.updated_at = utcnow()
            self._log(None, row)
        self.flush()

    # ---- buffering ------------------------------------------------------------

    def _log(self, metrics: dict[str, Any] | None, row: TrialRow) -> None:
        """Buffer one event (a metrics row and/or a trial change) after logging it to the WAL."""
        lines = []
        if metrics is not None:
            metrics["event_seq"] = self._event_seq
            self._event_seq += 1
            lines.append(_to_json({"table": "metrics", **metrics}))
        record = {**row.to_record(self.sweep_id, self.param_types), "event_seq": self._event_seq}
        self._event_seq += 1
        lines.append(_to_json({"table": "trials", **record}))
        # buffer first, then log: a signal handler's flush never drops a logged, unbuffered event
        if metrics is not None:
            self._note_types(metrics)
            self._metric_rows.append(metrics)
        self._dirty[row.trial_id] = record["event_seq"]
        if self._first_pending is None:
            self._first_pending = self._clock()
        self._wal_append("\n".join(lines) + "\n")

    def _wal_append(self, text: str) -> None:
        if self._wal is None:
            wal_dir = self.out_dir / files.WAL_DIR
            wal_dir.mkdir(exist_ok=True)
            path = wal_dir / f"wal-{self._seq + 1:09d}-{self._token}.jsonl"
            self._wal = open(path, "a", encoding="utf-8")  # noqa: SIM115  (kept open across events)
        self._wal.write(text)
        self._wal.flush()
        if self.wal_fsync:
            os.fsync(self._wal.fileno())

    def _note_types(self, metrics: Mapping[str, Any]) -> None:
        columns = self._columns
        for name, value in metrics.items():
            if name in _CORE:
                continue
            kind = value_type(value)
            if kind is None or columns.get(name) == kind:
                continue
            if name in columns:
                wider = wider_type(self._columns[name], kind)
                if wider is not None and wider != self._columns[name]:
                    self._columns[name] = wider
            elif kind is not None:
                self._columns[name] = kind

    @property
    def pending(self) -> int:
        """Number of buffered events not yet in a part."""
        return len(self._metric_rows) + len(self._dirty)

    def maybe_flush(self) -> None:
        """Flush if ``flush_every`` events are buffered or the oldest is ``flush_seconds`` old."""
        first = self._first_pending
        if first is None:
            return
        if len(self._metric_rows) >= self.flush_every or self._clock() - first >= self.flush_seconds:
            self.flush()

    tick = maybe_flush

    def flush(self) -> None:
        """Write the buffered events as one ``metrics`` and one ``trials`` part."""
        with self._lock:
            if self._flushing or self._first_pending is None:
                return  # re-entered from a signal handler mid-flush: atexit finishes the job
            self._flushing = True
            try:
                seq = self._seq + 1
                if self._metric_rows:
                    self._write_part("metrics", seq, self._metrics_table(self._metric_rows), self._token)
                if self._dirty:
                    records = []
                    for trial_id, event_seq in self._dirty.items():
                        record = self._trials[trial_id].to_record(self.sweep_id, self.param_types)
                        records.append({**record, "event_seq": event_seq})
                    self._write_part("trials", seq, self._trials_table(records), self._token)
                self._seq = seq
                self._metric_rows, self._dirty, self._first_pending = [], {}, None
                if self._wal is not None:
                    self._wal.close()
                    Path(self._wal.name).unlink(missing_ok=True)
                    self._wal = None
            finally:
                self._flushing = False

    # ---- tables ---------------------------------------------------------------

    def _meta(self, table: str, **extra: Any) -> dict[bytes, bytes]:
        return file_metadata(table, self.sweep_id, self.experiment_name, self.param_types, **extra)

    def _metrics_table(self, rows: list[dict[str, Any]]) -> pa.Table:
        fields = list(METRICS_CORE_SCHEMA) + [pa.field(n, t) for n, t in self._columns.items()]
        arrays = []
        for fld in fields:
            if fld.name in _CORE:
                arrays.append(pa.array([r[fld.name] for r in rows], fld.type))
            else:
                arrays.append(pa.array([python_value(r.get(fld.name), fld.type) for r in rows], fld.type))
        last = max(int(r["event_seq"]) for r in rows)
        schema = pa.schema(fields).with_metadata(self._meta("metrics", last_event_seq=last))
        return pa.Table.from_arrays(arrays, schema=schema)

    def _trials_table(self, records: list[dict[str, Any]]) -> pa.Table:
        last = max((int(r["event_seq"]) for r in records), default=self._event_seq - 1)
        schema = trials_schema(self.param_types).with_metadata(self._meta("trials", last_event_seq=last))
        return pa.Table.from_pylist(records, schema=schema)

    def _write_part(self, table: str, seq: int, data: pa.Table, token: str) -> None:
        meta = dict(data.schema.metadata or {})
        meta[b"mmdsweep.part_seq"] = str(seq).encode()
        path = files.parts_dir(self.out_dir, table) / files.part_name(seq, token)
        if not path.exists():
            files.atomic_write_table(data.replace_schema_metadata(meta), path)

    # ---- views, ending ----------------------------------------------------------

    def trial_rows(self) -> dict[str, TrialRow]:
        """The in-memory trial rows (written and buffered)."""
        return dict(self._trials)

    def close(self, compact_results: bool = True) -> None:
        """Flush, then (by default) compact the parts into ``trials.parquet``/``metrics.parquet``."""
        self.flush()
        if compact_results:
            compact(self.out_dir)

    # ---- shutdown hooks ---------------------------------------------------------

    def install_shutdown_hooks(self) -> None:
        """Flush on SIGTERM (then run the previous handler) and at interpreter exit.

        Only possible from the main thread (Python's rule for signal handlers); elsewhere only
        the atexit flush applies. The handler chains: a previous Python handler (Ray's driver
        handler exits with ``sys.exit``) runs after the flush; the default action is re-raised.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if getattr(previous, "_mmdsweep_writer", None) is not None:
            previous = previous._mmdsweep_previous  # type: ignore[union-attr]
        ref = weakref.ref(self)

        def on_sigterm(signum: int, frame: Any) -> None:
            writer = ref()
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.flush()
            if callable(previous):
                previous(signum, frame)
            elif previous != signal.SIG_IGN:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

        on_sigterm._mmdsweep_writer = ref  # type: ignore[attr-defined]
        on_sigterm._mmdsweep_previous = previous  # type: ignore[attr-defined]
        signal.signal(signal.SIGTERM, on_sigterm)


def _read_footer(path: Path) -> Any:
    import pyarrow.parquet as pq

    with open(path, "rb") as fh:
        return pq.read_metadata(fh)


def _read_wal(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of a write-ahead log; a torn last line (killed mid-write) is skipped."""
    metrics: list[dict[str, Any]] = []
    trials: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = _from_json(line)
        except ValueError:
            continue
        (metrics if row.pop("table", None) == "metrics" else trials).append(row)
    return metrics, trials


def compact(results_dir: str | os.PathLike[str], *, prune: bool = False) -> dict[str, int]:
    """Compact each table's parts into ``<table>.parquet`` (atomic replace); returns row counts.

    The compacted file holds the deduplicated rows (metrics sorted by trial and step) and, in
    ``mmdsweep.compacted_through``, the last part it covers; readers read it plus newer parts.
    Parts are kept unless ``prune``: a reader listing ``metrics/*.parquet`` at the moment they
    are deleted would fail, so prune only when nobody reads the directory.
    """
    base = Path(results_dir)
    counts: dict[str, int] = {}
    for table in files.TABLES:
        parts = files.list_parts(base, table)
        compacted = files.compacted_path(base, table)
        if not parts and not compacted.is_file():
            continue
        data = read_results_table(base, table)
        meta = dict(data.schema.metadata or {})
        old_through = int(meta[META_COMPACTED_THROUGH].decode()) if META_COMPACTED_THROUGH in meta else None
        through = max([s for s, _ in parts] + [old_through or 0])
        up_to_date = old_through is not None and all(s <= old_through for s, _ in parts)
        meta[META_COMPACTED_THROUGH] = str(through).encode()
        meta.pop(b"mmdsweep.part_seq", None)
        if data.num_rows and "event_seq" in data.column_names:
            last = max(v for v in data.column("event_seq").to_pylist() if v is not None)
            meta[META_LAST_EVENT_SEQ] = str(last).encode()
        meta[META_SCHEMA_VERSION] = SCHEMA_VERSION.encode()
        if not up_to_date:
            files.atomic_write_table(data.replace_schema_metadata(meta), compacted)
        counts[table] = data.num_rows
        if prune:
            for seq, path in parts:
                if seq <= through:
                    path.unlink(missing_ok=True)
    return counts


__all__ = ["ResultsWriter", "TrialRow", "compact", "utcnow", "TIMESTAMP_TYPE"]
