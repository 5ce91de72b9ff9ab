"""Readers never see a torn results file and never lose a row while a sweep writes (issue 10, part 5).

Reads the results in a loop, while a sweep runs and after it ends, with every library a user
would reach for: the project's readers (``mmdsweep.results.read_metrics``/``read_trials``,
``mmdsweep.analysis.load_sweep``) and pandas, polars, pyarrow and DuckDB directly on the paths
``docs/results.md`` tells users to read (the parts ``metrics/*.parquet`` while the sweep runs,
``metrics.parquet`` once it has ended). Every read must succeed and the number of distinct
reports a reader sees must never go down.

The old writer replaced ``metrics.parquet`` after every event: 5 of 1,258 pandas, 63 of 1,195
polars and 3 pyarrow reads failed ("Couldn't deserialize thrift", "page header reported the
wrong page size").
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import run_tune_cli, sweep_yaml

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


_WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from mmdsweep.results import ResultsWriter
w = ResultsWriter({out!r}, "stress", {{"a": "float"}}, "e", flush_every=3, flush_seconds=0.05)
for step in range(1, {steps} + 1):
    for t in range(4):
        w.trial_result(f"t{{t}}", {{"a": 0.1}}, {{"step": step, "loss": 1.0 / step, "fid@s{{step % 5}}": 2.0}})
    if step % 25 == 0:
        w.trial_completed(f"t{{step % 4}}")
    time.sleep(0.02)
w.close()
"""


def test_readers_never_fail_while_a_writer_flushes_fast(tmp_path: Path) -> None:
    """A writer flushing every 3 events (new columns appearing), compacting at the end."""
    from mmdsweep import analysis  # noqa: F401  (imported before the clock starts)

    steps = 100
    code = _WRITER.format(root=str(Path(__file__).resolve().parents[1]), out=str(tmp_path), steps=steps)
    proc = subprocess.Popen([sys.executable, "-c", code])
    counts, failures = read_while(tmp_path, lambda: proc.poll() is None, pause=0.0)
    assert proc.wait(timeout=60) == 0
    assert not failures, failures[:10]
    assert_monotone(counts)
    total = 4 * steps
    for name, seen in counts.items():
        assert seen and seen[-1] == (4 if "trials" in name else total), (name, seen[-3:])
    assert len(counts["mmdsweep.results.read_metrics"]) >= 5  # it really read while writing
    assert len(set(counts["polars metrics/*.parquet"])) >= 3  # and saw the table grow


@pytest.mark.slow
def test_readers_never_fail_during_a_real_sweep(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real two-trial sweep through the CLI (Ray Train in Ray Tune), read in a loop throughout."""
    monkeypatch.setenv(
        "MMDSWEEP_RESULTS_FLUSH_SECONDS", "0.5"
    )  # parts while trials run, not only at their end
    p = sweep_yaml(
        tiny_root,
        tmp_path,
        num_samples=2,
        scheduler="fifo",
        max_concurrent_trials=2,
        space={"finetune.lr": {"loguniform": [1.0e-5, 1.0e-4]}, "sampler.timesteps": {"choice": [2, 3]}},
    )
    sdir = tmp_path / "results" / "sweep"
    proc = run_tune_cli([str(p)])
    printed: list[str] = []
    drain = threading.Thread(target=lambda: printed.extend(proc.stdout or []), daemon=True)
    drain.start()  # a full pipe would block the sweep
    counts, failures = read_while(sdir, lambda: proc.poll() is None, pause=0.2)
    drain.join(timeout=30)
    assert proc.wait(timeout=60) == 0, "".join(printed)[-3000:]
    assert not failures, failures[:10]
    assert_monotone(counts)
    metrics = R.read_metrics(sdir)
    assert len(metrics) == 2 * 4  # 2 trials x 4 reports (eval_every 1, 4 steps)
    assert {"world_size", "status", "fid_before", "training_iteration"} <= set(metrics.columns)
    for name, seen in counts.items():
        assert seen and seen[-1] == (2 if "trials" in name else len(metrics)), (name, seen[-3:])
    live = [n for n in counts["polars metrics/*.parquet"] if n < len(metrics)]
    print(f"reads per reader: { {k: len(v) for k, v in counts.items()} }; partial views seen: {len(live)}")
    assert len(set(live)) >= 2, counts["polars metrics/*.parquet"]  # it saw the table grow mid-sweep
