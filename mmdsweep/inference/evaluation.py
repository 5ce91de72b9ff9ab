"""FID/KID of a T-step sampler in one or more evaluation feature spaces.

Samples are generated from a fixed set of initial noises (seeded by ``eval.seed``), so two
models, or one model before and after fine-tuning, are compared on identical noise. Features go
through clean-fid's feature-level functions (:mod:`mmdsweep.assets.metrics`); reference statistics are
cached on disk. Every result carries the number of samples it was computed from.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mmdsweep.assets import metrics
from mmdsweep.assets.metrics import ReferenceStats
from mmdsweep.core.sampling import NoiseSchedule, sample, select_timesteps


@dataclass
class EvalResult:
    """Scores at one T; ``fid``/``kid`` are for the primary evaluation space."""

    timesteps: int
    sampler: str
    num_samples: int
    fid: float
    kid: float
    per_space: dict[str, dict[str, float]] = field(default_factory=dict)
    sample_time_per_image_s: float = float("nan")


NOISE_SEED_STRIDE = 1_000_003


def eval_noise(n: int, shape: Sequence[int], seed: int, start: int = 0) -> torch.Tensor:
    """The fixed evaluation noise of samples ``start .. start+n-1``: sample ``i`` depends only on
    (seed, i), not on the batch size or on which slice is asked for."""
    out = torch.empty((n, *shape))
    for j in range(n):
        g = torch.Generator().manual_seed(seed * NOISE_SEED_STRIDE + start + j)
        out[j] = torch.randn(tuple(shape), generator=g)
    return out


@torch.no_grad()
def generate(
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    *,
    num: int,
    shape: Sequence[int],
    timesteps: int,
    sampler: str,
    spacing: str,
    eta: float,
    seed: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    on_batch: Callable[[torch.Tensor], None] | None = None,
    grid: Sequence[int] | None = None,
) -> tuple[torch.Tensor | None, float]:
    """Sample ``num`` images in batches; returns (images on CPU or None, seconds per image).

    With ``on_batch`` the images are handed over batch by batch and not kept (memory stays flat).
    """
    # issue 9: an explicit integer grid (a learned grid, rounded) replaces the spacing's
    ts = list(grid) if grid is not None else select_timesteps(timesteps, schedule.num_train_timesteps, spacing)
    noise = eval_noise(num, shape, seed)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    kept: list[torch.Tensor] = []
    elapsed = 0.0
    for start in range(0, num, batch_size):
        z = noise[start : start + batch_size].to(device=device, dtype=dtype)
        t0 = time.perf_counter()
        x = sample(eps_fn, z, schedule, ts, sampler=sampler, eta=eta, generator=gen)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - t0
        x = x.float().clamp(-1, 1)
        if on_batch is not None:
            on_batch(x)
        else:
            kept.append(x.cpu())
    return (torch.cat(kept) if kept else None), elapsed / num


class Evaluator:
    """Scores a denoiser at T steps against cached reference statistics."""

    def __init__(
        self,
        spaces: dict[str, torch.nn.Module],
        references: dict[str, ReferenceStats],
        *,
        primary: str,
        num_samples: int,
        batch_size: int,
        seed: int,
        kid_subsets: int,
        kid_subset_size: int,
        device: torch.device,
    ) -> None:
        if primary not in spaces:
            raise ValueError(f"primary evaluation space {primary!r} is not among {sorted(spaces)}")
        self.spaces = spaces
        self.references = references
        self.primary = primary
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.device = device

    def evaluate(
        self,
        eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        schedule: NoiseSchedule,
        shape: Sequence[int],
        *,
        timesteps: int,
        sampler: str,
        spacing: str = "uniform",
        eta: float = 0.0,
        dtype: torch.dtype = torch.float32,
        grid: Sequence[int] | None = None,
    ) -> EvalResult:
        feats: dict[str, list[np.ndarray]] = {name: [] for name in self.spaces}

        def consume(x: torch.Tensor) -> None:
            for name, space in self.spaces.items():
                feats[name].append(space(x.to(self.device)).double().cpu().numpy())

        _, per_image = generate(
            eps_fn,
            schedule,
            num=self.num_samples,
            shape=shape,
            timesteps=timesteps,
            sampler=sampler,
            spacing=spacing,
            eta=eta,
            seed=self.seed,
            batch_size=self.batch_size,
            device=self.device,
            dtype=dtype,
            on_batch=consume,
            grid=grid,
        )
        per_space: dict[str, dict[str, float]] = {}
        for name, chunks in feats.items():
            f = np.concatenate(chunks)
            per_space[name] = self._score(f, self.references[name])
        main = per_space[self.primary]
        return EvalResult(
            timesteps=timesteps,
            sampler=sampler,
            num_samples=self.num_samples,
            fid=main["fid"],
            kid=main["kid"],
            per_space=per_space,
            sample_time_per_image_s=per_image,
        )

    def _score(self, f: np.ndarray, ref: ReferenceStats) -> dict[str, float]:
        if not np.isfinite(f).all():
            return {"fid": float("nan"), "kid": float("nan")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", metrics.MetricWarning)
            fid = metrics.fid(f, ref)
        assert ref.feats is not None
        size = min(self.kid_subset_size, f.shape[0], ref.feats.shape[0])
        kid = metrics.kid(f, ref.feats, num_subsets=self.kid_subsets, max_subset_size=size, seed=self.seed)
        return {"fid": float(fid), "kid": float(kid)}
