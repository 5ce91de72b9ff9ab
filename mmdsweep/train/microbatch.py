"""Exact large-batch MMD in the memory of one micro-batch (``finetune.micro_batch_size``).

The unbiased MMD^2 of a batch is not a sum over micro-batches (its cross terms pair samples of
different micro-batches), so plain gradient accumulation would change the estimator. It is,
however, a function of the generated *features* only, and those are small (B x D). Two passes give
the exact gradient of the full-batch estimator (the same trick as GradCache, Gao et al. 2021):

1. run every micro-batch's sampling chain without autograd and keep only its features F_mb;
   gather the features of all workers; compute L = MMD^2(F, real) and G = dL/dF once;
2. re-run every micro-batch's chain *with* autograd, from the same per-sample noise and the same
   RNG state (dropout), and backpropagate ``torch.autograd.backward(F_mb, grad_tensors=G_mb)``.

By the chain rule, sum_mb G_mb^T dF_mb/dtheta = dL/dtheta exactly (up to floating-point
summation order). The price is one extra no-grad forward of the chain per step (about +1/3 of
the time of a forward+backward step); the memory is that of one micro-batch's chain.

Scaling across workers: the plain path gathers with :func:`all_gather_with_grad`, whose backward
gives every rank ``world`` times its own contribution, and :func:`average_gradients` divides that
back out. The two-pass path computes the true local gradient, so it multiplies G by ``world`` to
keep the same contract: after :func:`average_gradients` both paths hold the single-process
gradient of the loss over the global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from mmdsweep.train import distributed as dist_utils

FeaturesFn = Callable[[int, int], torch.Tensor]
"""``features_fn(global_start, count) -> (count, D)`` float32 features of those global samples."""

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]
"""``loss_fn(global_features) -> (loss, info)``; identical on every rank."""


def chunks(start: int, count: int, micro_batch_size: int | None) -> Iterator[tuple[int, int]]:
    """``(global_start, size)`` of each micro-batch of samples ``start .. start+count``."""
    m = count if micro_batch_size is None else micro_batch_size
    if m < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size!r}: expected >= 1 or None")
    for s in range(start, start + count, m):
        yield s, min(m, start + count - s)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def mmd_backward(
    features_fn: FeaturesFn,
    loss_fn: LossFn,
    *,
    start: int,
    count: int,
    micro_batch_size: int | None,
    grad_scale: float = 1.0,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Compute the loss over the global batch and accumulate ``grad_scale * dloss/dtheta`` into ``.grad``.

    This worker generates global samples ``start .. start+count``. With ``micro_batch_size=None``
    (or >= count) this is the plain one-pass step: features with autograd, gathered with gradients,
    ``loss.backward()``. Otherwise the two-pass step of the module docstring. Returns the detached
    loss and the loss function's info. Call :func:`average_gradients` afterwards in both cases.
    """
    dev = device or torch.device("cpu")
    if micro_batch_size is None or micro_batch_size >= count:
        feats = dist_utils.all_gather_with_grad(features_fn(start, count))
        loss, info = loss_fn(feats)
        (loss * grad_scale if grad_scale != 1.0 else loss).backward()
        return loss.detach(), info

    parts = list(chunks(start, count, micro_batch_size))
    states = []
    local: list[torch.Tensor] = []
    with torch.no_grad():  # pass 1: features only
        for s, m in parts:
            states.append(_rng_state(dev))
            local.append(features_fn(s, m))
        gathered = dist_utils.all_gather_with_grad(torch.cat(local))
    del local
    fake = gathered.detach().requires_grad_(True)
    with torch.enable_grad():
        loss, info = loss_fn(fake)
        (grad,) = torch.autograd.grad(loss, fake)
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    mine = grad[rank * count : (rank + 1) * count] * (world * grad_scale)
    after = _rng_state(dev)
    offset = 0
    for (s, m), state in zip(parts, states, strict=True):  # pass 2: re-run with autograd
        _set_rng_state(state, dev)
        feats = features_fn(s, m)
        torch.autograd.backward(feats, grad_tensors=mine[offset : offset + m].to(feats.dtype))
        offset += m
    _set_rng_state(after, dev)
    return loss.detach(), info
