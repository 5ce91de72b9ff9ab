"""`python -m mmdsweep.sample`: samples of a checkpoint or exported pipeline as a PNG grid, NPZ or PNG folder (see :mod:`mmdsweep.inference.generate`)."""

from __future__ import annotations

from mmdsweep.inference.generate import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
