"""The one owner of random noise: initial and per-step noise, per sample.

Every random draw that decides an image is keyed by ``(seed, role, key, stream, global sample index)``:

* ``seed``: the user's seed (``finetune.seed + seed`` in training, ``eval.seed`` for selection, each of
  ``eval.final_seeds`` for the final report, ``--seed`` of ``mmdsweep.sample``);
* ``role``: ``"train"`` (the MMD loss) or ``"eval"`` (evaluation, ``mmdsweep.sample``, speed and export checks:
  one role, so ``mmdsweep.sample --seed S`` reproduces the evaluator's images for seed S);
* ``key``: the training step, or the evaluation id (0 for every evaluation: models are compared on identical
  noise);
* ``stream``: 0 for the initial noise x_T, ``1 + j`` for the noise z of sampler step j (DDIM with eta > 0);
* the global sample index: worker ``r`` with per-worker batch ``b`` draws samples ``r*b .. r*b+b-1``.

Each sample gets its own ``torch.Generator`` seeded by a SplitMix64 hash of the key (EDM2's
``StackedRandomGenerator`` idea), so a sample's noise is the same whatever the batch size, the number of
workers, the slice asked for, or ``eta`` (the step noise lives in its own streams and never shifts x_T).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ROLES", "initial_noise", "noise_seed", "real_batch_generator", "step_noise"]

ROLES: dict[str, int] = {"train": 1, "eval": 2, "real": 3}
_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64 finaliser (Steele, Lea, Flood 2014): a bijective 64-bit mix."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def noise_seed(seed: int, role: str, key: int, stream: int, index: int) -> int:
    """The 63-bit generator seed of one sample's draw (see the module docstring)."""
    if role not in ROLES:
        raise ValueError(f"role={role!r}: expected one of {sorted(ROLES)}")
    h = 0
    for part in (int(seed), ROLES[role], int(key), int(stream), int(index)):
        h = _splitmix64(h ^ (part & _MASK))
    return h >> 1


def initial_noise(
    shape: Sequence[int], *, seed: int, role: str, start: int, count: int, key: int = 0
) -> Tensor:
    """x_T of global samples ``start .. start+count-1``: float32 ``(count, *shape)`` on the CPU."""
    out = torch.empty((count, *shape))
    for j in range(count):
        g = torch.Generator().manual_seed(noise_seed(seed, role, key, 0, start + j))
        out[j] = torch.randn(tuple(shape), generator=g)
    return out


def step_noise(
    shape: Sequence[int], steps: int, *, seed: int, role: str, start: int, count: int, key: int = 0
) -> Tensor:
    """Per-step noise z of global samples ``start .. start+count-1``: float32 ``(steps, count, *shape)``."""
    out = torch.empty((steps, count, *shape))
    for j in range(count):
        for s in range(steps):
            g = torch.Generator().manual_seed(noise_seed(seed, role, key, 1 + s, start + j))
            out[s, j] = torch.randn(tuple(shape), generator=g)
    return out


def real_batch_generator(seed: int, step: int) -> torch.Generator:
    """The generator that draws training step ``step``'s real minibatch from the bank (the same on every worker:
    the real batch is global)."""
    return torch.Generator().manual_seed(noise_seed(seed, "real", step, 0, 0))
