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
from pathlib import Path

import pytest
from conftest import SweepRun
from live_reading import assert_monotone, read_while

from mmdsweep import results as R

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
def test_readers_never_fail_during_a_real_sweep(tiny_sweep: SweepRun) -> None:
    """The shared real sweep (4 trials through the CLI: Ray Train in Ray Tune, ASHA, one diverging trial),
    read in a loop by every reader throughout (conftest.py's ``tiny_sweep`` does the reading)."""
    sdir, _ = tiny_sweep
    counts, failures = tiny_sweep.counts, tiny_sweep.failures
    assert not failures, failures[:10]
    assert_monotone(counts)
    metrics = R.read_metrics(sdir)
    trials = R.read_trials(sdir)
    assert len(trials) == 4 and len(metrics) >= 4
    assert {"world_size", "status", "fid_before", "training_iteration"} <= set(metrics.columns)
    for name, seen in counts.items():
        assert seen and seen[-1] == (len(trials) if "trials" in name else len(metrics)), (name, seen[-3:])
    live = [n for n in counts["polars metrics/*.parquet"] if n < len(metrics)]
    print(f"reads per reader: { {k: len(v) for k, v in counts.items()} }; partial views seen: {len(live)}")
    assert len(set(live)) >= 2, counts["polars metrics/*.parquet"]  # it saw the table grow mid-sweep
