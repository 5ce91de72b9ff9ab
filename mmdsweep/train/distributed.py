"""Thin helpers over ``torch.distributed`` with rank-safe defaults.

Every function works in a plain single process (``torch.distributed`` not
initialised): ranks default to 0, world size to 1 and the collectives become
identities. Inside a Ray Train worker the process group has already been
initialised by ``TorchTrainer`` (gloo on CPU, nccl on GPU), so the same code runs
unchanged.

Gradient synchronisation is explicit (:func:`average_gradients`) instead of
wrapping the model in ``DistributedDataParallel``: the MMD fine-tuning loop calls
the model many times per optimisation step (one call per sampler timestep, under
activation checkpointing), which DDP's one-forward-one-backward hooks do not fit.

Typical use in a loss that needs the whole global batch::

    feats = all_gather_with_grad(local_feats)     # (world * B, D), differentiable
    loss = mmd(feats, reference)                   # identical on every rank
    loss.backward()
    average_gradients(model)                       # now equals the 1-process gradient
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

#: Maximum number of elements flattened into one all-reduce bucket.
_BUCKET_NUMEL = 32 * 1024 * 1024


def is_initialized() -> bool:
    """Return True when a default ``torch.distributed`` process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process, 0 when not distributed."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the default group, 1 when not distributed."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a non-distributed process)."""
    return get_rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only, flushed so that Ray's log capture sees it promptly."""
    if is_main():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def _comm_device() -> torch.device:
    """Device that tensors must live on for the default group's backend."""
    if is_initialized() and dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, keeping the autograd graph.

    Every rank must pass a tensor of the same shape, dtype and device. The
    backward pass sums, over ranks, the gradients flowing into each rank's slice,
    so with a loss that is computed identically on every rank each rank's local
    gradient is ``world_size`` times its own contribution; :func:`average_gradients`
    divides that back out, giving exactly the single-process gradient of the loss
    on the concatenated batch.

    Identity when the world size is 1.
    """
    if get_world_size() == 1:
        return tensor
    from torch.distributed.nn import functional as dist_fn

    with warnings.catch_warnings():
        # Deprecated in favour of functional collectives, but it is the variant with
        # a well-defined backward on both gloo and nccl.
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_fn.all_gather(tensor)
    return torch.cat(list(parts), dim=0)


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Group tensors by (device, dtype) into buckets of at most ``_BUCKET_NUMEL`` elements."""
    groups: dict[tuple[torch.device, torch.dtype], list[list[torch.Tensor]]] = {}
    for t in tensors:
        bucket_list = groups.setdefault((t.device, t.dtype), [[]])
        current = bucket_list[-1]
        if current and sum(x.numel() for x in current) + t.numel() > _BUCKET_NUMEL:
            current = []
            bucket_list.append(current)
        current.append(t)
    return [b for bucket_list in groups.values() for b in bucket_list if b]


def all_reduce_mean_(tensors: torch.Tensor | Iterable[torch.Tensor]) -> None:
    """Replace each tensor, in place, by its mean over ranks.

    Tensors are flattened into a few buckets (per device and dtype) so that a
    model's many parameters cost a handful of collectives. No-op in a single
    process. All ranks must pass the same list of shapes in the same order.
    """
    items = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    world = get_world_size()
    if world == 1 or not items:
        return
    for bucket in _buckets(items):
        flat = torch.cat([t.detach().reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for t in bucket:
            n = t.numel()
            t.detach().copy_(flat[offset : offset + n].view_as(t))
            offset += n


def average_gradients(model: torch.nn.Module) -> None:
    """Average ``.grad`` of every parameter that has one over all ranks (sum / world).

    Use after ``loss.backward()`` and before ``optimizer.step()`` in place of DDP.
    Every rank must have gradients for the same set of parameters.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    all_reduce_mean_(grads)


def _check_same_keys(keys: list[str]) -> None:
    """Raise on every rank (never deadlock) when ranks report different metric names."""
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, keys)
    if any(k != keys for k in gathered):
        raise ValueError(f"all_reduce_metrics: ranks report different metric names: {gathered}")


def all_reduce_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Mean of scalar metrics over ranks, as plain floats.

    Non-finite values propagate: if any rank reports NaN or +-inf for a metric the
    result for that metric is non-finite too (NaN or inf), so a diverged worker
    cannot be averaged away. All ranks must report the same metric names; they
    are checked and a mismatch raises ``ValueError`` on every rank.
    """
    keys = sorted(metrics)
    values = [float(metrics[k]) for k in keys]
    world = get_world_size()
    if world == 1:
        return dict(zip(keys, values))
    _check_same_keys(keys)
    buf = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    # A sum propagates NaN, and inf + (-inf) gives NaN: a non-finite input on any
    # rank always yields a non-finite mean.
    return dict(zip(keys, (buf / world).tolist()))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s picklable ``obj`` on every rank (identity in one process)."""
    if get_world_size() == 1:
        return obj
    box = [obj if get_rank() == src else None]
    device = _comm_device()
    dist.broadcast_object_list(box, src=src, device=device if device.type == "cuda" else None)
    return box[0]
