"""`python -m mmdsweep.pretrain`: train the embedded default's DDPM and domain classifier (see :mod:`mmdsweep.train.pretrain`)."""

from __future__ import annotations

from mmdsweep.train.pretrain import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
