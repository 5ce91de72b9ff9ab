"""Readers a user would reach for, run in a loop while a sweep writes (used by test_live_readers.py and the
shared ``tiny_sweep`` fixture of conftest.py, which reads its real sweep while it runs)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow.parquet as pq

from mmdsweep import results as R

KEY = ["trial_id", "step"]


def _distinct(frame: pd.DataFrame) -> int:
    return len(frame.drop_duplicates(KEY))


def _glob(sdir: Path, table: str = "metrics") -> str:
    return str(sdir / table / "*.parquet")


def _final(sdir: Path) -> Path:
    return sdir / "metrics.parquet"


def readers() -> dict[str, Callable[[Path], int | None]]:
    """name -> function(results dir) -> distinct reports seen (None: nothing to read yet)."""

    def parts_exist(sdir: Path) -> bool:
        return bool(R.list_parts(sdir, "metrics"))

    def project(sdir: Path) -> int | None:
        return len(R.read_metrics(sdir)) if R.has_results(sdir, "metrics") else None

    def project_trials(sdir: Path) -> int | None:
        return len(R.read_trials(sdir)) if R.has_results(sdir) else None

    def analysis(sdir: Path) -> int | None:
        from mmdsweep import analysis as A

        return len(A.load_sweep(sdir).metrics) if R.has_results(sdir, "metrics") else None

    def pandas_parts(sdir: Path) -> int | None:
        return _distinct(pd.read_parquet(sdir / "metrics")) if parts_exist(sdir) else None

    def polars_parts(sdir: Path) -> int | None:
        if not parts_exist(sdir):
            return None
        return pl.read_parquet(_glob(sdir), missing_columns="insert").unique(subset=KEY).height

    def pyarrow_parts(sdir: Path) -> int | None:
        return _distinct(pq.read_table(sdir / "metrics").to_pandas()) if parts_exist(sdir) else None

    def duckdb_parts(sdir: Path) -> int | None:
        if not parts_exist(sdir):
            return None
        query = f"select count(*) from (select distinct trial_id, step from read_parquet('{_glob(sdir)}', union_by_name=true))"
        return int(duckdb.sql(query).fetchall()[0][0])  # type: ignore[union-attr]

    def final_file(read: Callable[[Path], int]) -> Callable[[Path], int | None]:
        return lambda sdir: read(_final(sdir)) if _final(sdir).exists() else None

    return {
        "mmdsweep.results.read_metrics": project,
        "mmdsweep.results.read_trials": project_trials,
        "mmdsweep.analysis.load_sweep": analysis,
        "pandas metrics/": pandas_parts,
        "polars metrics/*.parquet": polars_parts,
        "pyarrow metrics/": pyarrow_parts,
        "duckdb metrics/*.parquet": duckdb_parts,
        "pandas metrics.parquet": final_file(lambda p: _distinct(pd.read_parquet(p))),
        "polars metrics.parquet": final_file(lambda p: pl.read_parquet(p).height),
        "pyarrow metrics.parquet": final_file(lambda p: pq.read_table(p).num_rows),
        "duckdb metrics.parquet": final_file(
            lambda p: int(duckdb.sql(f"select count(*) from '{p}'").fetchall()[0][0])  # type: ignore[union-attr]
        ),
    }


def read_while(
    sdir: Path, running: Callable[[], bool], pause: float
) -> tuple[dict[str, list[int]], list[str]]:
    """Read with every reader until ``running()`` is false, then once more; counts and failures."""
    counts: dict[str, list[int]] = {name: [] for name in readers()}
    failures: list[str] = []
    funcs = readers()
    last_round = False
    while True:
        done = not running()
        for name, read in funcs.items():
            try:
                n = read(sdir)
            except Exception as exc:  # every failure is the test's finding
                failures.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
            else:
                if n is not None:
                    counts[name].append(n)
        if last_round:
            return counts, failures
        last_round = done
        time.sleep(pause)


def assert_monotone(counts: dict[str, list[int]]) -> None:
    for name, seen in counts.items():
        drops = [(a, b) for a, b in zip(seen, seen[1:]) if b < a]
        assert not drops, f"{name}: row count went down {drops[:5]}"
