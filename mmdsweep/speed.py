"""`python -m mmdsweep.speed`: sampling speed (seconds per image) of a sweep's models (see :mod:`mmdsweep.inference.speed`)."""

from __future__ import annotations

from mmdsweep.inference.speed import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
