"""Cost per Tune event of the results callback: append-only parts (now) vs whole rewrites (before).

Drives ``mmdsweep.sweep.callback.ParquetResultsCallback`` through its Tune hooks with fake trial
objects (no Ray cluster): 1,000 trials of 100 reports each (100,000 report rows), 10 trials
running at a time (start, 100 interleaved reports, completion), and the sweep's end (flush +
compaction). Reports carry 18 metrics, like the fine-tuning loop's (fid@<space>, world_size, ...).

The first release's callback (``mmdsweep/results/__init__.py`` at commit fdf2ea0, read from git
history) rewrote ``trials.parquet`` and ``metrics.parquet`` whole after every event, so one event
costs O(rows so far) and a sweep O(rows^2): running it through 100,000 events would take hours.
It is measured in the same run at the same table sizes instead: its in-memory tables are filled to
N rows, then a few events are timed.

    python benchmarks/parquet_write.py            # ~1-2 minutes on 2 cores
    python benchmarks/parquet_write.py --events 20000 --old-sizes 1000,10000

Writes the table to ``benchmarks/results/parquet_write.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OLD_COMMIT = "fdf2ea0"


class FakeTrial:  # passed where Tune passes a Trial (typed Any at the call sites)
    """Just enough of ``ray.tune.experiment.Trial`` for the callback's hooks."""

    def __init__(self, trial_id: str, config: dict[str, Any]) -> None:
        self.trial_id = trial_id
        self.config = config
        self.checkpoint = None
        self.pickled_error_file = None
        self.error_file = None


def report(step: int, i: int) -> dict[str, Any]:
    """A report shaped like the fine-tuning loop's (plus Tune's own keys)."""
    fid = 50.0 / (1 + step) + (i % 7) * 0.01
    return {
        "step": step,
        "training_iteration": step,
        "loss": 1.0 / (1 + step),
        "fid": fid,
        "kid": fid / 1000,
        "fid_best": fid,
        "kid_best": fid / 1000,
        "fid@torchvision:mobilenet_v2": 2 * fid,
        "kid@torchvision:mobilenet_v2": 2 * fid / 1000,
        "bandwidth": 1.5,
        "lr": 1e-4,
        "elapsed_s": 0.5 * step,
        "timesteps": 5,
        "num_eval_samples": 400,
        "sample_time_per_image_s": 0.002,
        "world_size": 2,
        "num_nodes": 1,
        "status": "running",
        "time_this_iter_s": 0.5,
        "hostname": "node-0",
    }


def config(i: int) -> dict[str, Any]:
    return {"finetune.lr": 1e-5 * (1 + i % 10), "sampler.timesteps": 5 + i % 3, "kernel.type": "rbf"}


PARAM_TYPES = {"finetune.lr": "float", "sampler.timesteps": "int", "kernel.type": "str"}


