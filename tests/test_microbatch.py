"""``finetune.micro_batch_size``: the two-pass step gives the exact full-batch MMD gradient."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from scale_fixture import grads, rel_err, tiny_experiment, tiny_setup

from mmdsweep.config import ConfigError
from mmdsweep.core.sampling import select_timesteps
from mmdsweep.train import distributed as du
from mmdsweep.train.loop import kernel_spec, mmd_step
from mmdsweep.train.microbatch import chunks


def _step(micro: int | None, *, batch: int, rank: int = 0, dtype: torch.dtype = torch.float64, **cfg: Any):
    exp = tiny_experiment(
        **{"finetune.batch_size": batch, "finetune.micro_batch_size": micro, **cfg}  # type: ignore[arg-type]
    )
    setup = tiny_setup(exp, dtype=dtype)
    unet = setup.denoiser.unet
    ts = select_timesteps(exp.sampler.timesteps, 1000)
    eps = setup.denoiser.eps_fn(unet)
    real_global = 16
    loss, _ = mmd_step(setup, eps, 7, ts, kernel_spec(exp), real_global, rank=rank)
    du.average_gradients(unet)
    return loss, grads(unet)


def test_chunks_cover_the_local_batch() -> None:
    assert list(chunks(8, 8, 3)) == [(8, 3), (11, 3), (14, 2)]
    assert list(chunks(0, 4, None)) == [(0, 4)]


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"sampler.eta": 0.5},
        {"sampler.name": "dpmpp_2m", "sampler.checkpointing": False},
    ],
    ids=["ddim", "ddim-eta0.5", "dpmpp_2m-nockpt"],
)
def test_micro_batches_give_the_full_batch_gradient(cfg: dict) -> None:
    """float64 end to end: the two passes differ from one pass only by summation order (<= 1e-5 relative;
    in practice ~1e-13), so any error of the estimator (e.g. accumulating per-micro-batch MMDs) shows."""
    loss_full, g_full = _step(None, batch=8, **cfg)
    for micro in (1, 4) if not cfg else (2,):
        loss_mb, g_mb = _step(micro, batch=8, **cfg)
        torch.testing.assert_close(loss_mb, loss_full, rtol=1e-12, atol=0)
        assert rel_err(g_mb, g_full) <= 1e-5, micro
        assert len(g_mb) == len(g_full) > 10


def test_micro_batches_in_float32() -> None:
    """float32 (what runs in practice): summation-order differences only, ~1e-6 relative."""
    loss_full, g_full = _step(None, batch=8, dtype=torch.float32)
    loss_mb, g_mb = _step(2, batch=8, dtype=torch.float32)
    torch.testing.assert_close(loss_mb, loss_full, rtol=1e-5, atol=1e-8)
    assert rel_err(g_mb, g_full) <= 1e-4


def test_naive_accumulation_would_not_match() -> None:
    """Guard that the test above can fail: averaging per-micro-batch MMDs is another estimator."""
    from mmdsweep.train.loop import generate_features, make_loss_fn

    exp = tiny_experiment(**{"finetune.batch_size": 8})
    setup = tiny_setup(exp, dtype=torch.float64)
    unet = setup.denoiser.unet
    ts = select_timesteps(3, 1000)
    eps = setup.denoiser.eps_fn(unet)
    loss_fn = make_loss_fn(setup, 7, kernel_spec(exp), 16)
    torch.set_grad_enabled(False)
    full = loss_fn(generate_features(setup, eps, 7, ts, 0, 8))[0]
    naive = sum(loss_fn(generate_features(setup, eps, 7, ts, s, 2))[0] for s in range(0, 8, 2)) / 4
    torch.set_grad_enabled(True)
    assert abs(float(naive) - float(full)) > 1e-6 * abs(float(full))


def test_micro_batch_must_divide_the_batch() -> None:
    with pytest.raises(ConfigError, match="micro_batch_size"):
        tiny_experiment(**{"finetune.batch_size": 8, "finetune.micro_batch_size": 3})


def _dist_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loss, g = _step(2, batch=4, rank=rank, **{"sampler.eta": 0.5})  # type: ignore[arg-type]
        if rank == 0:
            torch.save({"loss": loss, "grads": g}, out)
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see tests/test_finetune.py: gloo's teardown at exit can abort after the work is done


def test_two_workers_with_micro_batches_equal_one_process(tmp_path: Path) -> None:
    """2 gloo workers x batch 4 in micro-batches of 2 == 1 process x batch 8 in one pass (eta > 0 too)."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "dist.pt")
    init = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_dist_worker, args=(2, init, out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    loss_full, g_full = _step(None, batch=8, **{"sampler.eta": 0.5})  # type: ignore[arg-type]
    torch.testing.assert_close(got["loss"], loss_full, rtol=1e-12, atol=0)
    assert rel_err(got["grads"], g_full) <= 1e-5
