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
