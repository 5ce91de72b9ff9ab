"""Parquet results of mmdsweep sweeps: schema (version 2, open), append-only writer, readers.

A sweep's results directory holds two tables, ``trials`` (one row per Tune trial: searched
parameters, status, best/final FID and KID, checkpoint, error) and ``metrics`` (one row per
report, every reported metric its own typed column). While the sweep runs they grow as
immutable part files (``trials/part-*.parquet``, ``metrics/part-*.parquet``); when it ends they
are compacted into ``trials.parquet`` and ``metrics.parquet``. Read them with
:func:`read_trials` / :func:`read_metrics` at any time (they dedupe and merge the parts), or see
``docs/results.md`` for pandas/polars/DuckDB snippets on the files themselves.

Modules: :mod:`~mmdsweep.results.schema` (columns, versions, metadata keys),
:mod:`~mmdsweep.results.files` (layout on disk, atomic writes),
:mod:`~mmdsweep.results.reader`, :mod:`~mmdsweep.results.writer`. This package imports only
pyarrow and the standard library (pandas when a DataFrame is asked for); the Ray Tune callback
that drives the writer is :class:`mmdsweep.sweep.callback.ParquetResultsCallback`.
"""

from __future__ import annotations

import importlib
from typing import Any

from mmdsweep.results.files import (
    METRICS_FILE,
    TRIALS_FILE,
    ResultsPaths,
    atomic_write_table,
    has_results,
    list_parts,
    parts_dir,
    read_parquet_file,
    results_paths,
)
from mmdsweep.results.reader import (
    read_metrics,
    read_results_table,
    read_table,
    read_trials,
    schema_version,
    table_metadata,
)
from mmdsweep.results.schema import (
    META_COMPACTED_THROUGH,
    META_EXPERIMENT_NAME,
    META_PARAM_TYPES,
    META_PART_SEQ,
    META_SCHEMA_VERSION,
    META_SWEEP_ID,
    META_TABLE,
    METRICS_CORE_SCHEMA,
    METRICS_SCHEMA,
    METRICS_SCHEMA_V1,
    PARAM_ARROW_TYPES,
    PARAM_PREFIX,
    SCHEMA_VERSION,
    STATUS_COMPLETED,
    STATUS_DIVERGED,
    STATUS_EARLY_STOPPED,
    STATUS_ERRORED,
    STATUS_RUNNING,
    TIMESTAMP_TYPE,
    TRIAL_STATUSES,
    SchemaVersionError,
    file_metadata,
    param_column,
    param_types_from_space,
    trials_schema,
)
from mmdsweep.results.writer import ResultsWriter, compact

__all__ = [
    "METRICS_FILE",
    "TRIALS_FILE",
    "ResultsPaths",
    "atomic_write_table",
    "has_results",
    "list_parts",
    "parts_dir",
    "read_parquet_file",
    "results_paths",
    "read_metrics",
    "read_results_table",
    "read_table",
    "read_trials",
    "schema_version",
    "table_metadata",
    "META_COMPACTED_THROUGH",
    "META_EXPERIMENT_NAME",
    "META_PARAM_TYPES",
    "META_PART_SEQ",
    "META_SCHEMA_VERSION",
    "META_SWEEP_ID",
    "META_TABLE",
    "METRICS_CORE_SCHEMA",
    "METRICS_SCHEMA",
    "METRICS_SCHEMA_V1",
    "PARAM_ARROW_TYPES",
    "PARAM_PREFIX",
    "SCHEMA_VERSION",
    "STATUS_COMPLETED",
    "STATUS_DIVERGED",
    "STATUS_EARLY_STOPPED",
    "STATUS_ERRORED",
    "STATUS_RUNNING",
    "TIMESTAMP_TYPE",
    "TRIAL_STATUSES",
    "SchemaVersionError",
    "file_metadata",
    "param_column",
    "param_types_from_space",
    "trials_schema",
    "ResultsWriter",
    "compact",
]


def __getattr__(name: str) -> Any:
    """Compatibility shim (one release): ``mmdsweep.results.ParquetResultsCallback``.

    Sweeps started before the callback moved to :mod:`mmdsweep.sweep.callback` have it pickled
    in Tune's ``tuner.pkl`` under this module path; ``Tuner.restore`` finds it here. Imported
    lazily (by name) so that importing :mod:`mmdsweep.results` never imports Ray.
    """
    if name == "ParquetResultsCallback":
        return importlib.import_module("mmdsweep.sweep.callback").ParquetResultsCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