def run_new(
    events: int, trials: int, concurrency: int, marks: list[int]
) -> tuple[dict[int, tuple[float, float]], tuple[float, float], int]:
    """Per-event (wall, CPU) microseconds in the 1,000 events before each mark; compaction s; parts."""
    from mmdsweep import results as R
    from mmdsweep.sweep.callback import ParquetResultsCallback

    reports = max(1, events // trials)
    with tempfile.TemporaryDirectory() as tmp:
        cb = ParquetResultsCallback(tmp, "bench", PARAM_TYPES, "bench")
        stamps: list[tuple[float, float]] = [(time.perf_counter(), time.process_time())]
        n = 0
        for wave in range(0, trials, concurrency):
            group: list[Any] = [
                FakeTrial(f"t{i:05d}", config(i)) for i in range(wave, min(wave + concurrency, trials))
            ]
            for t in group:
                cb.on_trial_start(0, [], t)
            for step in range(1, reports + 1):
                for j, t in enumerate(group):
                    cb.on_trial_result(0, [], t, report(step, wave + j))
                    n += 1
                    stamps.append((time.perf_counter(), time.process_time()))
                cb.on_step_end(0, [])
            for t in group:
                cb.on_trial_complete(0, [], t)
            stamps[-1] = (time.perf_counter(), time.process_time())  # completions count toward the last event
        t0, c0 = time.perf_counter(), time.process_time()
        cb.on_experiment_end([])
        compaction = (time.perf_counter() - t0, time.process_time() - c0)
        assert R.read_results_table(tmp, "metrics").num_rows == n, "rows lost"
        parts = len(R.list_parts(tmp, "metrics")) + len(R.list_parts(tmp, "trials"))
    per_event: dict[int, tuple[float, float]] = {}
    for mark in marks:
        lo, hi = max(0, mark - 1000), min(mark, n)
        wall, cpu = ((stamps[hi][k] - stamps[lo][k]) / (hi - lo) * 1e6 for k in (0, 1))
        per_event[mark] = (wall, cpu)
    return per_event, compaction, parts


def load_old() -> Any:
    """The first release's results module, from git history."""
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:mmdsweep/results/__init__.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "mmdsweep_results_v1.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("mmdsweep_results_v1", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_old(old: Any, sizes: list[int], trials: int, timed: int) -> dict[int, tuple[float, float]]:
    """Per-event microseconds of the old callback with tables of ``size`` rows."""
    out = {}
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            cb = old.ParquetResultsCallback(tmp, "bench", PARAM_TYPES, "bench")
            fakes = [FakeTrial(f"t{i:05d}", config(i)) for i in range(min(trials, max(1, size // 100)))]
            now = old._utcnow()
            for k in range(size):  # fill the in-memory tables without writing (fast)
                t = fakes[k % len(fakes)]
                step = 1 + k // len(fakes)
                cb._metrics.upsert(old._metrics_row("bench", t.trial_id, step, report(step, k), now))
                cb._row(t).apply_report(step, report(step, k), now)
            t0, c0 = time.perf_counter(), time.process_time()
            for k in range(timed):
                t = fakes[k % len(fakes)]
                cb.on_trial_result(0, [], t, report(10_000 + k, k))
            out[size] = ((time.perf_counter() - t0) / timed * 1e6, (time.process_time() - c0) / timed * 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--trials", type=int, default=1_000)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--old-sizes", default="1000,10000,50000,100000")
    ap.add_argument("--old-events", type=int, default=10, help="events timed per size for the old callback")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "parquet_write.md")
    args = ap.parse_args(argv)

    marks = [m for m in (1_000, 10_000, 50_000, 100_000) if m <= args.events] or [args.events]
    uptime = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    t0 = time.perf_counter()
    new, compaction, parts = run_new(args.events, args.trials, args.concurrency, marks)
    total_new = time.perf_counter() - t0
    sizes = [int(s) for s in args.old_sizes.split(",") if s]
    old = run_old(load_old(), sizes, args.trials, args.old_events)

    rows = [
        "| events so far | new: CPU us/event | new: wall us/event | old: CPU us/event | old: wall us/event "
        "| old / new (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for mark in sorted(set(marks) | set(sizes)):
        n = f"{new[mark][1]:.0f} | {new[mark][0]:.0f}" if mark in new else "- | -"
        o = f"{old[mark][1]:.0f} | {old[mark][0]:.0f}" if mark in old else "- | -"
        ratio = f"{old[mark][1] / new[mark][1]:.0f}x" if mark in new and mark in old else "-"
        rows.append(f"| {mark:,} | {n} | {o} | {ratio} |")
    cpu = [v[1] for v in new.values()]
    flat = max(cpu) / min(cpu)
    lines = [
        "# Results callback: cost per Tune event (`benchmarks/parquet_write.py`)",
        "",
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}, load average {uptime} at the start. {args.trials:,} trials x {max(1, args.events // args.trials)} reports "
        f"({args.events:,} report rows, 18 metrics each), {args.concurrency} trials at a time, through "
        "`ParquetResultsCallback`'s hooks with fake trials (no Ray cluster).",
        "",
        *rows,
        "",
        "- new: mean over the 1,000 events before the mark (write-ahead log line per event, a part "
        "pair per 1,000 events or per trial completion); old: the first release's callback "
        f"(git {OLD_COMMIT}) with its tables filled to that many rows, {args.old_events} events timed.",
        "- CPU = this process's CPU time (what the writer costs); wall includes waiting for the CPU "
        "and for fsync (on a shared machine it mostly measures the other load).",
        f"- new, max/min of the per-event CPU cost over the run: {flat:.2f} (flat); whole run "
        f"{total_new:.1f} s; {parts} part files.",
        f"- compaction at the sweep's end (all parts -> `trials.parquet` + `metrics.parquet`): "
        f"{compaction[1]:.2f} s CPU, {compaction[0]:.2f} s wall.",
        f"- median old/new ratio over the common sizes: "
        f"{statistics.median([old[m][1] / new[m][1] for m in old if m in new]) if any(m in new for m in old) else float('nan'):.0f}x (CPU).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
