"""Parquet schemas of a sweep's results (versioned), value typing and the metadata keys.

Schema 2 (this code) is *open*: ``metrics`` has a few fixed core columns and then one typed
column per reported metric, named as reported (``fid@torchvision:mobilenet_v2``, ``world_size``,
``status``, ...). ``trials`` has a fixed set of columns plus one ``param.<name>`` column per
searched parameter. Schema 1 (the first release) had a closed ``metrics`` layout; its files are
still read (see :mod:`mmdsweep.results.reader`). The layout is documented in ``docs/results.md``
("Parquet results schema").

This module imports only pyarrow and the standard library.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = "2"
"""Version of the Parquet layout: ``MAJOR`` or ``MAJOR.MINOR``.

A minor bump only adds nullable columns; a major bump may rename, retype or remove columns.
Readers refuse files written with a newer major version and read every older one.
"""

META_SCHEMA_VERSION = b"mmdsweep.schema_version"
META_SWEEP_ID = b"mmdsweep.sweep_id"
META_EXPERIMENT_NAME = b"mmdsweep.experiment_name"
META_TABLE = b"mmdsweep.table"
META_PARAM_TYPES = b"mmdsweep.param_types"
META_PART_SEQ = b"mmdsweep.part_seq"
"""Sequence number of a part file (parts of one table are numbered 1, 2, ... in write order)."""
META_COMPACTED_THROUGH = b"mmdsweep.compacted_through"
"""In a compacted file: the highest part sequence number whose rows it holds."""

PARAM_PREFIX = "param."
REPORTED_PREFIX = "reported."
"""Prefix of a reported metric whose name collides with a core column (e.g. ``time``)."""

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

# --------------------------------------------------------------------------- metrics (schema 2)

METRICS_CORE_SCHEMA = pa.schema(
    [
        pa.field("sweep_id", pa.string(), nullable=False),
        pa.field("trial_id", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("training_iteration", pa.int64()),
        pa.field("event_seq", pa.int64(), nullable=False),
        pa.field("time", TIMESTAMP_TYPE, nullable=False),
    ]
)
"""Fixed leading columns of ``metrics`` (schema 2); every reported metric follows as its own column.

``step`` is the trainer's step (Tune's ``training_iteration`` when a report has no ``step``);
``(trial_id, step)`` identifies a report, and of several rows with one key the one with the
highest ``event_seq`` (written last) wins.
"""
METRICS_KEY = ("trial_id", "step")

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
"""The closed ``metrics`` layout of schema 1 (kept to read and to write schema-1 fixtures)."""
METRICS_SCHEMA_V1 = METRICS_SCHEMA

# Tune result keys that do not become metrics columns: the trial's config is in ``trials``
# (``param.*``), the identifiers are core columns, ``resumed_report`` is replayed as its own row.
SKIPPED_REPORT_KEYS = frozenset({"config", "trial_id", "training_iteration", "step", "resumed_report"})
RESUMED_REPORT_KEY = "resumed_report"
"""A report may carry, under this key, the report its run resumed from (written as its own row)."""

# --------------------------------------------------------------------------- trials

_TRIAL_KEY_FIELDS = [
    pa.field("sweep_id", pa.string(), nullable=False),
    pa.field("trial_id", pa.string(), nullable=False),
]
TRIAL_RESULT_FIELDS = [
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
_TRIAL_SEQ_FIELD = pa.field("event_seq", pa.int64())  # always set by the writer
TRIALS_KEY = ("trial_id",)


class SchemaVersionError(ValueError):
    """A Parquet file is not an mmdsweep results file or is too new to read."""


def normalize_param_types(param_types: Mapping[str, str]) -> dict[str, str]:
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
    """Column name in ``trials`` of the searched parameter ``name``."""
    return PARAM_PREFIX + name


def trials_schema(param_types: Mapping[str, str], *, version: int = 2) -> pa.Schema:
    """Schema of ``trials`` for a sweep searching ``param_types`` (schema 2 adds ``event_seq``)."""
    types = normalize_param_types(param_types)
    params = [pa.field(param_column(name), PARAM_ARROW_TYPES[kind]) for name, kind in types.items()]
    extra = [_TRIAL_SEQ_FIELD] if version >= 2 else []
    return pa.schema(_TRIAL_KEY_FIELDS + params + TRIAL_RESULT_FIELDS + extra)


def file_metadata(
    table: str,
    sweep_id: str,
    experiment_name: str,
    param_types: Mapping[str, str],
    *,
    version: str = SCHEMA_VERSION,
    **extra: str | int,
) -> dict[bytes, bytes]:
    """Key-value metadata of a results file (``extra`` adds ``mmdsweep.<key>`` entries)."""
    meta = {
        META_SCHEMA_VERSION: version.encode(),
        META_TABLE: table.encode(),
        META_SWEEP_ID: sweep_id.encode(),
        META_EXPERIMENT_NAME: experiment_name.encode(),
        META_PARAM_TYPES: json.dumps(normalize_param_types(param_types), sort_keys=True).encode(),
    }
    for key, value in extra.items():
        meta[f"mmdsweep.{key}".encode()] = str(value).encode()
    return meta


def param_types_from_space(space: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Infer ``{dotted name: "float"|"int"|"str"}`` from a search space.

    Understands Ray Tune domains (``tune.uniform``, ``tune.randint``, ``tune.choice``, ...),
    Optuna distributions and plain constants (by class name: Ray is not imported); nested dicts
    are flattened with dots. Categorical values that are all integers give ``"int"``, all real
    numbers ``"float"``, anything else ``"str"``.
    """
    out: dict[str, str] = {}
    for key, value in space.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and "grid_search" not in value:
            out.update(param_types_from_space(value, prefix=f"{name}."))
        else:
            out[name] = _domain_kind(value)
    return out


