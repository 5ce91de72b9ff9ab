"""``python -m mmdsweep.evaluate CHECKPOINT --timesteps 5 10 --sampler ddim``: a FID/KID table.

CHECKPOINT is a fine-tuning checkpoint, an exported pipeline or any diffusers model directory.
The evaluation settings (data, evaluation feature spaces, number of samples) come from the
experiment stored in the checkpoint's ``state.json``, or from ``--experiment``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from mmdsweep.config import ConfigError, Experiment, from_dict, load_experiment, parse_override


def experiment_for(checkpoint: Path, experiment: str | None, overrides: dict[str, Any]) -> Experiment:
    if experiment:
        return load_experiment(experiment, overrides)
    state = checkpoint / "state.json"
    if not state.is_file():
        raise ConfigError(
            f"{checkpoint}: no state.json with the experiment it was trained with; pass --experiment FILE"
        )
    exp = from_dict(json.loads(state.read_text())["experiment"], source=str(state))
    return exp.with_overrides(overrides) if overrides else exp


def evaluate_table(
    exp: Experiment, model_dir: Path, timesteps: list[int], sampler: str, spacing: str, eta: float
) -> list[dict[str, Any]]:
    import torch

    from mmdsweep.assets import components as comp
    from mmdsweep.assets.models import load_denoiser
    from mmdsweep.train.loop import build_evaluator
    from mmdsweep.utils import resolve_device, set_threads

    set_threads(exp.finetune.threads)
    device = resolve_device(exp.finetune.device)
    src = comp.resolve_model_source(exp)
    den = load_denoiser(str(model_dir))
    den.unet.to(device).eval()
    evaluator = build_evaluator(exp, src, den.channels, device)
    rows = []
    for T in timesteps:
        with torch.no_grad():
            res = evaluator.evaluate(
                den.eps_fn(),
                den.schedule,
                (den.channels, den.resolution, den.resolution),
                timesteps=T,
                sampler=sampler,
                spacing=spacing,
                eta=eta,
            )
        row: dict[str, Any] = {
            "model": str(model_dir),
            "sampler": sampler,
            "T": T,
            "num_samples": res.num_samples,
            "eval_space": exp.features.eval,
            "fid": res.fid,
            "kid": res.kid,
            "sec_per_image": res.sample_time_per_image_s,
        }
        for name, scores in res.per_space.items():
            if name != exp.features.eval:
                row[f"fid@{name}"] = scores["fid"]
                row[f"kid@{name}"] = scores["kid"]
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    cols = [c for c in rows[0] if c != "model"]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mmdsweep.evaluate",
        description="FID/KID of a model or checkpoint at several step budgets T.",
    )
    ap.add_argument(
        "checkpoint", help="fine-tuning checkpoint, exported pipeline or diffusers model directory"
    )
    ap.add_argument(
        "--timesteps", type=int, nargs="+", default=None, help="step budgets (default: the checkpoint's T)"
    )
    ap.add_argument("--sampler", choices=["ddim", "dpmpp_2m"], default=None, help="default: the experiment's")
    ap.add_argument("--spacing", choices=["uniform", "quadratic"], default=None)
    ap.add_argument("--eta", type=float, default=None)
    ap.add_argument(
        "--experiment", help="experiment YAML for the evaluation settings (default: the checkpoint's)"
    )
    ap.add_argument("--num-samples", type=int, help="override eval.num_samples")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--out", help="also write the table as CSV to this path")
    ap.add_argument("--dry-run", action="store_true", help="check the arguments and files, then stop")
    args = ap.parse_args(argv)
    ckpt = Path(args.checkpoint)
    try:
        if not ckpt.is_dir():
            raise FileNotFoundError(f"{ckpt}: no such model directory")
        overrides = dict(parse_override(s) for s in args.set)
        if args.num_samples is not None:
            overrides["eval.num_samples"] = args.num_samples
        exp = experiment_for(ckpt, args.experiment, overrides)
        from mmdsweep.assets.models import check_model_path

        check_model_path(str(ckpt))
        timesteps = args.timesteps or [exp.sampler.timesteps]
        if any(t < 1 for t in timesteps):
            raise ConfigError(f"--timesteps: must be >= 1, got {timesteps}")
        sampler = args.sampler or exp.sampler.name
        eta = exp.sampler.eta if args.eta is None else args.eta
        if sampler == "dpmpp_2m" and eta > 0:
            raise ConfigError(f"--eta: must be 0 for sampler dpmpp_2m, got {eta}")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"{ckpt}: ok; would evaluate T={timesteps} with {sampler}, {exp.eval.num_samples} samples")
        return 0
    rows = evaluate_table(exp, ckpt, timesteps, sampler, args.spacing or exp.sampler.spacing, eta)
    print(format_table(rows))
    if args.out:
        import pandas as pd

        pd.DataFrame(rows).to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
