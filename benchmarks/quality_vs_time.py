"""FID (final protocol) against fine-tuning wall time for ``finetune.train: weights | timesteps | both`` (issue 9).

The final protocol of :mod:`mmdsweep.train.protocol`, the same code and cache as the sweep and
``python -m mmdsweep.evaluate``: the held-out reference (digits: the test split, never seen by pretraining,
the bank or selection), k fresh noise seeds (``eval.final_seeds``), N = ``eval.final_num_samples`` images
per seed, mean +- std (ddof=1) over the seeds, in the primary space and every ``features.extra_eval`` space.
Each fine-tuning run (one per mode, the experiment's own hyper-parameters, ``--set`` to change them) saves
a checkpoint every ``--eval-every`` steps; every checkpoint is scored on its recorded chain (a learned grid
rounded to integers: what an export gives users). The best training-free baseline at the same T (every
sampler x spacing of :data:`~mmdsweep.train.protocol.BASELINE_SAMPLERS` x ``BASELINE_SPACINGS``, cached and
shared with the sweep) is the horizontal line, with its +-1 std band. The x axis is the fine-tuning wall
time (the loop's time to the checkpoint, including its own small selection evaluations); the final scoring
is not counted.

    python benchmarks/quality_vs_time.py experiments/digits.yaml [--T 5] [--steps 60] [--eval-every 20]

Writes ``benchmarks/results/quality_vs_time.{md,png}`` and appends its rows to
``benchmarks/results/quality_vs_time.parquet`` (``evaluation.parquet``'s schema).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mmdsweep.config import add_set_argument, load_experiment, parse_override
from mmdsweep.inference.generate import prepare_model, quiet_diffusers
from mmdsweep.train import protocol as ev
from mmdsweep.train.loop import run_finetune
from mmdsweep.train.reporting import LocalReporter
from mmdsweep.utils import set_threads


def _mean_std(rows: list[dict[str, Any]], space: str) -> tuple[float, float]:
    fids = [r["fid"] for r in rows if r["space"] == space]
    mean = sum(fids) / len(fids)
    std = math.sqrt(sum((f - mean) ** 2 for f in fids) / (len(fids) - 1)) if len(fids) > 1 else math.nan
    return mean, std


def verdict_lines(rows: Any, primary: str) -> list[str]:
    """Markdown: every checkpoint against the best training-free baseline at its T in each space, paired by
    seed (:func:`mmdsweep.results.evaluation.final_comparison`, the sweep's own verdict)."""
    from mmdsweep.results.evaluation import final_comparison

    cmp = final_comparison(rows, primary)
    out = [
        "## Against the best training-free baseline (paired by seed; better/worse = |gain| > 2 std)",
        "",
        "| space | checkpoint | FID | best baseline | baseline FID | gain | 2 std | verdict |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for _, r in cmp.iterrows():
        out.append(
            f"| {r['space']} | {r['model']} | {r['fid_mean']:.3f} +- {r['fid_std']:.3f} | {r['best_baseline']} | "
            f"{r['baseline_fid_mean']:.3f} +- {r['baseline_fid_std']:.3f} | {r['gain']:+.3f} | "
            f"{2 * r['diff_std']:.3f} | {r['verdict']} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment", nargs="?", help="experiment YAML (not needed with --verdicts)")
    add_set_argument(ap)
    ap.add_argument("--T", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--modes", nargs="+", default=["weights", "timesteps", "both"])
    ap.add_argument("--out", default="benchmarks/results/quality_vs_time")
    ap.add_argument(
        "--verdicts",
        metavar="PARQUET",
        help="only print the paired verdicts of an earlier run's Parquet file (no training) and exit",
    )
    args = ap.parse_args(argv)
    if args.verdicts:
        import pandas as pd

        rows = pd.read_parquet(args.verdicts)
        print("\n".join(verdict_lines(rows, str(rows[rows["kind"] == "model"]["space"].iloc[0]))))
        return 0
    if args.experiment is None:
        ap.error("the experiment YAML is required (unless --verdicts)")
    quiet_diffusers()
    device = torch.device("cpu")
    exp = load_experiment(args.experiment, dict(parse_override(s) for s in args.set)).with_overrides(
        {
            "sampler.timesteps": args.T,
            "finetune.steps": args.steps,
            "finetune.eval_every": args.eval_every,
            "finetune.device": "cpu",
        }
    )
    set_threads(exp.finetune.threads)
    t0 = time.perf_counter()
    from mmdsweep.train.pretrain import resolve_model_source

    src = resolve_model_source(exp)  # pretrains the embedded default's model once (cached)
    base_dir = str(src.model_dir)
    den, _, _, _ = prepare_model(base_dir, device)
    evaluator = ev.build_final_evaluator(exp, den.channels, device)
    spaces = [exp.features.eval, *[n for n in exp.features.extra_eval if n != exp.features.eval]]
    all_rows = ev.baseline_rows(exp, base_dir, [args.T], evaluator, show_progress=True)
    baselines: dict[str, dict[str, tuple[float, float]]] = {}
    for r in all_rows:
        baselines.setdefault(f"{r['sampler']} {r['spacing']}", {})
    for name in baselines:
        sampler, spacing = name.split()
        mine = [r for r in all_rows if r["sampler"] == sampler and r["spacing"] == spacing]
        baselines[name] = {sp: _mean_std(mine, sp) for sp in spaces}
    best = {sp: min(baselines, key=lambda k, sp=sp: baselines[k][sp][0]) for sp in spaces}
    start_name = f"{exp.sampler.name} {exp.sampler.timestep_spacing or 'leading'}"
    curves: dict[str, list[tuple[int, float, dict[str, tuple[float, float]], list[int] | None]]] = {}
    with tempfile.TemporaryDirectory(prefix="qvt-") as tmp:
        for mode in args.modes:
            run_exp = exp.with_overrides({"finetune.train": mode})
            run_dir = Path(tmp) / mode
            run_finetune(run_exp, LocalReporter(run_dir, device="cpu", num_to_keep=1000, keep_best=None))
            reports = [
                json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()
            ]
            pts: list[tuple[int, float, dict[str, tuple[float, float]], list[int] | None]] = [
                (0, 0.0, baselines.get(start_name, {}), None)
            ]
            for rep in reports:
                ck = Path(rep["checkpoint_path"])
                rows = ev.final_rows_for_model(run_exp, ck, evaluator, label=f"{mode}@{rep['step']}")
                for r in rows:
                    r["trial_id"] = f"quality_vs_time:{mode}:{rep['step']}"
                all_rows += rows
                state = json.loads((ck / "state.json").read_text())
                grid = state.get("timestep_grid_int") or state.get("chain", {}).get("grid")
                scores = {sp: _mean_std(rows, sp) for sp in spaces}
                pts.append((int(rep["step"]), float(rep["elapsed_s"]), scores, grid))
                m, s = scores[spaces[0]]
                print(
                    f"{mode} step {rep['step']} ({rep['elapsed_s']:.0f} s): FID {m:.3f} +- {s:.3f} grid {grid}"
                )
            curves[mode] = pts
    total = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ev.write_evaluation(all_rows, out.with_suffix(".parquet"))
    N = evaluator.num_samples
    seeds = list(exp.eval.final_seeds)
    ft = exp.finetune
    lines = [
        f"# FID vs fine-tuning wall time at T={args.T}",
        "",
        f"`python benchmarks/quality_vs_time.py {args.experiment} --T {args.T} --steps {args.steps} "
        f"--eval-every {args.eval_every}"
        + ("" if args.modes == ["weights", "timesteps", "both"] else f" --modes {' '.join(args.modes)}")
        + "".join(f" --set {s}" for s in args.set)
        + "` "
        f"({platform.machine()}, {torch.get_num_threads()} torch thread(s), {total / 60:.1f} min in all).",
        "",
        f"Final protocol: reference {evaluator.reference_name}, N = {N} images x k = {len(seeds)} fresh seeds "
        f"{seeds}, mean +- std (ddof=1) over the seeds; spaces {', '.join(spaces)} (first = primary). "
        f"Training: {exp.sampler.name} from the {exp.sampler.timestep_spacing or 'leading'} grid, features "
        f"{exp.features.train}, kernel {exp.kernel.type}, batch {ft.batch_size} (real {ft.real_batch_size}), "
        f"lr {ft.lr}, timestep_lr {ft.timestep_lr}, {args.steps} steps. Fine-tuned checkpoints are scored on "
        "their recorded chain (a learned grid rounded to integers).",
        "",
        "## Training-free baselines at this T",
        "",
        "| sampler | spacing | " + " | ".join(f"FID {sp}" for sp in spaces) + " |",
        "|---|---|" + "---:|" * len(spaces),
    ]
    for k, sc in sorted(baselines.items(), key=lambda kv: kv[1][spaces[0]][0]):
        lines.append(
            f"| {k.split()[0]} | {k.split()[1]} | "
            + " | ".join(f"{sc[sp][0]:.3f} +- {sc[sp][1]:.3f}" for sp in spaces)
            + " |"
        )
    lines += [
        "",
        *[
            f"Best in {sp}: **{best[sp]}**, {baselines[best[sp]][sp][0]:.3f} +- {baselines[best[sp]][sp][1]:.3f}."
            for sp in spaces
        ],
    ]
    lines += [
        "",
        "## Fine-tuning (step 0 = the training-free chain it starts from)",
        "",
        "| train | step | wall time (s) | " + " | ".join(f"FID {sp}" for sp in spaces) + " | rounded grid |",
        "|---|---:|---:|" + "---:|" * len(spaces) + "---|",
    ]
    for mode, pts in curves.items():
        for step, el, scores, grid in pts:
            cells = " | ".join(
                f"{scores[sp][0]:.3f} +- {scores[sp][1]:.3f}" if sp in scores else "-" for sp in spaces
            )
            lines.append(f"| {mode} | {step} | {el:.0f} | {cells} | {grid if grid else '(start)'} |")
    lines += ["", *verdict_lines(all_rows, spaces[0])]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(spaces), figsize=(6 * len(spaces), 4), squeeze=False)
    for ax, sp in zip(axes[0], spaces):
        for mode, pts in curves.items():
            got = [p for p in pts if sp in p[2]]
            ax.errorbar(
                [p[1] for p in got],
                [p[2][sp][0] for p in got],
                yerr=[p[2][sp][1] for p in got],
                marker="o",
                capsize=3,
                label=f"train: {mode}",
            )
        bm, bs = baselines[best[sp]][sp]
        ax.axhline(bm, color="k", ls="--", label=f"best training-free ({best[sp]})")
        ax.axhspan(bm - bs, bm + bs, color="k", alpha=0.1)
        ax.set_xlabel("fine-tuning wall time (s)")
        ax.set_ylabel(f"FID in {sp} (held-out reference)")
        ax.set_title(f"T={args.T}: mean +- std over {len(seeds)} seeds, N={N}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.md')}, .png and .parquet ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
