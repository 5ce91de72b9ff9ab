"""FID (final protocol) against fine-tuning wall time for ``finetune.train: weights | timesteps | both`` (issue 9).

Final protocol, implemented minimally here because the evaluation branch's final-protocol API is not in this
branch: a held-out reference (for digits the test split, ``data.split: test``: never seen by pretraining, the
bank or selection), k fresh noise seeds (default 1001 1002 1003, not the selection seed), N samples per
seed, mean +- std over the seeds, in the primary evaluation space. Every fine-tuning checkpoint is scored on
its *rounded* grid (what an export gives users). The best training-free sampler at the same T (DDIM and
DPM-Solver++(2M) on the leading / trailing / linspace / quadratic grids) is scored the same way and drawn as a
horizontal line with its +-1 std band.

    OMP_NUM_THREADS=1 python benchmarks/quality_vs_time.py experiments/digits.yaml          # ~15 min on 2 cores

Writes ``benchmarks/results/quality_vs_time.{md,png}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mmdsweep.assets import components as comp
from mmdsweep.assets.models import load_denoiser
from mmdsweep.config import load_experiment, parse_override
from mmdsweep.core.timegrid import SPACINGS, spacing_timesteps
from mmdsweep.inference.evaluation import Evaluator
from mmdsweep.train.loop import build_setup, run_finetune
from mmdsweep.train.reporting import LocalReporter
from mmdsweep.utils import set_threads


def final_evaluators(exp: Any, device: torch.device, seeds: list[int], n: int) -> tuple[list[Evaluator], str]:
    """One evaluator per fresh seed against the held-out reference in the primary space."""
    src = comp.resolve_model_source(exp, allow_pretrain=False)
    den = comp.load_model(exp, src, device)
    ref_exp = exp.with_overrides({"data.split": "test"})
    name = exp.features.eval
    space = comp.build_space(ref_exp, name, src, device, for_eval=True)
    ref = comp.build_reference(
        ref_exp, space, comp.space_id(ref_exp, name, src, for_eval=True), den.channels, device
    )
    e = exp.eval
    evs = [
        Evaluator(
            {name: space},
            {name: ref},
            primary=name,
            num_samples=n,
            batch_size=e.batch_size,
            seed=s,
            kid_subsets=e.kid_subsets,
            kid_subset_size=e.kid_subset_size,
            device=device,
        )
        for s in seeds
    ]
    return evs, f"held-out digits test split ({len(ref.feats) if ref.feats is not None else '?'} images)"


def score(evs: list[Evaluator], den: Any, sampler: str, grid: list[int]) -> tuple[float, float]:
    unet = den.unet.eval()
    fids = []
    for ev in evs:
        r = ev.evaluate(
            den.eps_fn(unet),
            den.schedule,
            (den.channels, den.resolution, den.resolution),
            timesteps=len(grid),
            sampler=sampler,
            grid=grid,
        )
        fids.append(r.fid)
    return statistics.fmean(fids), statistics.stdev(fids) if len(fids) > 1 else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE override of the experiment")
    ap.add_argument("--T", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--modes", nargs="+", default=["weights", "timesteps", "both"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1001, 1002, 1003])
    ap.add_argument("--num-samples", type=int, default=400)
    ap.add_argument(
        "--baselines",
        nargs="+",
        default=[f"{m}:{sp}" for m in ("ddim", "dpmpp_2m") for sp in SPACINGS],
        help="training-free samplers to score, as sampler:spacing",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/quality_vs_time")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    device = torch.device("cpu")
    exp = load_experiment(args.experiment, dict(parse_override(s) for s in args.set)).with_overrides(
        {
            "sampler.timesteps": args.T,
            "finetune.steps": args.steps,
            "finetune.eval_every": args.eval_every,
            "finetune.device": "cpu",
        }
    )
    t0 = time.perf_counter()
    evs, ref_name = final_evaluators(exp, device, args.seeds, args.num_samples)
    src = comp.resolve_model_source(exp, allow_pretrain=False)
    base = comp.load_model(exp, src, device)
    N = base.schedule.num_train_timesteps
    baselines: dict[str, tuple[float, float]] = {}
    sp0 = exp.sampler.timestep_spacing or {"uniform": "leading"}.get(exp.sampler.spacing, exp.sampler.spacing)
    wanted = list(dict.fromkeys([*args.baselines, f"{exp.sampler.name}:{sp0}"]))
    for sampler, spacing in (b.split(":") for b in wanted):
        baselines[f"{sampler} {spacing}"] = score(evs, base, sampler, spacing_timesteps(args.T, N, spacing))
        print(f"baseline {sampler} {spacing}: FID {baselines[f'{sampler} {spacing}'][0]:.3f}", flush=True)
    best_name = min(baselines, key=lambda k: baselines[k][0])
    curves: dict[str, list[tuple[int, float, float, float, list[int]]]] = {}
    with tempfile.TemporaryDirectory(prefix="qvt-") as tmp:
        for mode in args.modes:
            run_exp = exp.with_overrides(
                {"finetune.train": mode, "eval.num_samples": 50, "eval.batch_size": 50}
            )
            setup = build_setup(run_exp, device, evaluate=True, allow_pretrain=False)
            run_dir = Path(tmp) / mode
            run_finetune(run_exp, LocalReporter(run_dir, device="cpu", num_to_keep=1000), setup=setup)
            rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
            init = spacing_timesteps(args.T, N, sp0)
            m0, s0 = baselines[f"{exp.sampler.name} {sp0}"]
            pts = [(0, 0.0, m0, s0, init)]
            for r in rows:
                ck = Path(r["checkpoint_path"])
                state = json.loads((ck / "state.json").read_text())
                grid = state.get("timestep_grid_int", init)
                m, s = score(evs, load_denoiser(str(ck)), exp.sampler.name, grid)
                pts.append((r["step"], r["elapsed_s"], m, s, grid))
                print(
                    f"{mode} step {r['step']} ({r['elapsed_s']:.0f} s): FID {m:.3f} +- {s:.3f} grid {grid}",
                    flush=True,
                )
            curves[mode] = pts
    total = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bm, bs = baselines[best_name]
    lines = [
        f"# FID vs fine-tuning wall time at T={args.T}",
        "",
        f"`python benchmarks/quality_vs_time.py {args.experiment}"
        + "".join(f" --set {s}" for s in args.set)
        + f"` ({platform.machine()}, {torch.get_num_threads()} torch thread(s), {total / 60:.1f} min in all).",
        "",
        f"Final protocol (local minimal version): primary space `{exp.features.eval}`, reference: {ref_name}, "
        f"{args.num_samples} samples x {len(args.seeds)} fresh seeds {args.seeds}, mean +- std over seeds; "
        f"fine-tuned checkpoints scored on their rounded grid. Training: {exp.sampler.name}, "
        f"batch {exp.finetune.batch_size}, lr {exp.finetune.lr}, timestep_lr {exp.finetune.timestep_lr}, "
        f"{args.steps} steps; wall time includes the loop's own small selection evaluations (50 samples).",
        "",
        "## Training-free baselines",
        "",
        "| sampler | spacing | FID |",
        "|---|---|---:|",
        *[f"| {k.split()[0]} | {k.split()[1]} | {m:.3f} +- {s:.3f} |" for k, (m, s) in baselines.items()],
        "",
        f"Best: **{best_name}**, {bm:.3f} +- {bs:.3f}.",
        "",
        "## Fine-tuning",
        "",
        "| train | step | wall time (s) | FID | rounded grid |",
        "|---|---:|---:|---:|---|",
    ]
    for mode, pts in curves.items():
        for step, el, m, s, grid in pts:
            lines.append(f"| {mode} | {step} | {el:.0f} | {m:.3f} +- {s:.3f} | {grid} |")
    (out.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, pts in curves.items():
        xs = [p[1] for p in pts]
        ax.errorbar(
            xs, [p[2] for p in pts], yerr=[p[3] for p in pts], marker="o", capsize=3, label=f"train: {mode}"
        )
    ax.axhline(bm, color="k", ls="--", label=f"best training-free ({best_name})")
    ax.axhspan(bm - bs, bm + bs, color="k", alpha=0.1)
    ax.set_xlabel("fine-tuning wall time (s)")
    ax.set_ylabel(f"FID ({exp.features.eval}, held-out)")
    ax.set_title(f"T={args.T}: mean +- std over {len(args.seeds)} seeds, {args.num_samples} samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')} ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
