"""`python -m mmdsweep.finetune`: one MMD-DDM fine-tuning run in this process (see :mod:`mmdsweep.train.loop`)."""

from __future__ import annotations

from mmdsweep.train.loop import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
