"""``finetune.precision``: autocast inside the UNet only; bf16 gradients close to fp32; fp16 loss scaling."""

from __future__ import annotations

import pytest
import torch
from scale_fixture import cosine, grads, rel_err, tiny_experiment, tiny_setup

from mmdsweep.core.sampling import select_timesteps
from mmdsweep.train.loop import kernel_spec, mmd_step, prepare_model
from mmdsweep.train.precision import LossScaler, autocast_dtype, check_supported, wrap_denoiser


def _grad(precision: str) -> tuple[float, dict[str, torch.Tensor]]:
    # final_clamp off: the clamp's gradient is 0 outside [-1, 1], and the random UNet's samples sit on that
    # boundary, so bf16 rounding would flip which pixels get a gradient; the property here is the UNet's
    # autocast precision, not the (exact, documented) clamp
    exp = tiny_experiment(
        **{"finetune.precision": precision, "finetune.batch_size": 16, "sampler.final_clamp": False}
    )
    setup = tiny_setup(exp, attention=True)
    raw, eps = prepare_model(setup, setup.denoiser.unet)
    scaler = LossScaler(precision)
    loss, _ = mmd_step(
        setup, eps, 3, select_timesteps(3, 1000), kernel_spec(exp), 32, grad_scale=scaler.scale
    )
    assert scaler.unscale_and_check(p for p in raw.parameters())
    return float(loss), grads(raw)


def test_denoiser_output_and_features_stay_float32() -> None:
    seen: list[torch.dtype] = []

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, torch.eye(x.shape[-1]))  # an autocast-listed op
        seen.append(y.dtype)
        return y

    f = wrap_denoiser(eps, "bf16", torch.device("cpu"))
    out = f(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    assert wrap_denoiser(eps, "fp32", torch.device("cpu")) is eps
    assert autocast_dtype("fp32") is None


def test_bf16_gradients_match_fp32() -> None:
    """Tolerance: bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2% per op). Through 3
    chained UNet calls (~20 layers each) the errors add up in quadrature to a few percent of the
    gradient, while a wrong gradient (a missing term, a sign, a float-cast cutting the graph) gives a
    cosine far from 1. So: cosine > 0.99 and relative L2 error < 10%; the loss agrees within 2%."""
    loss32, g32 = _grad("fp32")
    loss16, g16 = _grad("bf16")
    assert abs(loss16 - loss32) <= 0.02 * abs(loss32) + 1e-7
    assert cosine(g16, g32) > 0.99, cosine(g16, g32)
    assert rel_err(g16, g32) < 0.10, rel_err(g16, g32)
    assert rel_err(g16, g32) > 0.0  # autocast really ran in bf16


def test_fp16_with_loss_scaling_matches_fp32() -> None:
    reason = check_supported("fp16", "cpu")
    if reason is not None:
        pytest.skip(reason)
    loss32, g32 = _grad("fp32")
    _, g16 = _grad("fp16")  # 11 significant bits: closer than bf16
    assert cosine(g16, g32) > 0.999
    assert rel_err(g16, g32) < 0.05


def test_loss_scaler_skips_overflow_and_halves() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    s = LossScaler("fp16", init_scale=8.0, growth_interval=2)
    p.grad = torch.tensor([8.0, 16.0, 24.0])
    assert s.unscale_and_check([p]) and torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0]))
    p.grad = torch.tensor([float("inf"), 0.0, 0.0])
    assert not s.unscale_and_check([p]) and s.scale == 4.0 and s.skipped == 1
    p.grad = torch.ones(3)
    s.unscale_and_check([p])
    p.grad = torch.ones(3)
    s.unscale_and_check([p])
    assert s.scale == 8.0  # grew after growth_interval finite steps
    off = LossScaler("bf16")
    assert off.scale == 1.0 and off.unscale_and_check([p])


def test_supported_on_cpu() -> None:
    assert check_supported("fp32", "cpu") is None
    assert check_supported("bf16", "cpu") is None
