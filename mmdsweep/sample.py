"""`python -m mmdsweep.sample`: samples of a checkpoint or exported pipeline as a PNG grid, NPZ or PNG folder (see :mod:`mmdsweep.inference.generate`)."""

from __future__ import annotations

from collections.abc import Sequence

from mmdsweep.cli_args import sample_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments first (``--help`` and usage errors without importing torch), then run."""
    sample_parser().parse_args(argv)
    from mmdsweep.inference.generate import main as run

    return run(argv)


__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
