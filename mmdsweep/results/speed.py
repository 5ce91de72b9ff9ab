"""``speed.parquet``: schema, reader and writer (pyarrow/pandas only: no torch, no Ray).

The measurement itself is :func:`mmdsweep.inference.speed.measure_sampling_speed`; the table
lives here, in the results layer, so that the analysis can read it without importing torch.
``speed.parquet`` has one row per ``(model, sampler, spacing, timesteps, device, dtype)``;
writing a row with the same key again replaces the old one.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from mmdsweep.results import SCHEMA_VERSION, TIMESTAMP_TYPE, atomic_write_table, read_table
from mmdsweep.results.layout import SPEED_FILE, SweepLayout

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "SPEED_FILE",
    "SPEED_KEY",
    "SPEED_SCHEMA",
    "read_speed_table",
    "speed_frame",
    "speed_metadata",
    "write_speed_table",
]

SPEED_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("model_dir", pa.string()),
        pa.field("sampler", pa.string(), nullable=False),
        pa.field("spacing", pa.string(), nullable=False),
        pa.field("eta", pa.float64()),
        pa.field("timesteps", pa.int64(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("device_name", pa.string()),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("batch_size", pa.int64(), nullable=False),
        pa.field("num_images", pa.int64(), nullable=False),
        pa.field("warmup", pa.int64()),
        pa.field("seconds_per_image", pa.float64(), nullable=False),
        pa.field("measured_at", TIMESTAMP_TYPE, nullable=False),
    ]
)
"""Schema of ``speed.parquet`` (without the file metadata)."""

SPEED_KEY = ("model", "sampler", "spacing", "timesteps", "device", "dtype")
"""Columns identifying a measurement; a newer row with the same key replaces an older one."""


def speed_frame(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with exactly the speed columns, typed as :func:`read_speed_table` returns them."""
    return _to_table(df).to_pandas(types_mapper=_int64_mapper)


def _int64_mapper(arrow_type: pa.DataType) -> Any:
    import pandas as pd

    return pd.Int64Dtype() if pa.types.is_integer(arrow_type) else None


def _to_table(df: pd.DataFrame, metadata: dict[bytes, bytes] | None = None) -> pa.Table:
    """Arrow table in :data:`SPEED_SCHEMA` from a DataFrame (missing nullable columns are null)."""
    missing = [f.name for f in SPEED_SCHEMA if f.name not in df.columns and not f.nullable]
    if missing:
        raise ValueError(f"speed table lacks required column(s) {missing}")
    columns: dict[str, Any] = {}
    for f in SPEED_SCHEMA:
        if f.name not in df.columns:
            columns[f.name] = pa.nulls(len(df), type=f.type)
            continue
        values = df[f.name]
        if f.name == "measured_at":
            import pandas as pd

            values = pd.to_datetime(values, utc=True)
        columns[f.name] = pa.array(values, type=f.type, from_pandas=True)
    schema = SPEED_SCHEMA.with_metadata(metadata) if metadata else SPEED_SCHEMA
    return pa.Table.from_pydict(columns, schema=schema)


def speed_metadata(sweep_id: str | None = None) -> dict[bytes, bytes]:
    """Key-value metadata of ``speed.parquet``."""
    meta = {
        b"mmdsweep.schema_version": SCHEMA_VERSION.encode(),
        b"mmdsweep.table": b"speed",
        b"mmdsweep.torch_version": _torch_version().encode(),
    }
    if sweep_id:
        meta[b"mmdsweep.sweep_id"] = sweep_id.encode()
    return meta


def read_speed_table(results_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """``speed.parquet`` of a results directory (integers as ``Int64``); empty if there is none."""
    path = SweepLayout(results_dir).speed
    if not path.exists():
        return SPEED_SCHEMA.empty_table().to_pandas(types_mapper=_int64_mapper)
    return read_table(path).to_pandas(types_mapper=_int64_mapper)


def write_speed_table(
    results_dir: str | os.PathLike[str],
    df: pd.DataFrame,
    *,
    merge: bool = True,
    sweep_id: str | None = None,
) -> Path:
    """Write ``df`` (rows of :func:`measure_sampling_speed`) to ``RESULTS_DIR/speed.parquet``.

    The file is replaced atomically. With ``merge`` (the default) rows already in the file are
    kept unless ``df`` has a row with the same :data:`SPEED_KEY`, which replaces them. Rows are
    sorted by model, sampler and timesteps. Returns the path written.
    """
    import pandas as pd

    path = SweepLayout(results_dir).speed
    new = speed_frame(df)
    if merge and path.exists():
        old = read_speed_table(results_dir)
        if sweep_id is None:
            raw = (read_table(path).schema.metadata or {}).get(b"mmdsweep.sweep_id")
            sweep_id = raw.decode() if raw else None
        keys = set(map(tuple, new[list(SPEED_KEY)].astype(str).to_numpy().tolist()))
        keep = [tuple(r) not in keys for r in old[list(SPEED_KEY)].astype(str).to_numpy().tolist()]
        new = pd.concat([old[keep], new], ignore_index=True) if any(keep) else new
    new = new.sort_values(["model", "sampler", "spacing", "timesteps", "device"], kind="stable")
    atomic_write_table(_to_table(new.reset_index(drop=True), speed_metadata(sweep_id)), path)
    return path


def _torch_version() -> str:
    """The installed torch's version, read from its metadata (without importing torch)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
