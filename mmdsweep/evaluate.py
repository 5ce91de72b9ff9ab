"""``python -m mmdsweep.evaluate CHECKPOINT``: final-protocol FID/KID of a model and its baselines.

CHECKPOINT is a fine-tuning checkpoint, an exported pipeline or any diffusers model directory. The evaluation
settings (data, evaluation feature spaces, numbers of samples, seeds, references) come from the experiment
stored in the checkpoint's ``state.json``, or from ``--experiment``.

The **final protocol** (docs/results.md): for each fresh noise seed in ``eval.final_seeds`` (k >= 3),
``eval.final_num_samples`` (default ``eval.num_samples``) images of the recorded chain, scored in every
evaluation space against the final reference (``eval.final_reference``: the held-out split by default), then
mean +- std (ddof=1) over the seeds.  ``--baselines`` adds every training-free baseline of the base model
(each sampler x each spacing) at the same T under the same protocol, computed once and cached (key: model +
protocol + chain), and (with ``eval.real_floor``) real training images scored the same way: the metric's floor
(rows of kind ``real``, T = 0).  Rows go to a versioned ``evaluation.parquet`` (:func:`evaluation_schema`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mmdsweep.config import ConfigError, add_set_argument, parse_override
from mmdsweep.train.protocol import (  # noqa: F401  (re-exported: the CLI's public names)
    BASELINE_CACHE_VERSION,
    BASELINE_SAMPLERS,
    BASELINE_SPACINGS,
    EVALUATION_FILE,
    EVALUATION_SCHEMA_VERSION,
    _model_id,
    _protocol_id,
    baseline_rows,
    best_baselines,
    build_final_evaluator,
    evaluation_schema,
    experiment_for,
    final_rows_for_model,
    format_summary,
    gain_vs_best_baseline,
    real_floor_rows,
    rows_from_results,
    summarize,
    write_evaluation,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mmdsweep.evaluate",
        description="Final-protocol FID/KID (fresh seeds, held-out reference, mean +- std) of a model, "
        "optionally with every training-free baseline of the base model at the same T.",
    )
    ap.add_argument(
        "checkpoint", help="fine-tuning checkpoint, exported pipeline or diffusers model directory"
    )
    ap.add_argument(
        "--timesteps", type=int, nargs="+", default=None, help="step budgets (default: the chain's T)"
    )
    ap.add_argument(
        "--sampler", choices=list(BASELINE_SAMPLERS), default=None, help="default: the recorded chain"
    )
    ap.add_argument("--spacing", choices=[*BASELINE_SPACINGS, "uniform"], default=None)
    ap.add_argument("--eta", type=float, default=None)
    ap.add_argument(
        "--experiment", help="experiment YAML for the evaluation settings (default: the checkpoint's)"
    )
    ap.add_argument("--num-samples", type=int, help="override eval.final_num_samples")
    ap.add_argument(
        "--baselines",
        action="store_true",
        help="also every training-free baseline of the base model (and, with eval.real_floor, real training images: the floor)",
    )
    add_set_argument(ap)
    ap.add_argument("--out", help="evaluation.parquet to append to (default: beside the checkpoint)")
    ap.add_argument("--dry-run", action="store_true", help="check the arguments and files, then stop")
    args = ap.parse_args(argv)
    ckpt = Path(args.checkpoint)
    try:
        if not ckpt.is_dir():
            raise FileNotFoundError(f"{ckpt}: no such model directory")
        overrides = dict(parse_override(s) for s in args.set)
        if args.num_samples is not None:
            overrides["eval.final_num_samples"] = args.num_samples
        exp = experiment_for(ckpt, args.experiment, overrides)
        from mmdsweep.assets.models import check_model_path

        check_model_path(str(ckpt))
        if args.timesteps is not None and any(t < 1 for t in args.timesteps):
            raise ConfigError(f"--timesteps: must be >= 1, got {args.timesteps}")
        if args.eta is not None and args.eta > 0 and (args.sampler or exp.sampler.name) != "ddim":
            raise ConfigError(
                f"--eta: must be 0 for sampler {args.sampler or exp.sampler.name}, got {args.eta}"
            )
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ec = exp.eval
    if args.dry_run:
        print(
            f"{ckpt}: ok; final protocol: seeds {ec.final_seeds}, N={ec.final_num_samples or ec.num_samples}, "
            f"reference {ec.final_reference}"
        )
        return 0
    from mmdsweep.inference.generate import prepare_model, quiet_diffusers, read_state, resolve_chain
    from mmdsweep.utils import resolve_device, set_threads

    quiet_diffusers()
    set_threads(exp.finetune.threads)
    device = resolve_device(exp.finetune.device)
    den, _, _, _ = prepare_model(str(ckpt), device)
    evaluator = build_final_evaluator(exp, den.channels, device)
    state = read_state(ckpt)
    chain0 = (
        resolve_chain(den, None, sampler=args.sampler, spacing=args.spacing, eta=args.eta, state=state)
        if (state or args.timesteps is None)
        else None
    )
    ts = args.timesteps or ([chain0.timesteps] if chain0 else [exp.sampler.timesteps])
    rows: list[dict[str, Any]] = []
    for T in ts:
        chain = resolve_chain(den, T, sampler=args.sampler, spacing=args.spacing, eta=args.eta, state=state)
        rows += final_rows_for_model(exp, ckpt, evaluator, chain=chain, device=device)
    if args.baselines:
        from mmdsweep.assets import components as comp

        src = comp.resolve_model_source(exp)
        rows += baseline_rows(exp, src.model_dir, ts, evaluator, show_progress=True)
        if exp.eval.real_floor:
            rows += real_floor_rows(exp, evaluator, den.channels)
    out = Path(args.out) if args.out else ckpt / EVALUATION_FILE
    write_evaluation(rows, out)
    print(format_summary(summarize(rows), exp.features.eval))
    print(f"\nevaluation rows: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