def _domain_kind(domain: Any) -> str:
    cls = type(domain).__name__
    if cls in ("Float", "FloatDistribution", "UniformDistribution", "LogUniformDistribution"):
        return "float"
    if cls in ("Integer", "IntDistribution", "IntUniformDistribution", "IntLogUniformDistribution"):
        return "int"
    for attr in ("categories", "choices"):  # tune.choice / optuna CategoricalDistribution
        if hasattr(domain, attr):
            return _values_kind(getattr(domain, attr))
    if isinstance(domain, Mapping) and "grid_search" in domain:
        return _values_kind(domain["grid_search"])
    return _values_kind([domain])


def _values_kind(values: Iterable[Any]) -> str:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "int"
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "float"
    return "str"


# --------------------------------------------------------------------------- open columns

# The type lattice of open metric columns: a column holding values of two kinds takes the later
# one in this order (bool < int64 < float64 < string); readers cast older parts up to it.
_RANK = {pa.bool_(): 1, pa.int64(): 2, pa.float64(): 3, pa.string(): 4}


_FAST_TYPES: dict[type, pa.DataType | None] = {
    bool: pa.bool_(),
    int: pa.int64(),
    float: pa.float64(),
    str: pa.string(),
    type(None): None,
}


def value_type(value: Any) -> pa.DataType | None:
    """Arrow type of one reported value (``None`` for a missing value)."""
    fast = _FAST_TYPES.get(type(value), False)
    if fast is not False:
        return fast  # type: ignore[return-value]
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return pa.bool_()
    if isinstance(value, int) or _is_np(value, "integer"):
        return pa.int64()
    if isinstance(value, float) or _is_np(value, "floating"):
        return pa.float64()
    return pa.string()


def _is_np(value: Any, kind: str) -> bool:
    """``isinstance(value, numpy.<kind>)`` without importing numpy."""
    return any(c.__name__ == kind and c.__module__ == "numpy" for c in type(value).__mro__)


def wider_type(a: pa.DataType | None, b: pa.DataType | None) -> pa.DataType | None:
    """The type of a column holding values of types ``a`` and ``b`` (see the lattice above)."""
    if a is None or b is None:
        return a if b is None else b
    if a == b:
        return a
    ra, rb = _RANK.get(a), _RANK.get(b)
    if ra is None or rb is None:
        return pa.string()
    return a if ra >= rb else b


def python_value(value: Any, arrow_type: pa.DataType) -> Any:
    """``value`` converted to a Python value of ``arrow_type`` (``None`` stays ``None``)."""
    if value is None:
        return None
    if arrow_type == pa.string():
        if isinstance(value, str):
            return value
        if isinstance(value, (Mapping, list, tuple)):
            return json.dumps(value, default=str, sort_keys=True)
        return str(value)
    if arrow_type == pa.float64():
        return float(value)
    if arrow_type == pa.int64():
        return int(value)
    if arrow_type == pa.bool_():
        return bool(value)
    return value


def is_score_column(name: str) -> bool:
    """Columns where a non-finite value means "not evaluated" and is stored as null."""
    return name.startswith(("fid", "kid")) or name in ("bandwidth", "sample_time_per_image_s")


def flatten_report(report: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A report's metrics as flat ``{column: value}`` (nested mappings joined with ``/``).

    Skips :data:`SKIPPED_REPORT_KEYS` at the top level, renames names that collide with a core
    column to ``reported.<name>``, and stores non-finite scores (:func:`is_score_column`) as
    ``None``.
    """
    out: dict[str, Any] = {}
    for key, value in report.items():
        name = f"{prefix}{key}" if prefix else str(key)
        if not prefix and name in SKIPPED_REPORT_KEYS:
            continue
        kind = type(value)
        if kind not in _FAST_TYPES:
            if isinstance(value, Mapping):
                out.update(flatten_report(value, prefix=f"{name}/"))
                continue
            if _is_np(value, "generic"):
                value = value.item()  # numpy scalar -> Python scalar (typed, JSON-able)
                kind = type(value)
        if not prefix and name in _CORE_NAMES:
            name = REPORTED_PREFIX + name
        if kind is float and not math.isfinite(value) and is_score_column(name):
            value = None
        out[name] = value
    return out


_CORE_NAMES = frozenset(METRICS_CORE_SCHEMA.names)
