"""Readers of a sweep's results: the compacted table plus newer parts, deduplicated; schema 1 too.

``read_metrics(dir)`` / ``read_trials(dir)`` (pandas) and ``read_results_table(dir, table)``
(Arrow) are safe while the sweep runs: every file is opened once and read through that handle,
parts are immutable and appear by atomic rename, and a part that disappears between listing and
opening (only :func:`mmdsweep.results.compact` with ``prune=True`` deletes parts) makes the read
start again. Rows are deduplicated on ``(trial_id, step)`` (metrics) and ``trial_id`` (trials),
keeping the one written last.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmdsweep.results import files
from mmdsweep.results.layout import export_name, read_sweep_json
from mmdsweep.results.schema import (
    META_COMPACTED_THROUGH,
    META_SCHEMA_VERSION,
    METRICS_CORE_SCHEMA,
    METRICS_KEY,
    SCHEMA_VERSION,
    TRIALS_KEY,
    SchemaVersionError,
    wider_type,
)

if TYPE_CHECKING:
    import pandas as pd

_RETRIES = 5


def _major(version: str) -> int:
    try:
        return int(version.split(".", 1)[0])
    except ValueError as exc:
        raise SchemaVersionError(f"malformed mmdsweep schema version {version!r}") from exc


def check_version(metadata: dict[bytes, bytes] | None, where: object) -> str:
    """The schema version in ``metadata``; refuses a missing or newer-major version."""
    raw = (metadata or {}).get(META_SCHEMA_VERSION)
    if raw is None:
        raise SchemaVersionError(f"{where} has no {META_SCHEMA_VERSION.decode()} metadata")
    version = raw.decode()
    if _major(version) > _major(SCHEMA_VERSION):
        raise SchemaVersionError(
            f"{where} was written with results schema {version}; this mmdsweep reads schema "
            f"{SCHEMA_VERSION} (major {_major(SCHEMA_VERSION)}) and older. Upgrade mmdsweep to read it."
        )
    return version


def schema_version(path: str | os.PathLike[str]) -> str:
    """Schema version of a results file; refuses files of a newer major version.

    Raises:
        SchemaVersionError: the file has no mmdsweep version metadata, or was written by a
            newer major schema than this code understands.
    """
    with open(path, "rb") as fh:
        metadata = pq.read_schema(fh).metadata
    return check_version(metadata, path)


def read_table(path: str | os.PathLike[str]) -> pa.Table:
    """Read one results file (any schema version this code reads) as an Arrow table."""
    table = files.read_parquet_file(path)
    check_version(table.schema.metadata, path)
    return table


def _upgrade(table: pa.Table, name: str) -> pa.Table:
    """Give a schema-1 table the schema-2 core columns (``training_iteration``, ``event_seq``)."""
    if "event_seq" not in table.column_names:
        table = table.append_column(
            pa.field("event_seq", pa.int64()), pa.array(range(table.num_rows), pa.int64())
        )
    if name == "metrics" and "training_iteration" not in table.column_names:
        table = table.append_column(
            pa.field("training_iteration", pa.int64()), pa.nulls(table.num_rows, pa.int64())
        )
    return table


def unify(tables: list[pa.Table], name: str) -> pa.Table:
    """Concatenate tables whose column sets and numeric types may differ (open schema).

    Columns are ordered: the core columns, then by first appearance; a column takes the widest
    type it has in any table (bool < int64 < float64 < string); missing columns are null. The
    metadata of the last table is kept.
    """
    tables = [_upgrade(t, name) for t in tables]
    types: dict[str, pa.DataType] = {}
    nullable: dict[str, bool] = {}
    for table in tables:
        for fld in table.schema:
            wider = wider_type(types.get(fld.name), None if pa.types.is_null(fld.type) else fld.type)
            types[fld.name] = wider if wider is not None else pa.null()
            nullable[fld.name] = nullable.get(fld.name, False) or fld.nullable
    for n in types:  # a column some table lacks gets nulls there
        nullable[n] = nullable[n] or any(n not in t.column_names for t in tables)
    core = [n for n in METRICS_CORE_SCHEMA.names if n in types] if name == "metrics" else []
    order = core + [n for n in types if n not in core]
    schema = pa.schema([pa.field(n, types[n], nullable=nullable[n]) for n in order])
    columns: dict[str, list[pa.ChunkedArray | pa.Array]] = {n: [] for n in order}
    for table in tables:
        for n in order:
            if n in table.column_names:
                col = table.column(n)
                columns[n].append(col if col.type == types[n] else col.cast(types[n]))
            else:
                columns[n].append(pa.nulls(table.num_rows, types[n]))
    arrays = [pa.chunked_array([c for chunk in columns[n] for c in _chunks(chunk)], types[n]) for n in order]
    metadata = tables[-1].schema.metadata if tables else None
    return pa.Table.from_arrays(arrays, schema=schema.with_metadata(metadata or {}))


def _chunks(col: pa.ChunkedArray | pa.Array) -> list[pa.Array]:
    return list(col.chunks) if isinstance(col, pa.ChunkedArray) else [col]


def deduplicate(table: pa.Table, key: tuple[str, ...], sort: bool) -> pa.Table:
    """Keep, per ``key``, the row that comes last; sorted by key (``sort``) or first appearance."""
    if table.num_rows == 0:
        return table
    cols = [table.column(k).to_pylist() for k in key]
    last: dict[tuple[Any, ...], int] = {}
    first: dict[tuple[Any, ...], int] = {}
    for i, k in enumerate(zip(*cols, strict=True)):
        last[k] = i
        first.setdefault(k, i)
    keys = (
        sorted(last, key=lambda k: tuple((v is None, v) for v in k))
        if sort
        else sorted(last, key=lambda k: first[k])
    )
    return table.take(pa.array([last[k] for k in keys], pa.int64()))


def _source_tables(results_dir: Path, name: str) -> list[pa.Table]:
    """The compacted table (if any) and the parts newer than it, oldest first."""
    out: list[pa.Table] = []
    through = 0
    compacted = files.compacted_path(results_dir, name)
    try:
        table = read_table(compacted)
    except FileNotFoundError:
        pass
    else:
        raw = (table.schema.metadata or {}).get(META_COMPACTED_THROUGH)
        through = int(raw.decode()) if raw else 0
        out.append(table)
    for seq, path in files.list_parts(results_dir, name):
        if seq > through:
            out.append(read_table(path))
    return out


def read_results_table(results_dir: str | os.PathLike[str], table: str) -> pa.Table:
    """``trials`` or ``metrics`` of a sweep as one deduplicated Arrow table.

    Reads ``<table>.parquet`` (if present) plus every part newer than it, so it works while the
    sweep runs, after it ended, and on a schema-1 directory (one file, no parts).

    Raises:
        FileNotFoundError: the directory holds neither the compacted file nor parts.
        SchemaVersionError: a file is not an mmdsweep results file or is too new.
    """
    if table not in files.TABLES:
        raise ValueError(f"table must be one of {files.TABLES}, got {table!r}")
    base = Path(results_dir)
    for attempt in range(_RETRIES):
        try:
            sources = _source_tables(base, table)
            break
        except FileNotFoundError:  # a part was pruned after we listed it: list again
            if attempt == _RETRIES - 1:
                raise
    if not sources:
        raise FileNotFoundError(
            f"{base}: no {table}.parquet and no {table}/part-*.parquet; not a sweep results directory"
        )
    merged = unify(sources, table)
    if table == "metrics":
        return deduplicate(merged, METRICS_KEY, sort=True)
    return deduplicate(merged, TRIALS_KEY, sort=False)


def table_metadata(results_dir: str | os.PathLike[str], table: str) -> dict[bytes, bytes]:
    """File metadata of a table (footer only): the compacted file's, else the newest part's."""
    candidates = [files.compacted_path(results_dir, table)]
    candidates += [path for _, path in reversed(files.list_parts(results_dir, table))]
    for path in candidates:
        try:
            with open(path, "rb") as fh:
                return dict(pq.read_schema(fh).metadata or {})
        except FileNotFoundError:
            continue
    return {}


def _pandas_type(arrow_type: pa.DataType) -> Any:
    """Keep integer columns integral in pandas (nullable ``Int64``)."""
    import pandas as pd

    return pd.Int64Dtype() if pa.types.is_integer(arrow_type) else None


def read_trials(results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The sweep's trials (one row each) as a DataFrame (integers as ``Int64``)."""
    return read_results_table(results_dir, "trials").to_pandas(types_mapper=_pandas_type)


