"""`python -m mmdsweep.pretrain`: train the embedded default's DDPM and domain classifier (see :mod:`mmdsweep.train.pretrain`)."""

from __future__ import annotations

from collections.abc import Sequence

from mmdsweep.cli_args import precheck, pretrain_parser

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Check the arguments and the experiment first (no torch import), then pretrain."""
    rc = precheck(pretrain_parser, argv)
    if rc is not None:
        return rc
    from mmdsweep.train.pretrain import main as run

    return run(None if argv is None else list(argv))


if __name__ == "__main__":
    raise SystemExit(main())
