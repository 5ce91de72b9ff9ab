"""Sample quality on the embedded default under the FINAL protocol (docs/results.md, "Protocol").

Every training-free baseline (DDIM, DPM-Solver++(2M), DPM-Solver++(3M), UniPC-bh2, each on the leading,
trailing, linspace and quadratic grids) at T = 5 and 10, DDIM (its standard leading grid) at T = 50 and 100,
real training images (the metric's floor: :func:`mmdsweep.train.protocol.real_floor_rows`) and optionally
fine-tuned checkpoints (``--finetuned DIR ...``, their recorded chains), each scored with
k >= 3 fresh noise seeds (``eval.final_seeds``) x N images against the HELD-OUT reference (the digits test
split, never seen by pretraining, the bank or selection), in the classifier space (primary) and the
MobileNetV2 space, reported as mean +- std (ddof=1) over the seeds.  Real and generated images get the same
preprocessing (uint8 quantisation, clean-fid's PIL-bicubic resize to the space's input size), recorded below.

    python benchmarks/quality.py [experiments/digits.yaml] [--num-samples 250] [--finetuned DIR ...]

Writes ``benchmarks/results/quality.md`` and ``benchmarks/results/evaluation.parquet`` (schema:
``mmdsweep.evaluate.evaluation_schema``).  Baselines are cached by (model content, protocol, chain).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}" if math.isfinite(std) else f"{mean:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", nargs="?", default=str(ROOT / "experiments" / "digits.yaml"))
    ap.add_argument("--num-samples", type=int, default=250, help="N per seed (final protocol)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: eval.final_seeds")
    ap.add_argument("--few", type=int, nargs="+", default=[5, 10], help="T for every baseline")
    ap.add_argument("--long", type=int, nargs="+", default=[50, 100], help="T for DDIM (leading) only")
    ap.add_argument("--finetuned", nargs="*", default=[], help="fine-tuned checkpoint directories")
    ap.add_argument(
        "--include",
        nargs="*",
        default=[],
        help="evaluation.parquet files (a sweep's, benchmarks/quality_vs_time.py's) whose fine-tuned rows were "
        "scored under the same final protocol (seeds, N, reference): added as they are",
    )
    ap.add_argument("--samplers", nargs="+", default=None, help="baseline samplers (default: all)")
    ap.add_argument("--spacings", nargs="+", default=None, help="baseline spacings (default: all)")
    from mmdsweep.config import add_set_argument

    add_set_argument(ap)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.md"))
    ap.add_argument("--parquet", default=str(ROOT / "benchmarks" / "results" / "evaluation.parquet"))
    args = ap.parse_args()

    import pandas as pd

    from mmdsweep.assets import components as comp
    from mmdsweep.config import load_experiment, parse_override
    from mmdsweep.inference.generate import prepare_model, quiet_diffusers
    from mmdsweep.train import protocol as ev
    from mmdsweep.utils import resolve_device, set_threads

    overrides: dict[str, Any] = dict(parse_override(x) for x in args.set)
    overrides["eval.final_num_samples"] = args.num_samples
    if args.seeds:
        overrides["eval.final_seeds"] = args.seeds
    exp = load_experiment(args.experiment, overrides)
    quiet_diffusers()
    set_threads(exp.finetune.threads)
    device = resolve_device(exp.finetune.device)
    t_all = time.time()
    src = comp.resolve_model_source(exp)
    den, _, _, _ = prepare_model(src.model_dir, device)
    evaluator = ev.build_final_evaluator(exp, den.channels, device)
    rows = ev.baseline_rows(
        exp,
        src.model_dir,
        args.long,
        evaluator,
        samplers=("ddim",),
        spacings=("leading",),
        show_progress=True,
    )
    rows += ev.baseline_rows(
        exp,
        src.model_dir,
        args.few,
        evaluator,
        samplers=tuple(args.samplers or ev.BASELINE_SAMPLERS),
        spacings=tuple(args.spacings or ev.BASELINE_SPACINGS),
        show_progress=True,
    )
    rows += ev.real_floor_rows(exp, evaluator, den.channels)
    for ckpt in args.finetuned:
        t0 = time.time()
        rows += ev.final_rows_for_model(exp, ckpt, evaluator, device=device)
        print(f"fine-tuned {ckpt}: {time.time() - t0:.0f}s", file=sys.stderr)
    want = (sorted(exp.eval.final_seeds), args.num_samples, evaluator.reference_name)
    for path in args.include:
        got = ev.read_evaluation(path)
        got = got[(got["kind"] == "model") & (got["protocol"] == "final")]
        for key, grp in got.groupby(["model", "space"]):
            have = (
                sorted(int(x) for x in grp["seed"]),
                int(grp["num_samples"].iloc[0]),
                grp["reference"].iloc[0],
            )
            if have != want:
                print(f"--include {path}: {key} skipped: protocol {have} != {want}", file=sys.stderr)
                continue
            pre = evaluator.preprocessing()
            if key[1] not in pre or set(grp["preprocessing"]) != {pre[key[1]]}:
                # the same space name at another input size (e.g. features.train_resize) is another space
                print(
                    f"--include {path}: {key} skipped: preprocessing {set(grp['preprocessing'])}",
                    file=sys.stderr,
                )
                continue
            rows += [
                {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                for r in grp.to_dict("records")
            ]
    elapsed = time.time() - t_all
    ev.write_evaluation(rows, args.parquet, append=False)
    summ = ev.summarize(rows)
    spaces = list(evaluator.spaces)
    primary = exp.features.eval
    pre = evaluator.preprocessing()
    k = len(exp.eval.final_seeds)
    lines = [
        "# Sample quality, final protocol (generated by benchmarks/quality.py)",
        "",
        f"Model: the embedded default's pretrained DDPM (`{Path(src.model_dir).name}`).  Final protocol: "
        f"k = {k} fresh noise seeds {list(exp.eval.final_seeds)} x N = {args.num_samples} images each, "
        f"reference `{evaluator.reference_name}` ({next(iter(evaluator.references.values())).n} images, never used "
        "by pretraining, selection or the MMD bank), mean ± std (ddof = 1) over the seeds.  Lower is better.",
        "",
        "Preprocessing (identical for real and generated images):",
        "",
        *[f"* {pre[s]}" for s in spaces],
        "",
        f"Wall time of this run: {elapsed:.0f} s (2 cores; cached baselines and included rows cost nothing).",
        "",
    ]
    for space in spaces:
        s = summ[summ["space"] == space].copy()
        lines += [f"## FID in `{space}`" + (" (primary)" if space == primary else ""), ""]
        header = "| T | sampler | leading | trailing | linspace | quadratic |"
        lines += [header, "|---|---|---|---|---|---|"]
        for T in sorted(s["timesteps"].unique()):
            st = s[(s["timesteps"] == T) & (s["kind"] == "baseline")]
            best = st["fid_mean"].min() if len(st) else math.nan
            for sampler in ev.BASELINE_SAMPLERS:
                cells = []
                for spacing in ev.BASELINE_SPACINGS:
                    r = st[(st["sampler"] == sampler) & (st["spacing"] == spacing)]
                    if r.empty:
                        cells.append("")
                        continue
                    txt = _fmt(float(r["fid_mean"].iloc[0]), float(r["fid_std"].iloc[0]))
                    cells.append(f"**{txt}**" if float(r["fid_mean"].iloc[0]) == best else txt)
                if any(cells):
                    lines.append(f"| {T} | {sampler} | " + " | ".join(cells) + " |")
            for _, r in s[(s["timesteps"] == T) & (s["kind"] == "model")].iterrows():
                lines.append(
                    f"| {T} | fine-tuned {r['sampler']} ({r['trial_id'] or Path(str(r['model'])).name}) | "
                    f"{_fmt(r['fid_mean'], r['fid_std'])} ({r['spacing']}) | | | |"
                )
        real = s[s["kind"] == "real"]
        for _, r in real.iterrows():
            lines += [
                "",
                f"Real training images (the bank, a seeded subset of N = {int(r['num_samples'])} per seed) scored "
                f"the same way: **{_fmt(r['fid_mean'], r['fid_std'])}**, the metric's floor at this N: a sampler "
                "that drew exactly from the training data would score this; no chain is expected below it.",
            ]
        warns = sorted({w for w in s["warnings"] if w})
        if warns:
            lines += ["", "Metric warnings (not silenced):", "", *[f"* {w}" for w in warns]]
        lines.append("")
    # each fine-tuned model against the best training-free sampler at its T, in every space (paired by seed)
    comp = ev.final_comparison(rows, primary)
    for space in spaces:
        c = comp[comp["space"] == space]
        bb = ev.best_baselines(summ, space)
        lines += [
            f"## Best training-free sampler per T and the fine-tuned models: `{space}`"
            + (" (primary)" if space == primary else ""),
            "",
            "| T | best baseline | final FID | fine-tuned | final FID | gain | 2 x std of the per-seed gain | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for _, b in bb.iterrows():
            T = int(b["timesteps"])
            m = c[c["timesteps"] == T]
            if m.empty:
                lines.append(
                    f"| {T} | {b['sampler']}/{b['spacing']} | {_fmt(b['fid_mean'], b['fid_std'])} | - | | | | |"
                )
            for _, r in m.iterrows():
                name = r["trial_id"] or Path(str(r["model"])).name
                lines.append(
                    f"| {T} | {r['best_baseline']} | {_fmt(r['baseline_fid_mean'], r['baseline_fid_std'])} | "
                    f"{name} ({r['sampler']}) | {_fmt(r['fid_mean'], r['fid_std'])} | {r['gain']:+.3f} | "
                    f"{2 * r['diff_std']:.3f}{'' if r['paired'] else ' (unpaired)'} | {r['verdict']} |"
                )
        lines.append("")
    lines.append("")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    pd.set_option("display.width", 200)
    return 0


if __name__ == "__main__":
    sys.exit(main())
