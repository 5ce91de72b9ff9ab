"""Where the results of a sweep live on disk, and how a file gets there whole.

A sweep's results directory holds, per table (``trials`` and ``metrics``)::

    metrics/part-<inv>-<token>.parquet   append-only parts, one per flush of the callback
    metrics.parquet                      the compacted table, written when the sweep ends
    .results-wal/wal-<seq>.jsonl         the events of the flush in progress (crash recovery)

``<inv>`` is ``999999999 - seq`` (9 digits): parts sort newest first, so a reader that takes the
schema from the first file of a glob (polars, pyarrow datasets, DuckDB without
``union_by_name``) sees every column (the column set only grows). The sequence number is also in
each part's metadata (``mmdsweep.part_seq``). Every file is written to a hidden temporary name,
fsynced and renamed, so a reader never sees a partial file; parts are never rewritten.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from mmdsweep.fsio import atomic_path
from mmdsweep.results.layout import METRICS_FILE, TRIALS_FILE

TABLES = ("trials", "metrics")
WAL_DIR = ".results-wal"
MAX_SEQ = 999_999_999
_PART_RE = re.compile(r"^part-(\d{9})-[0-9a-z]+\.parquet$")


class ResultsPaths(NamedTuple):
    """Locations of the two compacted result files of one sweep."""

    trials: Path
    metrics: Path


def results_paths(results_dir: str | os.PathLike[str]) -> ResultsPaths:
    """Paths of ``trials.parquet`` and ``metrics.parquet`` in ``results_dir``."""
    base = Path(results_dir)
    return ResultsPaths(trials=base / TRIALS_FILE, metrics=base / METRICS_FILE)


def compacted_path(results_dir: str | os.PathLike[str], table: str) -> Path:
    """``<dir>/<table>.parquet``."""
    return Path(results_dir) / f"{table}.parquet"


def parts_dir(results_dir: str | os.PathLike[str], table: str) -> Path:
    """``<dir>/<table>/``, the directory of the table's part files."""
    return Path(results_dir) / table


def part_name(seq: int, token: str) -> str:
    """File name of part ``seq`` (newest sorts first)."""
    if not 1 <= seq <= MAX_SEQ:
        raise ValueError(f"part sequence number out of range: {seq}")
    return f"part-{MAX_SEQ - seq:09d}-{token}.parquet"


def part_seq(path: str | os.PathLike[str]) -> int | None:
    """Sequence number of a part file from its name; ``None`` if it is not a part."""
    match = _PART_RE.match(Path(path).name)
    return MAX_SEQ - int(match.group(1)) if match else None


def list_parts(results_dir: str | os.PathLike[str], table: str) -> list[tuple[int, Path]]:
    """``[(seq, path)]`` of the table's parts, oldest first."""
    directory = parts_dir(results_dir, table)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = [(part_seq(name), directory / name) for name in names]
    return sorted((seq, path) for seq, path in found if seq is not None)


def has_results(results_dir: str | os.PathLike[str], table: str = "trials") -> bool:
    """Whether ``results_dir`` holds the table (compacted file or parts)."""
    return compacted_path(results_dir, table).is_file() or bool(list_parts(results_dir, table))


def new_token() -> str:
    """A short random token for file names (two writers never collide)."""
    return uuid.uuid4().hex[:8]


def atomic_write_table(table: pa.Table, path: str | os.PathLike[str], **write_options: Any) -> None:
    """Write ``table`` as Parquet to ``path`` atomically (:func:`mmdsweep.fsio.atomic_path`).

    The temporary file is hidden (``.<name>.<random>.tmp``: no glob of ``*.parquet`` and no
    pyarrow dataset picks it up), fsynced and moved over ``path``; the directory is fsynced
    after. If anything fails ``path`` keeps its previous content. Extra keyword arguments go to
    :func:`pyarrow.parquet.write_table`.
    """
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **write_options)


def read_parquet_file(path: str | os.PathLike[str]) -> pa.Table:
    """Read a whole Parquet file through ONE open file handle.

    Reading by path opens the file more than once (footer, then row groups); if the path is
    replaced in between, the reader mixes two files ("Couldn't deserialize thrift"). One handle
    keeps reading the file it opened, whatever happens to the path.
    """
    with open(path, "rb") as fh:
        return pq.read_table(fh)
