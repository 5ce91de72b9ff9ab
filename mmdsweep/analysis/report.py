"""Self-contained HTML report of a sweep.

::

    python -m mmdsweep.report RESULTS_DIR [--out DIR] [--num-samples 64] [--device auto]

writes ``RESULTS_DIR/report/report.html`` (or ``DIR/report.html``) with every image embedded
as a base64 ``data:`` URI, so the file can be mailed or archived on its own, and the same
figures as PNG files beside it. Sections: sweep summary, final protocol (``evaluation.parquet``:
fine-tuned models vs the best training-free baseline, mean +- std over fresh seeds, per feature
space; every baseline), leaderboard, best trial per T, Pareto
fronts (FID vs T and vs measured seconds per image), learning curves, parameter sensitivity,
before/after sample grids at each exported T (identical noise), sampling speed and the
resolved experiment config.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import io
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from mmdsweep import analysis as A
from mmdsweep.fsio import atomic_write_bytes
from mmdsweep.results import PARAM_PREFIX, has_results
from mmdsweep.results.layout import SweepLayout

REPORT_DIR = "report"
REPORT_FILE = "report.html"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1200px; color: #222; background: #fff; line-height: 1.4; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
.meta { color: #555; margin-top: 0; }
nav a { margin-right: 14px; }
table.tbl { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
table.tbl th, table.tbl td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
table.tbl td.txt { text-align: left; }
table.tbl th { background: #f3f3f3; }
table.tbl tr:nth-child(even) td { background: #fafafa; }
table.kv td:first-child { font-weight: 600; text-align: left; }
.scroll { overflow-x: auto; }
.figs { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.figs img { max-width: 100%; border: 1px solid #eee; }
.pair { display: flex; gap: 24px; flex-wrap: wrap; margin: 12px 0 24px; }
.pair figure { margin: 0; text-align: center; }
.pair img { image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: 14px; margin-top: 4px; }
.note { color: #555; font-style: italic; }
table.tbl td.noise { color: #888; }
table.tbl td.better { color: #064; font-weight: 600; }
table.tbl td.worse { color: #a00; font-weight: 600; }
.error { background: #fee; border: 1px solid #c66; padding: 8px; color: #900; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; font-size: 12px; }
"""


@dataclass
class _Report:
    """Accumulates HTML sections and the PNG files written beside the report."""

    out_dir: Path
    sections: list[tuple[str, str, str]] = field(default_factory=list)  # (anchor, title, html)
    images: list[Path] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def png(self, data: bytes, name: str, alt: str, width: int | None = None) -> str:
        """Write ``name`` beside the report; return an ``<img>`` with the PNG as a data URI."""
        path = self.out_dir / name
        _write(path, data)
        self.images.append(path)
        size = f' width="{width}"' if width else ""
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return f'<img src="{uri}" alt="{html.escape(alt)}"{size}>'

    def figure(self, fig: Figure, name: str, alt: str) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        return self.png(buf.getvalue(), name, alt)

    def section(self, anchor: str, title: str, build: Callable[[], str]) -> None:
        """Add a section; a failing builder becomes an error box (and a warning on stderr)."""
        try:
            body = build()
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            self.failures.append(f"{title}: {message}")
            print(f"warning: report section {title!r} failed: {message}", file=sys.stderr)
            body = f'<div class="error">section failed: {html.escape(message)}</div>'
        self.sections.append((anchor, title, body))


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "–"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3g}"
        return f"{v:.4g}"
    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _table(df: pd.DataFrame, *, max_rows: int | None = None, row_classes: Sequence[str] | None = None) -> str:
    """An HTML table of ``df`` (pandas' Styler, escaped); ``param.`` prefixes dropped from the headers.

    Numbers are right-aligned (the table's CSS), text cells get the class ``txt`` (left-aligned);
    ``row_classes`` adds one more class to every cell of each row (e.g. ``noise``).
    """
    if df.empty:
        return '<p class="note">no rows</p>'
    shown = df.head(max_rows) if max_rows else df
    shown = shown.rename(columns=lambda c: c[len(PARAM_PREFIX) :] if str(c).startswith(PARAM_PREFIX) else c)
    shown = shown.reset_index(drop=True)
    text = [
        not (pd.api.types.is_numeric_dtype(t) and not pd.api.types.is_bool_dtype(t)) for t in shown.dtypes
    ]
    extra = list(row_classes or [])[: len(shown)]
    extra += [""] * (len(shown) - len(extra))
    classes = pd.DataFrame(
        [[" ".join(c for c in ("txt" if t else "", x) if c) for t in text] for x in extra],
        index=shown.index,
        columns=shown.columns,
    )
    styler = (
        shown.style.format(_fmt, escape="html", na_rep="–")
        .format_index(escape="html", axis=1)
        .hide(axis="index")
        .set_td_classes(classes)
        .set_table_attributes('class="tbl"')
    )
    table = styler.to_html(doctype_html=False)
    more = f'<p class="note">{len(df) - len(shown)} more rows not shown</p>' if len(shown) < len(df) else ""
    return f'<div class="scroll">{table}</div>{more}'


