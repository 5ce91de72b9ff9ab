"""Argument parsers of the experiment CLIs, importable without torch or Ray (config layer).

The thin command modules (``python -m mmdsweep.finetune|pretrain``) parse their arguments and
validate the experiment with these parsers *before* importing the modules that do the work, so
``--help`` and configuration errors come back in about a second; the working modules build the
same parsers, so the two never drift.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from mmdsweep.config import ConfigError, cli_parser, load_experiment, parse_override


def finetune_parser() -> argparse.ArgumentParser:
    ap = cli_parser(
        "python -m mmdsweep.finetune",
        "Run one MMD-DDM fine-tuning run in this process (the loop that Ray Train runs per worker).",
    )
    ap.add_argument("--run-dir", help="output directory (default: <output.dir>/finetune-T<T>)")
    ap.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    ap.add_argument("--dry-run", action="store_true", help="validate the experiment and its files, then stop")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def pretrain_parser() -> argparse.ArgumentParser:
    ap = cli_parser(
        "python -m mmdsweep.pretrain",
        "Train (or fetch from the cache) the embedded default's DDPM and domain classifier.",
    )
    ap.add_argument("--force", action="store_true", help="retrain even if a cached result exists")
    ap.add_argument("--dry-run", action="store_true", help="validate the experiment and stop")
    return ap


def precheck(parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None) -> int | None:
    """Parse ``argv`` and load the experiment without importing torch or Ray.

    Returns an exit status to stop with (2 and a one-line ``error:`` for a configuration error;
    ``--help`` exits inside argparse), or None when the command should go on.
    """
    args = parser().parse_args(None if argv is None else list(argv))
    try:
        load_experiment(args.experiment, dict(parse_override(s) for s in args.set))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return None


SAMPLER_NAMES = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc")  # mmdsweep.core.sampling.SAMPLERS (tested equal)
SPACING_NAMES = ("leading", "trailing", "linspace", "quadratic")


def sample_parser() -> argparse.ArgumentParser:
    """``python -m mmdsweep.sample``'s arguments (no torch: ``--help`` is instant)."""
    p = argparse.ArgumentParser(
        prog="python -m mmdsweep.sample",
        description="Sample images from an mmdsweep checkpoint or exported diffusers pipeline.",
    )
    p.add_argument("model", help="checkpoint directory or exported pipeline directory")
    p.add_argument(
        "--timesteps",
        "-T",
        type=int,
        default=None,
        help="sampler steps (default: state.json / mmdsweep.json)",
    )
    p.add_argument("--num", "-n", type=int, default=64, help="number of images (default 64)")
    p.add_argument(
        "--out", "-o", required=True, help="grid .png/.jpg, .npz, or a directory for one PNG per image"
    )
    p.add_argument(
        "--sampler", choices=list(SAMPLER_NAMES), default=None, help="default: state.json, else ddim"
    )
    p.add_argument(
        "--spacing",
        choices=[*SPACING_NAMES, "uniform"],
        default=None,
        help="timestep spacing (default: the recorded chain, else the sampler's standard grid)",
    )
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default: state.json, else 0)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help=(
            "noise seed (default 0). Seed S gives the images the evaluator scored for S: pass one of the experiment's "
            "eval.final_seeds (the final protocol) or eval.seed (selection) to see what was scored"
        ),
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--grid-scale", type=int, default=1, help="nearest-neighbour upscaling of a grid")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def speed_parser() -> argparse.ArgumentParser:
    """``python -m mmdsweep.speed``'s arguments (no torch: ``--help`` is instant)."""
    parser = argparse.ArgumentParser(
        prog="python -m mmdsweep.speed",
        description="Measure sampling speed of a sweep's base model and exports; write RESULTS_DIR/speed.parquet.",
    )
    parser.add_argument("results_dir", help="sweep results directory (with sweep.json)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    return parser