def read_metrics(results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The sweep's reports (one row per trial and step) as a DataFrame (integers as ``Int64``)."""
    return read_results_table(results_dir, "metrics").to_pandas(types_mapper=_pandas_type)


# ----------------------------------------------------------------------------- sweep.json


def _parquet_meta(path: Path) -> dict[bytes, bytes]:
    import pyarrow.parquet as pq

    return dict(pq.read_schema(path).metadata or {})


def read_sweep_meta(results_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``sweep.json`` of a results directory, completed with defaults and the Parquet metadata.

    Always has the keys ``sweep_id``, ``experiment_name``, ``base_model_dir``, ``exports``
    (``{"5": path, ...}``), ``sampler``, ``spacing``, ``optuna_storage``, ``study_name`` and
    ``objectives``; those the file lacks are ``None`` (``{}`` for ``exports``).
    """
    from mmdsweep.results.schema import META_EXPERIMENT_NAME, META_SWEEP_ID

    base = Path(results_dir)
    meta: dict[str, Any] = dict(read_sweep_json(base) or {})
    pmeta = table_metadata(base, "trials")  # compacted file or newest part (a running sweep)
    if not meta.get("sweep_id"):
        raw = pmeta.get(META_SWEEP_ID)
        meta["sweep_id"] = raw.decode() if raw else base.name
    if not meta.get("experiment_name"):
        raw = pmeta.get(META_EXPERIMENT_NAME)
        meta["experiment_name"] = raw.decode() if raw else None
    defaults: dict[str, Any] = {
        "experiment_file": None,
        "base_model_dir": None,
        "exports": {},
        "sampler": "ddim",
        "spacing": "uniform",
        "optuna_storage": None,
        "study_name": None,
        "objectives": ["fid"],
    }
    for key, value in defaults.items():
        if meta.get(key) is None:
            meta[key] = value
    meta["exports"] = {str(k): v for k, v in dict(meta["exports"]).items()}
    return meta


def _resolve(results_dir: Path, path: str, must_exist: bool) -> str:
    """A path of ``sweep.json``: absolute, relative to the results directory, or (base model
    only) relative to the working directory or a Hugging Face repo id."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute():
        return str(p)
    inside = results_dir / p
    if inside.exists() or must_exist:
        return str(inside)
    return path


def model_dirs(results_dir: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> dict[str, str]:
    """Model locations named in ``sweep.json``: ``{"base": ..., "T5": ..., "T10": ...}``.

    Exports are sorted by T; relative export paths are taken relative to ``results_dir``.
    """
    base = Path(results_dir)
    meta = meta if meta is not None else read_sweep_meta(base)
    out: dict[str, str] = {}
    if meta.get("base_model_dir"):
        out["base"] = _resolve(base, str(meta["base_model_dir"]), must_exist=False)
    for key in sorted(meta.get("exports") or {}, key=lambda k: int(k)):
        out[export_name(int(key))] = _resolve(base, str(meta["exports"][key]), must_exist=True)
    return out