def _kv(items: Sequence[tuple[str, Any]]) -> str:
    """A two-column key/value table (same Styler rendering as :func:`_table`, without a header)."""
    df = pd.DataFrame([(k, _fmt(v)) for k, v in items], columns=["key", "value"])
    styler = (
        df.style.format(escape="html")
        .hide(axis="index")
        .hide(axis="columns")
        .set_table_attributes('class="tbl kv"')
    )
    return styler.to_html(doctype_html=False)


def _duration(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _grid_png(images: Any, target_width: int = 360) -> tuple[bytes, int]:
    """PNG bytes of a sample grid, and the display width (integer upscaling, pixelated)."""
    from PIL import Image

    grid = A.grid_array(images)
    scale = max(1, target_width // grid.shape[1])
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue(), grid.shape[1] * scale


# --------------------------------------------------------------------------- sections


def _summary_section(sweep: A.Sweep) -> str:
    meta = sweep.meta
    s = A.summary(sweep).iloc[0]
    items: list[tuple[str, Any]] = [
        ("sweep id", meta.get("sweep_id")),
        ("experiment", meta.get("experiment_name")),
        ("experiment file", meta.get("experiment_file")),
        ("results directory", str(sweep.dir.resolve())),
        ("base model", meta.get("base_model_dir")),
        ("sampler / spacing", f"{meta.get('sampler')} / {meta.get('spacing')}"),
        ("objectives", ", ".join(map(str, meta.get("objectives") or []))),
        ("trials", int(s["trials"])),
        ("evaluated trials", int(s["evaluated"])),
        ("reports (metrics rows)", int(s["reports"])),
        ("best FID", f"{_fmt(s['best_fid'])} at T={_fmt(s['best_timesteps'])} (trial {s['best_trial']})"),
        ("total trial wall time", _duration(float(s["trial_wall_time_s"]))),
        ("sweep span (first start to last update)", _duration(float(s["sweep_span_s"]))),
        (
            "exports",
            ", ".join(f"T={k}: {v}" for k, v in sorted(meta["exports"].items(), key=lambda kv: int(kv[0]))),
        ),
        ("Optuna storage", meta.get("optuna_storage")),
    ]
    counts = sweep.trials["status"].value_counts()
    status = pd.DataFrame({"status": counts.index, "trials": counts.to_numpy()})
    by_t = (
        sweep.trials.groupby("timesteps", dropna=False)
        .agg(trials=("trial_id", "count"), evaluated=("best_fid", "count"), best_fid=("best_fid", "min"))
        .reset_index()
    )
    return (
        _kv(items)
        + '<div class="figs"><div><h3>Trials by status</h3>'
        + _table(status)
        + "</div><div><h3>Trials by T</h3>"
        + _table(by_t)
        + "</div></div>"
    )


def _pm(mean: Any, std: Any) -> str:
    """``"1.000 ± 0.100"`` (``"–"`` without a mean; the std omitted when unknown, e.g. one seed)."""
    if mean is None or pd.isna(mean):
        return "–"
    return f"{float(mean):.3f}" + (f" ± {float(std):.3f}" if std is not None and not pd.isna(std) else "")


def _protocol_sentence(rows: pd.DataFrame, space: str) -> str:
    ks = sorted({int(k) for k in rows["k"]})
    ns = sorted({int(n) for n in rows["num_samples"]})
    refs = sorted({str(r) for r in rows["reference"]})
    pre = sorted({p for v in rows["preprocessing"] for p in str(v or "").split("; ") if p})
    return (
        f"Final protocol: k = {', '.join(map(str, ks))} fresh noise seeds × N = {', '.join(map(str, ns))} images "
        f"per seed, against the reference {', '.join(refs)}, in feature space {space}"
        + (f" (preprocessing: {'; '.join(pre)})" if pre else "")
        + "; FID mean ± std (ddof=1) over the seeds. The gain (baseline − fine-tuned FID) counts only beyond "
        "2 std of its per-seed differences (paired: model and baseline are sampled from the same noise for a "
        "seed; sqrt(s_model² + s_baseline²) where they share fewer than 2 seeds); rows within 2 std are marked "
        "“within noise”."
    )


def _final_section(sweep: A.Sweep) -> str:
    if sweep.evaluation.empty:
        return (
            '<p class="note">The final protocol has not run for this sweep: there is no '
            f"{html.escape(SweepLayout(sweep.dir).evaluation.name)} (e.g. an interrupted sweep; "
            "<code>python -m mmdsweep.tune EXPERIMENT --resume</code> finishes it, "
            "<code>python -m mmdsweep.evaluate CHECKPOINT</code> scores one model). Every number below is a "
            "selection-protocol number (validation noise and reference).</p>"
        )
    final = A.final_table(sweep)
    out = [
        '<p class="note">The sweep picks trials on the selection protocol (validation noise and reference: '
        "“selection FID”); the final protocol rescores the chosen trials and every training-free baseline "
        "(sampler × spacing of the base model) on fresh noise seeds against a held-out reference. Report "
        "the final numbers; the two are not comparable.</p>"
    ]
    for space, rows in final.groupby("space", sort=False):
        primary = bool(rows["primary"].iloc[0])
        title = f"Space {space}" + (" (primary)" if primary else "")
        shown = pd.DataFrame(
            {
                "T": rows["timesteps"].astype(int),
                "trial": rows["trial_id"],
                "train": rows["train"],
                "selection FID": rows["selection_fid"],
                "final FID": [_pm(m, s) for m, s in zip(rows["fid_mean"], rows["fid_std"])],
                "best baseline": rows["best_baseline"].fillna("–"),
                "baseline FID": [
                    _pm(m, s) for m, s in zip(rows["baseline_fid_mean"], rows["baseline_fid_std"])
                ],
                "gain": rows["gain"],
                "2 std": 2 * rows["diff_std"],
                "verdict": rows["verdict"].replace("", "no baseline"),
                "warnings": rows["warnings"],
            }
        )
        classes = ["noise" if v == "within noise" else v for v in rows["verdict"]]
        floor = ""
        if int(rows["floor_num_samples"].iloc[0]) > 0:
            f0 = rows.iloc[0]
            floor = (
                f"<p>Real training images scored the same way (N = {int(f0['floor_num_samples'])} per seed): "
                f"final FID {html.escape(_pm(f0['floor_fid_mean'], f0['floor_fid_std']))}, the metric's floor at "
                "this N: no sampler is expected below it.</p>"
            )
        out.append(
            f"<h3>{html.escape(title)}</h3><p>{html.escape(_protocol_sentence(rows, str(space)))}</p>"
            + _table(shown, row_classes=classes)
            + floor
        )
    base = A.baselines_table(sweep)
    if base.empty:
        out.append('<p class="note">No training-free baselines were scored (eval.baselines: false).</p>')
    else:
        shown = pd.DataFrame(
            {
                "space": base["space"],
                "T": base["timesteps"].astype(int),
                "rank": base["rank"],
                "sampler": base["sampler"],
                "spacing": base["spacing"],
                "FID": [_pm(m, s) for m, s in zip(base["fid_mean"], base["fid_std"])],
                "k": base["k"],
                "N": base["num_samples"],
                "reference": base["reference"],
            }
        )
        out.append(
            "<h3>Training-free baselines (final protocol)</h3>"
            '<p class="note">Every sampler × spacing of the base model at each T; rank 1 is the best baseline, '
            "the one the table above compares with.</p>" + _table(shown)
        )
    return "".join(out)


def _leaderboard_section(sweep: A.Sweep, top: int) -> str:
    lb = A.leaderboard(sweep).drop(columns=["best_checkpoint"], errors="ignore")
    return _table(lb, max_rows=top)


def _best_section(sweep: A.Sweep) -> str:
    best = A.best_per_t(sweep).drop(columns=["sweep_id", "best_checkpoint"], errors="ignore")
    return (
        '<p class="note">The best trial per timestep budget T; base FID is the pretrained model before '
        "fine-tuning (when recorded).</p>" + _table(best)
    )


def _pareto_section(rep: _Report, sweep: A.Sweep) -> str:
    parts = [rep.figure(A.plot_pareto(sweep, x="timesteps"), "pareto_timesteps.png", "FID vs T")]
    tables = [("timesteps", A.pareto_front(sweep, x="timesteps"))]
    has_speed = A.trials_with_speed(sweep)["seconds_per_image"].notna().any()
    if has_speed:
        parts.append(
            rep.figure(
                A.plot_pareto(sweep, x="seconds_per_image"), "pareto_seconds.png", "FID vs seconds per image"
            )
        )
        tables.append(("seconds_per_image", A.pareto_front(sweep, x="seconds_per_image")))
    cols = ["trial_id", "timesteps", "best_fid", "seconds_per_image", "status"]
    body = '<div class="figs">' + "".join(parts) + "</div>"
    if not has_speed:
        body += '<p class="note">No speed.parquet: run <code>python -m mmdsweep.speed RESULTS_DIR</code> for the FID vs time front.</p>'
    for x, front in tables:
        body += f"<h3>Pareto front, best FID vs {html.escape(x)}</h3>" + _table(
            front[[c for c in cols if c in front]]
        )
    return body


def _curves_section(rep: _Report, sweep: A.Sweep) -> str:
    return (
        '<div class="figs">'
        + rep.figure(A.learning_curves(sweep), "learning_curves.png", "learning curves")
        + "</div>"
    )


def _sensitivity_section(rep: _Report, sweep: A.Sweep) -> str:
    sens = A.sensitivity(sweep)
    note = html.escape(str(sens.attrs.get("note", "")))
    img = rep.figure(A.plot_sensitivity(sens), "sensitivity.png", "parameter sensitivity")
    return (
        f'<p class="note">Method: {html.escape(str(sens.attrs.get("method")))}. {note}</p><div class="figs">{img}</div>'
        + _table(sens)
    )


def _samples_section(rep: _Report, sweep: A.Sweep, num: int, seed: int, device: str) -> str:
    if not sweep.meta.get("exports"):
        return '<p class="note">sweep.json lists no exported models.</p>'
    pairs = A.before_after_grids(sweep, num=num, seed=seed, device=device)
    out = [
        f'<p class="note">{num} samples per model from identical initial noise (seed {seed}): '
        "sample i of the base model and of the fine-tuned export start from the same x_T.</p>"
    ]
    for pair in pairs:
        figures = []
        if pair.base is not None:
            data, width = _grid_png(pair.base)
            caption = f"base model, {pair.base_sampler}, T={pair.timesteps} · {A.fid_label(pair.base_fid)}"
            img = rep.png(data, f"samples_T{pair.timesteps}_base.png", caption, width)
            figures.append(f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>")
        data, width = _grid_png(pair.tuned)
        trial = f" (trial {pair.trial_id})" if pair.trial_id else ""
        caption = f"fine-tuned, {pair.sampler}, T={pair.timesteps} · {A.fid_label(pair.tuned_fid)}{trial}"
        img = rep.png(data, f"samples_T{pair.timesteps}_finetuned.png", caption, width)
        figures.append(f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>")
        out.append(f'<h3>T = {pair.timesteps}</h3><div class="pair">{"".join(figures)}</div>')
    return "".join(out)


def _speed_section(sweep: A.Sweep) -> str:
    if sweep.speed.empty:
        return '<p class="note">No speed.parquet in the results directory.</p>'
    cols = [
        "model",
        "sampler",
        "timesteps",
        "seconds_per_image",
        "device",
        "device_name",
        "batch_size",
        "num_images",
        "measured_at",
    ]
    df = sweep.speed[[c for c in cols if c in sweep.speed.columns]].copy()
    df["ms_per_image"] = 1000 * df["seconds_per_image"].astype(float)
    return _table(df)


def _config_section(sweep: A.Sweep) -> str:
    path = SweepLayout(sweep.dir).experiment
    if not path.is_file():
        return '<p class="note">No experiment.yaml in the results directory.</p>'
    return f"<details><summary>experiment.yaml</summary><pre>{html.escape(path.read_text())}</pre></details>"


# --------------------------------------------------------------------------- build


def build_report(
    results_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    num_samples: int = 64,
    seed: int = 0,
    device: str = "auto",
    top: int = 20,
    samples: bool = True,
) -> Path:
    """Write ``report.html`` (and its PNG figures) for a sweep; return the HTML's path.

    Raises:
        FileNotFoundError: ``results_dir`` has no ``trials.parquet``.
    """
    results = Path(results_dir)
    if not has_results(results):  # trials.parquet, or its parts while the sweep runs
        raise FileNotFoundError(
            f"{results} has no {SweepLayout(results).trials.name}; not a sweep results directory"
        )
    out = Path(out_dir) if out_dir is not None else results / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    sweep = A.load_sweep(results)
    rep = _Report(out_dir=out)
    rep.section("summary", "Summary", lambda: _summary_section(sweep))
    rep.section("final", "Final protocol", lambda: _final_section(sweep))
    rep.section("leaderboard", f"Leaderboard (top {top})", lambda: _leaderboard_section(sweep, top))
    rep.section("best", "Best trial per T", lambda: _best_section(sweep))
    rep.section("pareto", "Pareto fronts", lambda: _pareto_section(rep, sweep))
    rep.section("curves", "Learning curves", lambda: _curves_section(rep, sweep))
    rep.section("sensitivity", "Parameter sensitivity", lambda: _sensitivity_section(rep, sweep))
    if samples:
        rep.section(
            "samples",
            "Samples: base vs fine-tuned",
            lambda: _samples_section(rep, sweep, num_samples, seed, device),
        )
    rep.section("speed", "Sampling speed", lambda: _speed_section(sweep))
    rep.section("config", "Experiment config", lambda: _config_section(sweep))
    path = out / REPORT_FILE
    _write(path, _render(sweep, rep).encode())
    return path


def _write(path: Path, data: bytes) -> None:
    """Atomic write, readable by all (a report is meant to be shared or served)."""
    atomic_write_bytes(path, data)
    os.chmod(path, 0o644)


def _render(sweep: A.Sweep, rep: _Report) -> str:
    title = f"mmdsweep report: {sweep.meta.get('sweep_id')}"
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t, _ in rep.sections)
    body = "".join(f'<section id="{a}"><h2>{html.escape(t)}</h2>{b}</section>' for a, t, b in rep.sections)
    experiment = html.escape(str(sweep.meta.get("experiment_name") or ""))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="meta">experiment {experiment} · generated {now}</p>'
        f"<nav>{nav}</nav>{body}</body></html>\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmdsweep.report", description="Write a self-contained HTML report of a sweep."
    )
    parser.add_argument("results_dir", help="sweep results directory (with trials.parquet)")
    parser.add_argument("--out", default=None, help="output directory (default RESULTS_DIR/report)")
    parser.add_argument("--num-samples", type=int, default=64, help="images per sample grid (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the sample grids")
    parser.add_argument("--device", default="auto", help="device for the sample grids: auto, cpu, cuda")
    parser.add_argument("--top", type=int, default=20, help="leaderboard rows (default 20)")
    parser.add_argument("--no-samples", action="store_true", help="skip the sample grids")
    args = parser.parse_args(argv)
    trials = SweepLayout(args.results_dir).trials
    if not has_results(args.results_dir):
        print(
            f"error: {trials} not found: {args.results_dir} is not a sweep results directory", file=sys.stderr
        )
        return 2
    from mmdsweep.inference.generate import quiet_diffusers  # torch and diffusers: only for the sample grids

    quiet_diffusers()
    t0 = time.perf_counter()
    path = build_report(
        args.results_dir,
        args.out,
        num_samples=args.num_samples,
        seed=args.seed,
        device=args.device,
        top=args.top,
        samples=not args.no_samples,
    )
    print(f"report: {path} (built in {time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
