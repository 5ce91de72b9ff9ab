"""Tests for mmdsweep.core.sampling: golden comparisons against diffusers' schedulers, gradients, checkpointing.

Equivalent diffusers configurations (documented here because the tests rely on them):

* ``sample(..., sampler="ddim")`` with ``select_timesteps(T, N, "uniform")`` == ``DDIMScheduler`` with
  ``timestep_spacing="leading"``, ``steps_offset=0`` and ``set_timesteps(T)`` (diffusers then steps t -> t - N//T,
  i.e. to our next timestep, and the last step to ``final_alpha_cumprod``), same ``set_alpha_to_one``,
  ``clip_sample``, ``prediction_type``; per-step noise ``noise[i]`` of our up-front draw is diffusers'
  ``variance_noise`` of step i.
* ``sample(..., sampler="dpmpp_2m")`` == ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
  solver_order=2, solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero")`` with our timesteps
  passed explicitly through ``set_timesteps(timesteps=...)``.  diffusers' DPM scheduler has no ``clip_sample``;
  its ``thresholding=True`` with ``sample_max_value=1.0`` clamps the data prediction to [-1, 1] exactly, which is
  our ``clip_sample=True, clip_sample_range=1.0``.

The tiny UNet runs in float64 and the per-sampler comparisons use diffusers' own float32-accumulated
``alphas_cumprod`` (ours accumulates the identical float32 betas in float64; the two differ by ~1e-6 relative,
which a random network amplifies along the chain to nearly 1e-4), so they measure the sampler maths.  The
end-to-end test runs our float64 schedule from the google/ddpm-cifar10-32 config unchanged.  The tolerance is
1e-4 max abs throughout; observed worst cases are ~1.3e-5 (DDIM), ~3e-5 (DPM-Solver++, where diffusers casts
the sample to float32 each step) and ~4e-6 end to end.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import diffusers
import pytest
import torch
from realscale_fixture import CIFAR10_SCHEDULER_CONFIG
from torch import Tensor

from mmdsweep.core.sampling import (
    SAMPLERS,
    NoiseSchedule,
    ddim_step,
    dpmpp_2m_step,
    predict_x0_eps,
    sample,
    select_timesteps,
)

# diffusers' lazy-import dummies hide the real classes from mypy: use them untyped
DDIMScheduler: Any = diffusers.DDIMScheduler
DDPMScheduler: Any = diffusers.DDPMScheduler
DPMSolverMultistepScheduler: Any = diffusers.DPMSolverMultistepScheduler
UNet2DModel: Any = diffusers.UNet2DModel

TOL = 1e-4
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"  # inside diffusers' DPM
    ),
    pytest.mark.usefixtures("one_thread"),  # conftest.py: one torch thread per module
    pytest.mark.threads,  # scripts/test.sh runs these with 1 and 2 torch threads
]
N = 1000
# scheduler_config.json of google/ddpm-cifar10-32 (the model MMD-DDM fine-tunes)
DDPM_CIFAR10_CONFIG: dict[str, Any] = CIFAR10_SCHEDULER_CONFIG


@pytest.fixture(scope="module")
def unet() -> Any:
    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
    )
    return model.double().eval()


@pytest.fixture(scope="module")
def x_T() -> Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _denoiser(model: Any, x: Tensor, t: Tensor) -> Tensor:
    out: Tensor = model(x, t).sample
    return out


def _max_abs(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max().item())


def _with_reference_alphas(sched: NoiseSchedule, ref: Any) -> NoiseSchedule:
    """Same schedule, but with diffusers' float32-accumulated alphas_cumprod instead of our float64 one.

    The two agree to ~1e-6 relative (checked here and in the schedule tests), but a random UNet amplifies that
    difference along the chain to ~1e-4, which would make the comparison measure round-off, not sampler maths.
    """
    ref_ac = ref.alphas_cumprod.double()
    torch.testing.assert_close(sched.alphas_cumprod, ref_ac, rtol=1e-5, atol=0)
    return dataclasses.replace(sched, alphas_cumprod=ref_ac)


# ---------------------------------------------------------------------------------------------- timesteps


def test_select_timesteps_uniform_golden() -> None:
    assert select_timesteps(5, 1000) == [800, 600, 400, 200, 0]
    assert select_timesteps(10, 1000) == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert select_timesteps(1, 1000) == [0]
    assert select_timesteps(3, 10) == [6, 3, 0]
    assert select_timesteps(4, 4) == [3, 2, 1, 0]


@pytest.mark.parametrize("T", [5, 10])
def test_select_timesteps_uniform_matches_diffusers_leading(T: int) -> None:
    sched = DDIMScheduler(timestep_spacing="leading", steps_offset=0)
    sched.set_timesteps(T)
    assert sched.timesteps.tolist() == select_timesteps(T, N)


def test_select_timesteps_quadratic() -> None:
    # floor(0.8 * 1000 * i^2 / 9^2), DDIM paper App. D.2
    assert select_timesteps(10, 1000, "quadratic") == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]
    assert select_timesteps(1, 1000, "quadratic") == [0]
    for T, n in [(2, 2), (3, 3), (50, 60), (100, 100), (200, 1000), (1000, 1000)]:
        ts = select_timesteps(T, n, "quadratic")
        assert len(ts) == T == len(set(ts))
        assert all(a > b for a, b in zip(ts, ts[1:])), ts
        assert ts[-1] == 0 and ts[0] < n


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 1000), "T=0"),
        ((1001, 1000), "T=1001"),
        ((5, 0), "num_train_timesteps=0"),
        ((5, 1000, "cosine"), "spacing='cosine'"),
        ((2.5, 1000), "T=2.5"),
    ],
)
def test_select_timesteps_errors(args: tuple[Any, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        select_timesteps(*args)


# ---------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_from_scheduler_config_betas_equal_diffusers(beta_schedule: str) -> None:
    ddpm = DDPMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    sched = NoiseSchedule.from_scheduler_config(dict(ddpm.config))
    assert sched.alphas_cumprod.dtype == torch.float64
    assert sched.num_train_timesteps == N
    assert torch.equal(sched.betas.float(), ddpm.betas)
    torch.testing.assert_close(sched.betas, ddpm.betas.double(), rtol=0, atol=1e-15)
    # diffusers accumulates in float32; we accumulate the same betas in float64
    torch.testing.assert_close(sched.alphas_cumprod, ddpm.alphas_cumprod.double(), rtol=1e-5, atol=0)
    assert sched.clip_sample is True  # diffusers' default
    assert sched.final_alpha_cumprod == 1.0


def test_ddpm_cifar10_config() -> None:
    sched = NoiseSchedule.from_scheduler_config(DDPM_CIFAR10_CONFIG)
    ref = DDPMScheduler.from_config(DDPM_CIFAR10_CONFIG)
    assert torch.equal(sched.betas.float(), ref.betas)
    assert sched.clip_sample and sched.prediction_type == "epsilon" and sched.final_alpha_cumprod == 1.0


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_scheduler_config_round_trip(beta_schedule: str, set_alpha_to_one: bool) -> None:
    cfg = {
        "beta_schedule": beta_schedule,
        "prediction_type": "v_prediction",
        "clip_sample": False,
        "clip_sample_range": 2.0,
        "set_alpha_to_one": set_alpha_to_one,
    }
    sched = NoiseSchedule.from_scheduler_config(cfg)
    exported = sched.to_scheduler_config()
    assert NoiseSchedule.from_scheduler_config(exported) == sched
    ddim = DDIMScheduler.from_config(exported)
    ref = DDIMScheduler(**cfg)
    assert torch.equal(ddim.betas, ref.betas)
    assert torch.equal(ddim.alphas_cumprod, ref.alphas_cumprod)
    assert float(ddim.final_alpha_cumprod) == float(ref.final_alpha_cumprod)
    assert ddim.config.prediction_type == "v_prediction" and ddim.config.clip_sample is False
    assert ddim.config.clip_sample_range == 2.0
    assert sched.final_alpha_cumprod == pytest.approx(float(ref.final_alpha_cumprod), rel=1e-6)
    ddim.set_timesteps(5)
    assert ddim.timesteps.tolist() == select_timesteps(5, N)


def test_trained_betas_config() -> None:
    betas = torch.linspace(1e-4, 0.05, 50)
    sched = NoiseSchedule.from_scheduler_config({"trained_betas": betas.tolist(), "num_train_timesteps": 50})
    assert sched.num_train_timesteps == 50
    assert torch.equal(sched.betas.float(), betas)


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"prediction_type": "flow_prediction"}, "prediction_type"),
        ({"thresholding": True}, "thresholding"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"trained_betas": [0.1, 0.2], "num_train_timesteps": 3}, "trained_betas"),
        ({"variance_type": "learned_range"}, "variance_type"),
        ({"clip_sample": "yes"}, "clip_sample"),
        ({"beta_start": "small"}, "beta_start"),
    ],
)
def test_from_scheduler_config_errors(cfg: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}'"):
        NoiseSchedule.from_scheduler_config(cfg)


def test_noise_schedule_validation() -> None:
    with pytest.raises(ValueError, match="alphas_cumprod"):
        NoiseSchedule(torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        NoiseSchedule(torch.tensor([0.5, 0.5, 0.4]))
    with pytest.raises(ValueError, match="prediction_type='x0'"):
        NoiseSchedule(torch.tensor([0.9, 0.5]), prediction_type="x0")
    with pytest.raises(ValueError, match="final_alpha_cumprod"):
        NoiseSchedule(torch.tensor([0.9, 0.5]), final_alpha_cumprod=0.0)
    sched = NoiseSchedule(torch.tensor([0.9, 0.5], dtype=torch.float32))
    assert sched.alphas_cumprod.dtype == torch.float64
    with pytest.raises(ValueError, match="final_alpha_cumprod"):
        NoiseSchedule(torch.tensor([0.9, 0.5]), final_alpha_cumprod=0.7).to_scheduler_config()


# ---------------------------------------------------------------------------------------------- pure steps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_eps_inverts_forward_process(prediction_type: str) -> None:
    g = torch.Generator().manual_seed(3)
    x0, eps = (
        torch.randn(2, 4, generator=g, dtype=torch.float64),
        torch.randn(2, 4, generator=g, dtype=torch.float64),
    )
    a = 0.3
    x_t = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    target = {"epsilon": eps, "sample": x0, "v_prediction": a**0.5 * eps - (1 - a) ** 0.5 * x0}[
        prediction_type
    ]
    got_x0, got_eps = predict_x0_eps(target, x_t, a, prediction_type)
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)


def test_dpmpp_first_order_equals_ddim() -> None:
    sched = NoiseSchedule.from_scheduler_config({"clip_sample": False})
    g = torch.Generator().manual_seed(4)
    x, out = (
        torch.randn(3, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 5, generator=g, dtype=torch.float64),
    )
    x_dpm, _ = dpmpp_2m_step(x, out, 700, 400, sched)
    torch.testing.assert_close(x_dpm, ddim_step(x, out, 700, 400, sched), rtol=1e-12, atol=1e-12)
    # going to alpha_bar = 1 returns the data prediction itself
    x_end, x0 = dpmpp_2m_step(x, out, 100, -1, sched, history=(out, 400))
    torch.testing.assert_close(x_end, x0)
    torch.testing.assert_close(x0, predict_x0_eps(out, x, sched.alpha_bar(100), "epsilon")[0])


def test_step_errors() -> None:
    sched = NoiseSchedule.from_scheduler_config({})
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="noise=None"):
        ddim_step(x, x, 500, 400, sched, eta=0.5)
    with pytest.raises(ValueError, match="t_prev=500"):
        ddim_step(x, x, 500, 500, sched)
    with pytest.raises(ValueError, match="t=1000"):
        dpmpp_2m_step(x, x, 1000, 400, sched)


# ---------------------------------------------------------------------------------------------- vs diffusers


def _diffusers_ddim(unet: Any, x_T: Tensor, sched: Any, T: int, eta: float, noise: Tensor | None) -> Tensor:
    sched.set_timesteps(T)
    x = x_T
    for i, t in enumerate(sched.timesteps):
        out = unet(x, t.expand(x.shape[0])).sample
        x = sched.step(out, t, x, eta=eta, variance_noise=None if noise is None else noise[i]).prev_sample
    return x


def _diffusers_dpmpp(unet: Any, x_T: Tensor, sched: Any, timesteps: list[int]) -> Tensor:
    sched.set_timesteps(timesteps=timesteps)
    assert sched.timesteps.tolist() == timesteps
    x = x_T
    for t in sched.timesteps:
        x = sched.step(unet(x, t.expand(x.shape[0])).sample, t, x).prev_sample
    return x


# Full product of schedule x T x eta x clip for epsilon models, plus v_prediction and sample models.
DDIM_CASES = [
    (beta_schedule, T, eta, clip, "epsilon")
    for beta_schedule in ("linear", "squaredcos_cap_v2")
    for T in (5, 10)
    for eta in (0.0, 0.5)
    for clip in (False, True)
] + [
    ("linear", 5, 0.5, False, "v_prediction"),
    ("linear", 10, 0.0, True, "v_prediction"),
    ("squaredcos_cap_v2", 10, 0.0, False, "v_prediction"),
    ("squaredcos_cap_v2", 5, 0.5, True, "v_prediction"),
    ("linear", 5, 0.0, False, "sample"),
]


@pytest.mark.parametrize(("beta_schedule", "T", "eta", "clip", "prediction_type"), DDIM_CASES)
def test_ddim_matches_diffusers(
    unet: Any, x_T: Tensor, beta_schedule: str, T: int, eta: float, clip: bool, prediction_type: str
) -> None:
    ref_sched = DDIMScheduler(
        beta_schedule=beta_schedule,
        clip_sample=clip,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    sched = _with_reference_alphas(NoiseSchedule.from_scheduler_config(dict(ref_sched.config)), ref_sched)
    assert sched.clip_sample is clip and sched.prediction_type == prediction_type
    seed = 7
    # our contract: eta > 0 draws randn((T, *x_T.shape)) from the generator before the chain
    noise = torch.randn((T, *x_T.shape), generator=torch.Generator().manual_seed(seed), dtype=x_T.dtype)
    with torch.no_grad():
        ref = _diffusers_ddim(unet, x_T, ref_sched, T, eta, noise if eta > 0 else None)
        ours = sample(
            functools.partial(_denoiser, unet),
            x_T,
            sched,
            select_timesteps(T, N),
            sampler="ddim",
            eta=eta,
            generator=torch.Generator().manual_seed(seed),
        )
    assert ours.dtype == torch.float64 and ours.shape == x_T.shape
    assert _max_abs(ours, ref) < TOL, _max_abs(ours, ref)
    if clip:
        assert float(ours.abs().max()) <= 1.0 + 1e-12
    else:
        assert float(ours.abs().max()) > 1.0  # random UNet: clipping would have changed the result
    if eta > 0:  # the noise really enters: a different seed gives a different sample
        with torch.no_grad():
            other = sample(
                functools.partial(_denoiser, unet),
                x_T,
                sched,
                select_timesteps(T, N),
                eta=eta,
                generator=torch.Generator().manual_seed(seed + 1),
            )
        assert _max_abs(other, ref) > 1e-3


DPM_CASES = [
    ("linear", "uniform", 1, False, "epsilon"),
    ("linear", "uniform", 2, False, "epsilon"),
    ("linear", "uniform", 3, False, "epsilon"),
    ("linear", "uniform", 5, False, "epsilon"),
    ("linear", "uniform", 10, False, "epsilon"),
    ("squaredcos_cap_v2", "uniform", 5, False, "epsilon"),
    ("squaredcos_cap_v2", "uniform", 10, False, "epsilon"),
    ("linear", "quadratic", 6, False, "epsilon"),
    ("linear", "uniform", 5, True, "epsilon"),
    ("squaredcos_cap_v2", "uniform", 5, False, "v_prediction"),
]


@pytest.mark.parametrize(("beta_schedule", "spacing", "T", "clip", "prediction_type"), DPM_CASES)
def test_dpmpp_2m_matches_diffusers(
    unet: Any, x_T: Tensor, beta_schedule: str, spacing: str, T: int, clip: bool, prediction_type: str
) -> None:
    ref_sched = DPMSolverMultistepScheduler(
        beta_schedule=beta_schedule,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        prediction_type=prediction_type,
        thresholding=clip,  # with sample_max_value=1 this is exactly clamp(x0, -1, 1)
        sample_max_value=1.0,
    )
    sched = NoiseSchedule.from_scheduler_config(
        {"beta_schedule": beta_schedule, "prediction_type": prediction_type, "clip_sample": clip}
    )
    sched = _with_reference_alphas(sched, ref_sched)
    timesteps = select_timesteps(T, N, spacing)
    with torch.no_grad():
        ref = _diffusers_dpmpp(unet, x_T, ref_sched, timesteps)
        ours = sample(functools.partial(_denoiser, unet), x_T, sched, timesteps, sampler="dpmpp_2m")
    assert _max_abs(ours, ref) < TOL, _max_abs(ours, ref)
    if T >= 3:  # a second-order step happened: DPM-Solver++(2M) must differ from DDIM (its first-order form)
        with torch.no_grad():
            ddim = sample(functools.partial(_denoiser, unet), x_T, sched, timesteps, sampler="ddim")
        assert _max_abs(ours, ddim) > 1e-3


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_end_to_end_from_config_matches_diffusers(unet: Any, x_T: Tensor, sampler: str) -> None:
    """The user's path: our float64 schedule straight from the google/ddpm-cifar10-32 config, T=10."""
    sched = NoiseSchedule.from_scheduler_config(DDPM_CIFAR10_CONFIG)
    timesteps = select_timesteps(10, N)
    with torch.no_grad():
        ours = sample(functools.partial(_denoiser, unet), x_T, sched, timesteps, sampler=sampler)
        if sampler == "ddim":
            ref_ddim = DDIMScheduler.from_config(
                DDPM_CIFAR10_CONFIG, timestep_spacing="leading", steps_offset=0
            )
            ref = _diffusers_ddim(unet, x_T, ref_ddim, 10, 0.0, None)
        else:
            cfg = {k: v for k, v in DDPM_CIFAR10_CONFIG.items() if k not in ("clip_sample", "variance_type")}
            ref_dpm = DPMSolverMultistepScheduler.from_config(cfg, thresholding=True, sample_max_value=1.0)
            ref = _diffusers_dpmpp(unet, x_T, ref_dpm, timesteps)
    assert float(ours.abs().max()) <= 1.0 + 1e-12  # clip_sample=True in this config
    assert _max_abs(ours, ref) < TOL, _max_abs(ours, ref)


