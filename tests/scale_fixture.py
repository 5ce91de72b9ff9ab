"""A tiny in-memory fine-tuning setup (random UNet, frozen random feature map, random bank).

No pretraining and no files: the tests of micro-batching, precision, LoRA and compile only need a
differentiable chain -> features -> MMD, not a good model.
"""

from __future__ import annotations

from typing import Any

import torch

from mmdsweep.assets.components import ModelSource
from mmdsweep.assets.models import Denoiser, build_unet, scheduler_config_for
from mmdsweep.config import Experiment, from_dict
from mmdsweep.core.sampling import NoiseSchedule
from mmdsweep.train.loop import Setup

FEAT_DIM = 16


class FeatureMap(torch.nn.Module):
    """A frozen random projection with a nonlinearity (stands in for a feature network)."""

    def __init__(self, in_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.w = torch.nn.Parameter(torch.randn(in_dim, FEAT_DIM, generator=g, dtype=dtype) / in_dim**0.5)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.flatten(1).to(self.w.dtype) @ self.w)


class Bank:
    """Real features: a fixed random pool, sampled without replacement by a generator."""

    def __init__(self, dtype: torch.dtype) -> None:
        g = torch.Generator().manual_seed(321)
        self.pool = torch.tanh(torch.randn(256, FEAT_DIM, generator=g, dtype=torch.float64) * 0.7 + 0.1).to(
            dtype
        )

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.pool[torch.randperm(self.pool.shape[0], generator=generator)[:n]]

    def to(self, device: Any) -> Bank:
        return self


def tiny_experiment(**overrides: Any) -> Experiment:
    raw: dict[str, Any] = {
        "name": "scale",
        "data": {"dataset": "digits", "resolution": 8},
        "sampler": {"name": "ddim", "timesteps": 3},
        "kernel": {"type": "polynomial"},
        "finetune": {"batch_size": 8, "steps": 2, "eval_every": 2, "threads": 1},
    }
    exp = from_dict(raw)
    return exp.with_overrides(overrides) if overrides else exp


def tiny_setup(
    exp: Experiment,
    *,
    dtype: torch.dtype = torch.float32,
    attention: bool = False,
    channels: tuple[int, ...] = (16, 32),
) -> Setup:
    torch.manual_seed(0)
    unet = build_unet(8, 1, channels, attention=attention).to(dtype)
    cfg = scheduler_config_for(1000, "linear", 1e-4, 0.02)
    den = Denoiser(unet=unet, schedule=NoiseSchedule.from_scheduler_config(cfg), scheduler_config=cfg)
    return Setup(
        exp=exp,
        device=torch.device("cpu"),
        denoiser=den,
        train_space=FeatureMap(64, dtype),
        bank=Bank(dtype),
        evaluator=None,
        src=ModelSource("<memory>", None),
    )


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all parameters (one flattened vector)."""
    assert a.keys() == b.keys() and a
    va = torch.cat([a[k].double().flatten() for k in sorted(a)])
    vb = torch.cat([b[k].double().flatten() for k in sorted(b)])
    return float((va - vb).norm() / vb.norm())


def cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    va = torch.cat([a[k].double().flatten() for k in sorted(a)])
    vb = torch.cat([b[k].double().flatten() for k in sorted(b)])
    return float(torch.nn.functional.cosine_similarity(va, vb, dim=0))
