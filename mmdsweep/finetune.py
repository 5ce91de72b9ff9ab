"""`python -m mmdsweep.finetune`: one MMD-DDM fine-tuning run in this process (see :mod:`mmdsweep.train.loop`)."""

from __future__ import annotations

from collections.abc import Sequence

from mmdsweep.cli_args import finetune_parser, precheck

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Check the arguments and the experiment first (no torch import), then run."""
    rc = precheck(finetune_parser, argv)
    if rc is not None:
        return rc
    from mmdsweep.train.loop import main as run

    return run(None if argv is None else list(argv))


if __name__ == "__main__":
    raise SystemExit(main())
