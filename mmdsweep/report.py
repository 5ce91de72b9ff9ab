"""`python -m mmdsweep.report`: a self-contained HTML report of a sweep (see :mod:`mmdsweep.analysis.report`)."""

from __future__ import annotations

from mmdsweep.analysis.report import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
