"""`python -m mmdsweep.speed`: sampling speed (seconds per image) of a sweep's models (see :mod:`mmdsweep.inference.speed`)."""

from __future__ import annotations

from collections.abc import Sequence

from mmdsweep.cli_args import speed_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments first (``--help`` and usage errors without importing torch), then run."""
    speed_parser().parse_args(argv)
    from mmdsweep.inference.speed import main as run

    return run(argv)


__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
