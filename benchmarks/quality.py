"""Sample quality on the embedded default: FID/KID for plain DDIM (T = 5, 10, 20, 50),
DPM-Solver++(2M) (T = 5, 10) and MMD-DDM fine-tuned DDIM (T = 5, 10), all scored with the same
evaluation noise, seeds and number of samples.

The primary evaluation space is the digits classifier. MMD-DDM is fine-tuned in the ImageNet
MobileNetV2 space (the experiment's default) and, as a cross-check, in the classifier space; every
row is scored in both spaces, so a gain that only games the training features would show up as a
gain in one column and not the other.

    python benchmarks/quality.py [experiments/digits.yaml] [--steps N] [--out benchmarks/results/quality.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", nargs="?", default=str(ROOT / "experiments" / "digits.yaml"))
    ap.add_argument("--steps", type=int, help="fine-tuning steps (default: the experiment's)")
    ap.add_argument("--lr", type=float, help="fine-tuning learning rate (default: the experiment's)")
    ap.add_argument("--eval-every", type=int, help="evaluate (and keep the best) every N steps")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="experiment override")
    ap.add_argument("--finetune-timesteps", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--train-spaces", nargs="+", default=None, help="feature spaces to fine-tune in")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.md"))
    ap.add_argument("--work-dir", default=str(ROOT / "benchmarks" / "results" / "quality_runs"))
    args = ap.parse_args()

    import torch

    from mmdsweep.assets.models import load_denoiser
    from mmdsweep.config import load_experiment, parse_override
    from mmdsweep.train import pretrain
    from mmdsweep.train.loop import LocalReporter, build_evaluator, evaluate_model, run_finetune
    from mmdsweep.utils import markdown_table, resolve_device, set_threads

    overrides: dict[str, Any] = dict(parse_override(x) for x in args.set)
    if args.steps:
        overrides["finetune.steps"] = args.steps
        overrides["finetune.eval_every"] = args.eval_every or args.steps
    elif args.eval_every:
        overrides["finetune.eval_every"] = args.eval_every
    if args.lr:
        overrides["finetune.lr"] = args.lr
    exp = load_experiment(args.experiment, overrides)
    set_threads(exp.finetune.threads)
    device = resolve_device(exp.finetune.device)
    t_all = time.time()
    t0 = time.time()
    src = pretrain.resolve_model_source(exp)
    pretrain_s = time.time() - t0
    train_spaces = args.train_spaces or list(dict.fromkeys([exp.features.train, "classifier"]))
    eval_names = list(dict.fromkeys([exp.features.eval, *train_spaces, *exp.features.extra_eval]))
    exp_eval = exp.with_overrides({"features.extra_eval": [n for n in eval_names if n != exp.features.eval]})
    den = load_denoiser(src.model_dir)
    den.unet.to(device).eval()
    evaluator = build_evaluator(exp_eval, src, den.channels, device)
    shape = (den.channels, den.resolution, den.resolution)
    rows: list[dict[str, Any]] = []

    def add(method: str, T: int, res: Any, train: str = "-", secs: float | None = None) -> None:
        row = {"method": method, "T": T, "train_space": train, "n": res.num_samples}
        for name in eval_names:
            row[f"FID[{name}]"] = res.per_space[name]["fid"]
            row[f"KID[{name}]"] = res.per_space[name]["kid"]
        row["finetune_s"] = secs
        rows.append(row)
        print(
            f"{method:>22} T={T:<3} train={train:<26} "
            + "  ".join(f"FID[{n}]={res.per_space[n]['fid']:.3f}" for n in eval_names),
            flush=True,
        )

    with torch.no_grad():
        for sampler, Ts in (("ddim", [5, 10, 20, 50]), ("dpmpp_2m", [5, 10])):
            for T in Ts:
                res = evaluator.evaluate(den.eps_fn(), den.schedule, shape, timesteps=T, sampler=sampler)
                add("DDIM" if sampler == "ddim" else "DPM-Solver++(2M)", T, res)

    work = Path(args.work_dir)
    for train in train_spaces:
        for T in args.finetune_timesteps:
            run_exp = exp.with_overrides({"sampler.timesteps": T, "features.train": train})
            run_dir = work / f"{train.replace(':', '_')}-T{T}"
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
            t0 = time.time()
            setup_exp = run_exp
            from mmdsweep.train.loop import build_setup

            setup = build_setup(setup_exp, device, evaluate=False)
            setup.evaluator = evaluator
            summary = run_finetune(setup_exp, LocalReporter(run_dir), setup=setup)
            secs = time.time() - t0
            if summary.status != "completed":
                print(f"MMD-DDM T={T} ({train}) {summary.status}", flush=True)
                continue
            best = load_denoiser(str(run_dir / "best"))
            best.unet.to(device)
            setup.denoiser = best
            with torch.no_grad():
                res = evaluate_model(setup, best.unet)
            add("MMD-DDM (DDIM)", T, res, train, secs)

    import pandas as pd

    df = pd.DataFrame(rows)
    primary = f"FID[{exp.features.eval}]"
    total = time.time() - t_all
    lines = [
        f"# Sample quality on the embedded default ({exp.data.dataset} {exp.data.resolution}x{exp.data.resolution}, "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {time.strftime('%Y-%m-%d')})",
        "",
        f"Every row: {evaluator.num_samples} samples from the same evaluation noise (seed {evaluator.seed}); "
        f"FID/KID via clean-fid's feature-level functions against {exp.data.split}-split reference features. "
        f"Primary evaluation space: `{exp.features.eval}`. Fine-tuning: {exp.finetune.steps} steps, lr {exp.finetune.lr}, "
        f"batch {exp.finetune.batch_size}, kernel {exp.kernel.type}; the checkpoint with the best primary FID is scored.",
        "",
        markdown_table(rows),
        "",
        f"Pretraining (cached after the first run): {pretrain_s:.0f} s this run; whole benchmark {total:.0f} s.",
    ]
    ddim = df[(df["method"] == "DDIM")].set_index("T")[primary]
    for T in args.finetune_timesteps:
        ft = df[(df["method"] == "MMD-DDM (DDIM)") & (df["T"] == T)]
        for _, r in ft.iterrows():
            lines.append(
                f"- T={T}, trained in `{r['train_space']}`: {primary} {r[primary]:.3f} vs DDIM T={T} {ddim.get(T, float('nan')):.3f}"
                f" and DDIM T=50 {ddim.get(50, float('nan')):.3f}."
            )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    df.to_csv(Path(args.out).with_suffix(".csv"), index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