# ---------------------------------------------------------------------------------------------- gradients


def _grads(
    unet: Any, x_T: Tensor, sampler: str, eta: float, checkpointing: bool
) -> tuple[Tensor, list[Tensor]]:
    unet.zero_grad(set_to_none=True)
    x = x_T.clone().requires_grad_(True)
    sched = NoiseSchedule.from_scheduler_config({"clip_sample": False})
    out = sample(
        functools.partial(_denoiser, unet),
        x,
        sched,
        select_timesteps(3, N),
        sampler=sampler,
        eta=eta,
        generator=torch.Generator().manual_seed(11),
        checkpointing=checkpointing,
    )
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()
    assert x.grad is not None
    param_grads = []
    for name, p in unet.named_parameters():
        assert p.grad is not None, name
        param_grads.append(p.grad.clone())
    unet.zero_grad(set_to_none=True)
    return x.grad, param_grads


@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 0.0), ("ddim", 0.7), ("dpmpp_2m", 0.0)])
def test_gradients_with_and_without_checkpointing(unet: Any, x_T: Tensor, sampler: str, eta: float) -> None:
    gx, gp = _grads(unet, x_T, sampler, eta, checkpointing=False)
    gx_ckpt, gp_ckpt = _grads(unet, x_T, sampler, eta, checkpointing=True)
    assert float(gx.abs().max()) > 0
    assert sum(float(g.abs().sum()) for g in gp) > 0
    assert sum(int(g.abs().max() > 0) for g in gp) > 0.9 * len(gp)
    torch.testing.assert_close(gx_ckpt, gx, rtol=1e-10, atol=1e-12)
    for a, b in zip(gp_ckpt, gp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _saved_numel(unet: Any, x_T: Tensor, T: int, checkpointing: bool) -> int:
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel()
        return t

    sched = NoiseSchedule.from_scheduler_config({"clip_sample": False})
    x = x_T.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sample(
            functools.partial(_denoiser, unet), x, sched, select_timesteps(T, N), checkpointing=checkpointing
        )
    out.sum().backward()
    unet.zero_grad(set_to_none=True)
    return total


def test_checkpointing_keeps_activations_out_of_the_graph(unet: Any, x_T: Tensor) -> None:
    plain = [_saved_numel(unet, x_T, T, checkpointing=False) for T in (2, 4)]
    ckpt = [_saved_numel(unet, x_T, T, checkpointing=True) for T in (2, 4)]
    per_step_plain = (plain[1] - plain[0]) / 2
    per_step_ckpt = (ckpt[1] - ckpt[0]) / 2
    assert per_step_plain > 20 * x_T.numel()  # the UNet's activations
    assert per_step_ckpt <= 4 * x_T.numel()  # at most a few sample-sized tensors per step


# ---------------------------------------------------------------------------------------------- call counts / API


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_exactly_T_denoiser_calls(sampler: str) -> None:
    sched = NoiseSchedule.from_scheduler_config({})
    weight = torch.tensor(0.3, requires_grad=True)
    for T in range(1, 13):
        for checkpointing in (False, True):
            seen: list[Tensor] = []

            def denoiser(x: Tensor, t: Tensor, seen: list[Tensor] = seen) -> Tensor:
                seen.append(t)
                return weight * x

            timesteps = select_timesteps(T, N)
            out = sample(
                denoiser, torch.ones(2, 3), sched, timesteps, sampler=sampler, checkpointing=checkpointing
            )
            assert len(seen) == T
            assert [int(t[0]) for t in seen] == timesteps
            assert all(t.dtype == torch.long and t.shape == (2,) for t in seen)
            out.sum().backward()
            assert len(seen) == (2 * T if checkpointing else T)  # checkpointing recomputes each step once


def test_sample_errors() -> None:
    sched = NoiseSchedule.from_scheduler_config({})
    x = torch.zeros(1, 3)

    def den(x: Tensor, t: Tensor) -> Tensor:
        return x

    with pytest.raises(ValueError, match=r"sampler='euler'.*\['ddim', 'dpmpp_2m', 'dpmpp_3m', 'unipc'\]"):
        sample(den, x, sched, [500, 0], sampler="euler")
    with pytest.raises(ValueError, match="eta=0.5 with sampler='dpmpp_2m'"):
        sample(den, x, sched, [500, 0], sampler="dpmpp_2m", eta=0.5)
    with pytest.raises(ValueError, match="eta=1.5"):
        sample(den, x, sched, [500, 0], eta=1.5)
    with pytest.raises(ValueError, match="descending"):
        sample(den, x, sched, [0, 500])
    with pytest.raises(ValueError, match="timestep 1000"):
        sample(den, x, sched, [1000, 0])
    with pytest.raises(ValueError, match="non-empty"):
        sample(den, x, sched, [])
    with pytest.raises(ValueError, match=r"denoiser output \(1, 6\)"):
        sample(lambda x, t: torch.cat([x, x], dim=1), x, sched, [500, 0])


def test_dtype_and_gradient_mode() -> None:
    sched = NoiseSchedule.from_scheduler_config({})
    x = torch.randn(2, 3, requires_grad=True)

    def den(x: Tensor, t: Tensor) -> Tensor:
        return 0.5 * x

    out = sample(den, x, sched, [600, 300, 0], eta=0.3, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.requires_grad
    with torch.no_grad():
        assert not sample(den, x, sched, [600, 300, 0], sampler="dpmpp_2m", checkpointing=True).requires_grad


# ---------------------------------------------------------------------------------------------- spacings, 3M, UniPC


UNIPC_CASES = [(T, sp) for T in (1, 2, 3, 5, 6, 10) for sp in ("linspace", "leading", "trailing")]
UniPCMultistepScheduler: Any = diffusers.UniPCMultistepScheduler


def test_spacings_golden_and_legacy_name() -> None:
    assert select_timesteps(5, N, "uniform") == select_timesteps(5, N, "leading") == [800, 600, 400, 200, 0]
    assert select_timesteps(5, N, "trailing") == [999, 799, 599, 399, 199]
    assert select_timesteps(5, N, "linspace") == [999, 749, 500, 250, 0]
    # the multistep solvers' grids: T+1 points, t=0 dropped (diffusers' DPMSolverMultistep/UniPC)
    assert select_timesteps(5, N, "linspace", "dpmpp_2m") == [999, 799, 599, 400, 200]
    assert select_timesteps(5, N, None, "unipc") == [999, 799, 599, 400, 200]
    assert select_timesteps(5, N, "leading", "dpmpp_3m") == [830, 664, 498, 332, 166]
    assert select_timesteps(5, N, None, "ddim") == [800, 600, 400, 200, 0]


@pytest.mark.parametrize("T", [1, 3, 5, 7, 10, 50, 100])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_grids_equal_diffusers_set_timesteps(T: int, spacing: str) -> None:
    ddim = DDIMScheduler(timestep_spacing=spacing, steps_offset=0)
    ddim.set_timesteps(T)
    assert ddim.timesteps.tolist() == select_timesteps(T, N, spacing, "ddim")
    for name, cls in (("dpmpp_2m", DPMSolverMultistepScheduler), ("unipc", UniPCMultistepScheduler)):
        ref = cls(timestep_spacing=spacing, steps_offset=0)
        ref.set_timesteps(T)
        assert ref.timesteps.tolist() == select_timesteps(T, N, spacing, name), name


def _diffusers_multistep(unet: Any, x_T: Tensor, sched: Any, T: int) -> Tensor:
    sched.set_timesteps(T)
    x = x_T
    for t in sched.timesteps:
        x = sched.step(unet(x, t.expand(x.shape[0])).sample, t, x).prev_sample
    return x


def _tol(ref: Tensor) -> float:
    # diffusers' multistep schedulers cast the sample to float32 at every step; without clipping a random UNet's
    # chain reaches |x| ~ 1e2 (x0 = x_t / sqrt(alpha_bar_999) ~ 150 x_t), so float32 round-off (6e-8 relative,
    # a few per step) is ~1e-5 absolute there: the bound is 1e-4 per unit of output magnitude.
    return TOL * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize(("T", "spacing"), UNIPC_CASES)
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_3m", "unipc"])
def test_multistep_solvers_match_diffusers_on_their_grids(
    unet: Any, x_T: Tensor, sampler: str, T: int, spacing: str, clip: bool
) -> None:
    common = dict(timestep_spacing=spacing, thresholding=clip, sample_max_value=1.0)
    if sampler == "unipc":  # diffusers' defaults: bh2, order 2, predict_x0, lower_order_final
        ref_sched = UniPCMultistepScheduler(**common)
        assert ref_sched.config.solver_type == "bh2" and ref_sched.config.solver_order == 2
    else:
        ref_sched = DPMSolverMultistepScheduler(solver_order=int(sampler[-2]), **common)
    sched = _with_reference_alphas(NoiseSchedule.from_scheduler_config({"clip_sample": clip}), ref_sched)
    with torch.no_grad():
        ref = _diffusers_multistep(unet, x_T, ref_sched, T)
        ours = sample(
            functools.partial(_denoiser, unet),
            x_T,
            sched,
            select_timesteps(T, N, spacing, sampler),
            sampler=sampler,
        )
    tol = TOL if clip else _tol(ref)
    assert _max_abs(ours, ref) < tol, (_max_abs(ours, ref), tol)


def test_3m_and_unipc_differ_from_2m(unet: Any, x_T: Tensor) -> None:
    sched = NoiseSchedule.from_scheduler_config({"clip_sample": True})
    ts = select_timesteps(6, N, None, "dpmpp_3m")
    den = functools.partial(_denoiser, unet)
    with torch.no_grad():
        outs = {s: sample(den, x_T, sched, ts, sampler=s) for s in ("dpmpp_2m", "dpmpp_3m", "unipc")}
    assert _max_abs(outs["dpmpp_2m"], outs["dpmpp_3m"]) > 1e-4
    assert _max_abs(outs["dpmpp_2m"], outs["unipc"]) > 1e-4


@pytest.mark.parametrize("T", [5, 7, 10])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddim_on_non_leading_grids(unet: Any, x_T: Tensor, T: int, spacing: str) -> None:
    """Our DDIM steps to the next grid point.  diffusers' DDIMScheduler steps t -> t - N//T whatever the grid
    (FACTS.md; diffusers issues 12633, 11347): on ``trailing`` with T | N that is the next grid point and the
    two agree; otherwise we match diffusers' first-order DPM-Solver++ on the same timesteps (= DDIM eta=0,
    what the export uses) and differ from diffusers' DDIM."""
    ts = select_timesteps(T, N, spacing)
    den = functools.partial(_denoiser, unet)
    ddim_ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=0, clip_sample=False)
    sched = _with_reference_alphas(NoiseSchedule.from_scheduler_config({"clip_sample": False}), ddim_ref)
    dpm1 = DPMSolverMultistepScheduler(solver_order=1, algorithm_type="dpmsolver++")
    with torch.no_grad():
        ours = sample(den, x_T, sched, ts, sampler="ddim")
        ref_ddim = _diffusers_ddim(unet, x_T, ddim_ref, T, 0.0, None)
        ref_dpm1 = _diffusers_dpmpp(unet, x_T, dpm1, ts)
    assert _max_abs(ours, ref_dpm1) < _tol(ref_dpm1)
    stride_is_grid = all(a - b == N // T for a, b in zip(ts, ts[1:]))
    if stride_is_grid:
        assert _max_abs(ours, ref_ddim) < _tol(ref_ddim)
    else:
        assert _max_abs(ours, ref_ddim) > 1e-3  # diffusers' DDIM quirk: documented, not copied


@pytest.mark.parametrize("sampler", ["dpmpp_3m", "unipc"])
def test_new_solvers_gradients_with_and_without_checkpointing(unet: Any, x_T: Tensor, sampler: str) -> None:
    sched = NoiseSchedule.from_scheduler_config({"clip_sample": False})
    ts = select_timesteps(4, N, None, sampler)
    grads = []
    for ckpt in (False, True):
        unet.zero_grad(set_to_none=True)
        x = x_T.clone().requires_grad_(True)
        out = sample(functools.partial(_denoiser, unet), x, sched, ts, sampler=sampler, checkpointing=ckpt)
        out.square().mean().backward()
        assert x.grad is not None and all(p.grad is not None for p in unet.parameters())
        grads.append(torch.cat([x.grad.flatten(), *[p.grad.flatten() for p in unet.parameters()]]))
    unet.zero_grad(set_to_none=True)
    # float64 UNet: recomputation is bitwise the same function; 1e-10 allows reordering in autograd
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)
