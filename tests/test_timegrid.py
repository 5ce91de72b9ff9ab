"""Learned timestep grids (issue 9): parameterisation, continuous schedule, gradients, training, export."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays
from safetensors.torch import load_file
from torch import Tensor

from mmdsweep.config import load_experiment
from mmdsweep.core.sampling import NoiseSchedule, alpha_bar_at, sample, sample_continuous, select_timesteps
from mmdsweep.core.timegrid import (
    GRID_END,
    SPACINGS,
    TimeGrid,
    diffusers_scheduler_for_grid,
    legacy_spacing,
    round_grid,
)

UNet2DModel: Any = diffusers.UNet2DModel
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    ),
]
N = 1000
# the initial grid of each spacing in these tests: DDIM's, except linspace, where the multistep solvers'
# grid (T+1 points without t=0: 999, 799, ..., 200) is used
_SAMPLER = {"linspace": "dpmpp_2m"}


def _init_grid(T: int, n: int, spacing: str) -> list[int]:
    return select_timesteps(T, n, spacing, _SAMPLER.get(spacing, "ddim"))


CFG: dict[str, Any] = {
    "num_train_timesteps": N,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": True,
}


class Float64TimeEmbedding(torch.nn.Module):
    """diffusers' sinusoidal ``Timesteps`` (``get_timestep_embedding``) evaluated in float64.

    diffusers casts the timesteps to float32 inside the embedding; for a finite-difference check of the
    chain's derivative in the grid that round-off (~1e-7 * t) would dominate, so the gradient tests swap in
    this float64 copy of the same formula.
    """

    def __init__(self, ref: Any) -> None:
        super().__init__()
        self.dim, self.flip, self.shift = ref.num_channels, ref.flip_sin_to_cos, ref.downscale_freq_shift
        self.scale = getattr(ref, "scale", 1)

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        exponent = (
            -math.log(10000) * torch.arange(half, dtype=torch.float64, device=t.device) / (half - self.shift)
        )
        emb = self.scale * t.double()[:, None] * exponent.exp()[None, :]
        emb = torch.cat([emb.sin(), emb.cos()], dim=-1)
        if self.flip:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        return emb


@pytest.fixture(scope="module")
def unet() -> Any:
    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).double()
    model.time_proj = Float64TimeEmbedding(model.time_proj)
    return model.eval()


def _eps_like(unet: Any, x: Tensor, t: Tensor) -> Tensor:
    """A denoiser with trained-model magnitudes: eps ~ x plus a small random-UNet perturbation (a random UNet
    alone drives the samples to |x| ~ 1e2-1e3, where float32 round-off in diffusers is ~1e-4 absolute)."""
    out: Tensor = x + 0.1 * unet(x, t).sample
    return out


@pytest.fixture(scope="module")
def x_T() -> Tensor:
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_scheduler_config(CFG)


# ---------------------------------------------------------------------------------------------- parameterisation


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("T", [1, 2, 5, 10, 50])
def test_init_equals_the_spacing(spacing: str, T: int) -> None:
    g = TimeGrid.from_spacing(T, N, spacing, _SAMPLER.get(spacing, "ddim"))
    ref = torch.tensor(_init_grid(T, N, spacing), dtype=torch.float64)
    assert float((g.grid().detach() - ref).abs().max()) <= 1e-6
    assert g.rounded() == ref.long().tolist()


def test_spacings_golden() -> None:
    assert _init_grid(5, N, "leading") == [800, 600, 400, 200, 0]
    assert _init_grid(5, N, "trailing") == [999, 799, 599, 399, 199]
    assert _init_grid(5, N, "linspace") == [999, 799, 599, 400, 200]  # diffusers' DPM-Solver grid
    assert _init_grid(5, N, "quadratic") == [800, 450, 200, 50, 0]
    assert legacy_spacing(None, "uniform", "ddim") == "leading"
    assert legacy_spacing("trailing", "uniform", "ddim") == "trailing"
    assert legacy_spacing(None, None, "dpmpp_2m") == "linspace"


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_spacings_match_diffusers(spacing: str) -> None:
    for T in (5, 10):
        ref = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing)
        ref.set_timesteps(T)
        # diffusers' DPM "leading" divides by T+1; ours is DDIM's leading (steps_offset 0)
        if spacing == "leading":
            ref = diffusers.DDIMScheduler(timestep_spacing="leading", steps_offset=0)
            ref.set_timesteps(T)
        assert _init_grid(T, N, spacing) == ref.timesteps.tolist()


@settings(max_examples=200, deadline=None)
@given(
    logits=arrays(
        dtype="float64",
        shape=st.integers(1, 12),
        elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    ),
    spacing=st.sampled_from(SPACINGS),
)
def test_grid_is_monotone_for_any_logits(logits: Any, spacing: str) -> None:
    T = len(logits)
    g = TimeGrid.from_spacing(T, N, spacing, _SAMPLER.get(spacing, "ddim"))
    with torch.no_grad():
        g.logits.copy_(torch.from_numpy(logits))
    t = g.grid().detach()
    assert float(t[0]) == _init_grid(T, N, spacing)[0]  # the first noise level is fixed
    assert bool((t[1:] < t[:-1]).all()) or T == 1
    assert float(t[-1]) > GRID_END
    r = g.rounded()
    assert all(b < a for a, b in zip(r, r[1:])) and r[-1] >= 0 and r[0] <= N - 1


def test_round_grid_resolves_collisions() -> None:
    assert round_grid([999.0, 500.4, 500.2, 0.3], N) == [999, 500, 499, 0]
    assert round_grid([3.0, 0.2, -0.3, -0.9], N) == [3, 2, 1, 0]
    assert round_grid([10.5, 2.5], N) == [10, 2]  # half to even


# ---------------------------------------------------------------------------------------------- schedule at real t


def test_alpha_bar_at_integers_equals_the_discrete_schedule(schedule: NoiseSchedule) -> None:
    t = torch.arange(-1, N, dtype=torch.float64)
    got = alpha_bar_at(schedule, t)
    want = torch.cat(
        [torch.tensor([schedule.final_alpha_cumprod], dtype=torch.float64), schedule.alphas_cumprod]
    )
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


def test_alpha_bar_at_interpolates_log_alpha_bar(schedule: NoiseSchedule) -> None:
    t = torch.tensor([0.5, 10.25, 998.75], dtype=torch.float64, requires_grad=True)
    a = alpha_bar_at(schedule, t)
    ac = schedule.alphas_cumprod
    for v, ti in zip(a.tolist(), [0.5, 10.25, 998.75]):
        k, f = int(math.floor(ti)), ti - math.floor(ti)
        assert v == pytest.approx(math.exp((1 - f) * math.log(ac[k]) + f * math.log(ac[k + 1])), rel=1e-13)
    a.sum().backward()  # strictly decreasing: negative derivative everywhere
    assert t.grad is not None and bool((t.grad < 0).all())


# ---------------------------------------------------------------------------------------------- chain


@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 0.0), ("ddim", 0.5), ("dpmpp_2m", 0.0)])
def test_continuous_chain_on_an_integer_grid_equals_the_discrete_chain(
    unet: Any, x_T: Tensor, schedule: NoiseSchedule, sampler: str, eta: float
) -> None:
    den = functools.partial(_eps_like, unet)
    ints = [900, 610, 333, 120, 7]
    with torch.no_grad():
        a = sample(
            den, x_T, schedule, ints, sampler=sampler, eta=eta, generator=torch.Generator().manual_seed(3)
        )
        b = sample_continuous(
            den,
            x_T,
            schedule,
            torch.tensor(ints, dtype=torch.float64),
            sampler=sampler,
            eta=eta,
            generator=torch.Generator().manual_seed(3),
        )
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _perturbed_grid(T: int, spacing: str, seed: int) -> TimeGrid:
    g = TimeGrid.from_spacing(T, N, spacing, _SAMPLER.get(spacing, "ddim"))
    with torch.no_grad():
        g.logits.add_(
            0.3 * torch.randn(T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        )
    return g


@pytest.mark.parametrize(("sampler", "checkpointing"), [("ddim", False), ("dpmpp_2m", True)])
def test_gradient_in_the_grid_matches_finite_differences(
    unet: Any, x_T: Tensor, schedule: NoiseSchedule, sampler: str, checkpointing: bool
) -> None:
    """d(sum(w * chain output))/d(logits) by autograd vs central differences, float64, tiny UNet (the
    gradient flows through the schedule at real t AND the UNet's timestep input)."""
    g = _perturbed_grid(4, "linspace", seed=5)
    frac = g.grid().detach() - g.grid().detach().floor()
    # log(alpha_bar) is piecewise linear with kinks at integers: keep the points away from them
    assert bool(((frac > 0.05) & (frac < 0.95))[1:].all()), g.timesteps()
    w = torch.linspace(-1, 1, x_T.numel(), dtype=torch.float64).reshape(x_T.shape)
    den = functools.partial(_eps_like, unet)

    def loss(logits: Tensor) -> Tensor:
        with torch.no_grad():
            g.logits.copy_(logits)
        out = sample_continuous(den, x_T, schedule, g.grid(), sampler=sampler, checkpointing=checkpointing)
        return (out * w).sum()

    base = g.logits.detach().clone()
    g.zero_grad()
    loss(base).backward()
    assert g.logits.grad is not None
    ad = g.logits.grad.clone()
    h = 1e-6
    fd = torch.zeros_like(base)
    with torch.no_grad():
        for i in range(base.numel()):
            e = torch.zeros_like(base)
            e[i] = h
            fd[i] = (loss(base + e) - loss(base - e)) / (2 * h)
    rel = float((ad - fd).norm() / ad.norm())
    assert rel < 1e-4, (rel, ad.tolist(), fd.tolist())
    assert float(ad.abs().max()) > 1e-3  # a real signal, not a vanishing one


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_diffusers_with_the_exported_scheduler_reproduces_the_chain(
    unet: Any, x_T: Tensor, schedule: NoiseSchedule, sampler: str
) -> None:
    """Plain diffusers (DPMSolverMultistepScheduler, custom integer timesteps) on the rounded learned grid
    reproduces our chain from the same x_T: max abs difference <= 1e-5 (observed ~4e-7, diffusers' float32
    sigmas). Our side runs on our own float64 schedule from the same config (no reference-alpha trick)."""
    g = _perturbed_grid(5, "linspace", seed=2)
    ints = g.rounded()
    assert ints != _init_grid(5, N, "linspace")
    den = functools.partial(_eps_like, unet)
    sched = diffusers_scheduler_for_grid(ints, sampler, CFG)
    assert sched.timesteps.tolist() == ints and sched.config.solver_order == (1 if sampler == "ddim" else 2)
    with torch.no_grad():
        ours = sample_continuous(den, x_T, schedule, torch.tensor(ints, dtype=torch.float64), sampler=sampler)
        ours_int = sample(den, x_T, schedule, ints, sampler=sampler)
        x = x_T
        for t in sched.timesteps:
            x = sched.step(den(x, t.expand(x.shape[0])), t, x).prev_sample
    assert float((ours - ours_int).abs().max()) < 1e-12
    assert float((ours - x).abs().max()) <= 1e-5, float((ours - x).abs().max())
    assert float(ours.abs().max()) > 0.5  # not a trivially small output


def test_diffusers_scheduler_for_grid_refuses_what_it_cannot_express() -> None:
    with pytest.raises(ValueError, match="sampler"):
        diffusers_scheduler_for_grid([999, 500], "euler", CFG)
    with pytest.raises(ValueError, match="descending"):
        diffusers_scheduler_for_grid([500, 999], "ddim", CFG)
    with pytest.raises(ValueError, match="clip_sample_range"):
        diffusers_scheduler_for_grid(
            [999, 500], "ddim", {**CFG, "clip_sample": True, "clip_sample_range": 2.0}
        )


# ---------------------------------------------------------------------------------------------- training


def _weights(d: Path) -> dict[str, Tensor]:
    return load_file(d / "unet" / "diffusion_pytorch_model.safetensors")


def _last_checkpoint(run_dir: Path) -> Path:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return Path(rows[-1]["checkpoint_path"])


@pytest.mark.parametrize("mode", ["timesteps", "both"])
def test_training_the_grid(tiny_yaml: Path, tmp_path: Path, mode: str) -> None:
    from mmdsweep.train import loop
    from mmdsweep.train.reporting import LocalReporter

    exp = load_experiment(tiny_yaml).with_overrides(
        {"finetune.train": mode, "finetune.timestep_lr": 0.05, "sampler.timestep_spacing": "linspace"}
    )
    run_dir = tmp_path / mode
    summary = loop.run_finetune(exp, LocalReporter(run_dir))
    assert summary.status == "completed"
    ckpt = _last_checkpoint(run_dir)
    state = json.loads((ckpt / "state.json").read_text())
    init = _init_grid(3, N, "linspace")
    assert state["train"] == mode and state["timesteps"] == 3
    grid, grid_int = state["timestep_grid"], state["timestep_grid_int"]
    assert grid[0] == init[0] and max(abs(a - b) for a, b in zip(grid, init)) > 1e-3  # the grid moved
    assert grid_int == round_grid(grid, N)
    src = loop.comp.resolve_model_source(exp)
    pre = load_file(Path(src.model_dir) / "unet" / "diffusion_pytorch_model.safetensors")
    after = _weights(ckpt)
    same = all(torch.equal(after[k], pre[k]) for k in pre)
    assert same is (mode == "timesteps")  # timesteps: bit-identical weights; both: weights trained too
    logits = load_file(ckpt / "train_state" / "timegrid.safetensors")["logits"]
    g = TimeGrid.from_spacing(3, N, "linspace")
    with torch.no_grad():
        g.logits.copy_(logits)
    assert g.timesteps() == pytest.approx(grid, abs=1e-9)


class _Preempted(Exception):
    pass


def _preempt_after_step_2(exp: Any, run_dir: Path) -> None:
    """Run ``exp`` until its report (and checkpoint) of step 2, then die as a preempted worker would."""
    from mmdsweep.train import loop
    from mmdsweep.train.reporting import LocalReporter

    class DiesAfterStep2(LocalReporter):
        def report(self, metrics: Mapping[str, Any], checkpoint_dir: str | Path | None = None) -> None:
            super().report(metrics, checkpoint_dir)
            if metrics["step"] == 2:
                raise _Preempted

    with pytest.raises(_Preempted):
        loop.run_finetune(exp, DiesAfterStep2(run_dir))


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear", "cosine"])
def test_lr_schedule_rebuilt_at_a_step_equals_the_one_stepped_there(name: str) -> None:
    from mmdsweep.train.loop import make_lr_schedule

    def optimizer() -> torch.optim.Optimizer:
        w, g = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
        return torch.optim.Adam([{"params": [w]}, {"params": [g], "lr": 0.1}], lr=1e-5)

    total, warmup = 12, 3
    opt = optimizer()
    sched = make_lr_schedule(opt, name, warmup, total)
    seen = []
    for _ in range(total):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen[0] == [0.0, 0.0]  # the warm-up starts at 0 for every group
    assert seen[warmup] == pytest.approx([1e-5, 0.1])  # each group reaches its own rate
    if name != "constant_with_warmup":
        assert seen[-1][1] < 0.1 * 0.3  # decays towards 0 at `total`
    for k in (1, 5, total - 1):  # a resumed run: the optimizer restored, the schedule rebuilt at step k
        opt2 = optimizer()
        make_lr_schedule(opt2, name, warmup, total)
        for _ in range(k):
            opt2.step()
        saved = opt2.state_dict()
        opt3 = optimizer()
        opt3.load_state_dict(saved)
        make_lr_schedule(opt3, name, warmup, total, step=k)
        assert [g["lr"] for g in opt3.param_groups] == pytest.approx(seen[k], abs=1e-12)


@pytest.mark.parametrize("lr_scheduler", ["constant", "cosine"])
def test_resume_restores_the_grid(tiny_yaml: Path, tmp_path: Path, lr_scheduler: str) -> None:
    from mmdsweep.train import loop
    from mmdsweep.train.reporting import LocalReporter

    exp = load_experiment(tiny_yaml).with_overrides(
        {
            "finetune.train": "both",
            "finetune.timestep_lr": 0.05,
            "finetune.lr_scheduler": lr_scheduler,
            "finetune.lr_warmup_steps": 1 if lr_scheduler == "cosine" else 0,
        }
    )
    full, part = tmp_path / "full", tmp_path / "part"
    loop.run_finetune(exp, LocalReporter(full))
    _preempt_after_step_2(exp, part)
    # resumes from step 2: grid logits, their Adam state and the learning-rate schedule at step 2
    loop.run_finetune(exp, LocalReporter(part))
    a = json.loads((_last_checkpoint(full) / "state.json").read_text())["timestep_grid"]
    b = json.loads((_last_checkpoint(part) / "state.json").read_text())["timestep_grid"]
    assert b == pytest.approx(a, abs=1e-6)


def test_timestep_ema_scores_the_averaged_grid_and_resumes(tiny_yaml: Path, tmp_path: Path) -> None:
    """finetune.timestep_ema_decay: the checkpointed (scored, exported) grid is the moving average of the
    optimiser's grid, avg_k = d avg_(k-1) + (1 - d) raw_k from the initial grid; a preempted run resumes both."""
    from mmdsweep.train import loop
    from mmdsweep.train.reporting import LocalReporter

    d = 0.5
    exp = load_experiment(tiny_yaml).with_overrides(
        {
            "finetune.train": "timesteps",
            "finetune.timestep_lr": 0.2,
            "finetune.timestep_ema_decay": d,
            "finetune.eval_every": 1,
            "sampler.timestep_spacing": "linspace",
        }
    )
    seen: list[dict[str, Tensor]] = []
    grids: list[list[int]] = []

    class Recording(LocalReporter):
        def report(self, metrics: Mapping[str, Any], checkpoint_dir: str | Path | None = None) -> None:
            if checkpoint_dir is not None:
                seen.append(load_file(Path(checkpoint_dir) / "train_state" / "timegrid.safetensors"))
                grids.append(
                    json.loads((Path(checkpoint_dir) / "state.json").read_text())["timestep_grid_int"]
                )
            super().report(metrics, checkpoint_dir)

    loop.run_finetune(exp, Recording(tmp_path / "full"))
    assert len(seen) == 4
    avg = TimeGrid.from_spacing(3, N, "linspace").logits.detach().clone()
    for k, tensors in enumerate(seen):
        avg = d * avg + (1 - d) * tensors["raw_logits"]
        assert torch.allclose(tensors["logits"], avg, atol=1e-6), k
        g = TimeGrid.from_spacing(3, N, "linspace")
        with torch.no_grad():
            g.logits.copy_(tensors["logits"])
        assert grids[k] == g.rounded()  # the averaged grid is the one recorded for scoring and export
    assert not torch.allclose(seen[-1]["logits"], seen[-1]["raw_logits"])
    _preempt_after_step_2(exp, tmp_path / "part")
    loop.run_finetune(exp, LocalReporter(tmp_path / "part"))
    last = load_file(_last_checkpoint(tmp_path / "part") / "train_state" / "timegrid.safetensors")
    for key in ("logits", "raw_logits"):
        assert torch.allclose(last[key], seen[-1][key], atol=1e-6), key
