"""Learnable timestep grids: the T timesteps of a few-step sampler as trainable parameters (issue 9).

MMD-DDM (Aiello et al. 2023) trains the network on a fixed, hand-picked grid; LD3 (Tong et al. 2024,
"Learning to Discretize Denoising Diffusion ODEs"), GITS, AMED and AYS learn the grid and leave the network
alone. Here the grid is a small :class:`torch.nn.Module` that the same MMD gradient trains, alone
(``finetune.train: timesteps``) or together with the weights (``both``).

Parameterisation (monotone by construction). The chain starts at a fixed first noise level
:math:`\\tau_0 = t_{start}` (the first timestep of the initial spacing) and ends at the clean end
:math:`t_{end} = -1` (the chain's ``t_prev < 0``, :math:`\\bar\\alpha` = ``final_alpha_cumprod``). The T-1
free points are

:math:`\\tau_i = t_{start} - (t_{start} - t_{end}) \\sum_{j<i} \\mathrm{softmax}(\\ell)_j`, i = 1..T-1,

with T unconstrained logits :math:`\\ell` and weights :math:`w = \\epsilon + (1 - T\\epsilon)\\,
\\mathrm{softmax}(\\ell)` (:math:`\\epsilon = 10^{-6}`; the last weight is the gap from :math:`\\tau_{T-1}` to the
clean end; the points are summed from the clean end, :math:`\\tau_i = t_{end} + (t_{start}-t_{end})\\sum_{j\\ge i} w_j`).
Every increment is at least :math:`\\epsilon (t_{start} - t_{end})`, so the grid is strictly descending in
:math:`(t_{end}, t_{start}]` for any finite logits, also in floating point (a plain softmax underflows to equal
points once two logits differ by ~37). Initialised with
:math:`\\ell_j = \\log\\big((\\text{gap}_j / (t_{start} - t_{end}) - \\epsilon)/(1 - T\\epsilon)\\big)`, the grid equals the
chosen spacing up to float64 round-off. The schedule at real-valued t is
:func:`mmdsweep.core.sampling.alpha_bar_at` (piecewise-linear :math:`\\log\\bar\\alpha`); the chain is
:func:`mmdsweep.core.sampling.sample_continuous`.

Export. Users load plain diffusers, whose schedulers take integer timesteps: :func:`round_grid` rounds
(half to even), clamps to ``[0, N-1]`` and, should two points collide, pushes them apart by one step; the
rounded grid is what is scored and exported. :func:`diffusers_scheduler_for_grid` builds the diffusers
scheduler that reproduces our DDIM (eta=0) and DPM-Solver++(2M) chains on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mmdsweep.core.sampling import NoiseSchedule, select_timesteps

__all__ = [
    "GRID_END",
    "GRID_FLOOR",
    "SPACINGS",
    "TRAIN_MODES",
    "TimeGrid",
    "diffusers_scheduler_for_grid",
    "legacy_spacing",
    "round_grid",
]

SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace", "quadratic")
TRAIN_MODES: tuple[str, ...] = ("weights", "timesteps", "both")
GRID_FLOOR = 1e-6
"""Minimum share :math:`\\epsilon` of the span per increment (keeps the grid strictly monotone in floating point)."""
GRID_END = -1.0
"""The clean end of the chain on the timestep axis (``t_prev < 0`` in :mod:`mmdsweep.core.sampling`)."""

SOLVER_ORDER = {"ddim": 1, "dpmpp_2m": 2, "dpmpp_3m": 3}


def legacy_spacing(timestep_spacing: str | None, spacing: str | None, sampler: str) -> str:
    """The initial spacing of a learned grid: ``sampler.timestep_spacing`` if set, else the old
    ``sampler.spacing`` (``uniform`` -> ``leading``), else the sampler's standard grid (ddim: leading,
    DPM-Solver/UniPC: linspace)."""
    if timestep_spacing is not None:
        return timestep_spacing
    if spacing is not None:
        return {"uniform": "leading"}.get(spacing, spacing)
    return "leading" if sampler == "ddim" else "linspace"


class TimeGrid(torch.nn.Module):
    """T strictly descending real timesteps from a fixed first noise level towards the clean end (see the
    module docstring for the parameterisation). ``grid()`` (or calling the module) returns a float64 tensor
    of shape ``(T,)``; the only parameter is ``logits`` (T values, float64)."""

    t_start: Tensor  # buffer: the fixed first noise level

    def __init__(self, init: Sequence[float], num_train_timesteps: int) -> None:
        super().__init__()
        vals = [float(v) for v in init]
        n = int(num_train_timesteps)
        if not vals or any(not math.isfinite(v) for v in vals):
            raise ValueError(f"init={list(init)!r}: expected a non-empty list of finite timesteps")
        if any(b >= a for a, b in zip(vals, vals[1:])) or vals[-1] <= GRID_END or vals[0] > n - 1:
            raise ValueError(
                f"init={vals}: expected strictly descending timesteps in ({GRID_END:g}, {n - 1}]"
            )
        self.num_train_timesteps = n
        self.register_buffer("t_start", torch.tensor(vals[0], dtype=torch.float64))
        gaps = torch.tensor([a - b for a, b in zip(vals, [*vals[1:], GRID_END])], dtype=torch.float64)
        share = gaps / gaps.sum()
        T = len(vals)
        if bool((share <= GRID_FLOOR).any()):
            raise ValueError(f"init={vals}: a gap below {GRID_FLOOR:g} of the span cannot be represented")
        self.logits = torch.nn.Parameter(((share - GRID_FLOOR) / (1.0 - T * GRID_FLOOR)).log())

    @classmethod
    def from_spacing(cls, T: int, num_train_timesteps: int, spacing: str, sampler: str = "ddim") -> TimeGrid:
        """A grid initialised exactly at the chain's integer grid,
        :func:`mmdsweep.core.sampling.select_timesteps` ``(T, N, spacing, sampler)``."""
        return cls(select_timesteps(T, num_train_timesteps, spacing, sampler), num_train_timesteps)

    @property
    def T(self) -> int:  # noqa: N802 - the field's name for the number of steps
        return int(self.logits.numel())

    def grid(self) -> Tensor:
        """The current timesteps, float64, strictly descending, differentiable in ``logits``."""
        T = self.T
        w = GRID_FLOOR + (1.0 - T * GRID_FLOOR) * torch.softmax(self.logits, dim=0)
        span = self.t_start - GRID_END
        # summed from the clean end: tau_{T-1} = t_end + span * w_{T-1} > t_end whatever the logits
        tail = torch.flip(torch.cumsum(torch.flip(w[1:], [0]), dim=0), [0])
        return torch.cat([self.t_start.reshape(1), GRID_END + span * tail])

    def forward(self) -> Tensor:
        return self.grid()

    def timesteps(self) -> list[float]:
        """The current grid as Python floats (what ``state.json`` records)."""
        return [float(v) for v in self.grid().detach().cpu().tolist()]

    def rounded(self) -> list[int]:
        """The integer grid that is scored and exported (:func:`round_grid`)."""
        return round_grid(self.timesteps(), self.num_train_timesteps)


def round_grid(timesteps: Sequence[float], num_train_timesteps: int) -> list[int]:
    """Integer grid for export: round half to even, clamp to ``[0, N-1]``, keep strictly descending.

    A collision (two points rounding to the same integer, or points below 0 clamped together) is resolved by
    moving the later point one step down, and, if that leaves the end below 0, moving earlier points up from
    the end; the result differs from the rounded values only where points were closer than one step.
    """
    n = int(num_train_timesteps)
    vals = [float(v) for v in timesteps]
    if not 1 <= len(vals) <= n:
        raise ValueError(f"{len(vals)} timesteps: expected 1..num_train_timesteps={n}")
    out = [min(max(int(round(v)), 0), n - 1) for v in vals]
    for i in range(1, len(out)):
        out[i] = min(out[i], out[i - 1] - 1)
    if out[-1] < 0:
        out[-1] = 0
        for i in range(len(out) - 2, -1, -1):
            out[i] = max(out[i], out[i + 1] + 1)
    return out


def diffusers_scheduler_for_grid(
    int_grid: Sequence[int], sampler: str, schedule_config: Mapping[str, Any]
) -> Any:
    """A diffusers ``DPMSolverMultistepScheduler`` that reproduces our chain on the integer grid ``int_grid``.

    ``sampler``: ``ddim`` (eta = 0; first-order DPM-Solver++ is exactly DDIM, Lu et al. 2022, DPM-Solver++
    Sec. 4) -> ``solver_order=1``; ``dpmpp_2m`` -> ``solver_order=2`` (``solver_type="midpoint"``, Algorithm 2);
    ``dpmpp_3m`` -> 3. ``algorithm_type="dpmsolver++"``, the last step first order, into
    :math:`\\sigma=0` when the schedule ends at :math:`\\bar\\alpha=1` (``set_alpha_to_one``), else into
    :math:`\\bar\\alpha_0` (``final_sigmas_type="sigma_min"``). ``clip_sample`` with range 1 is diffusers'
    ``thresholding=True, sample_max_value=1`` (the dynamic threshold is clamped to exactly 1). The scheduler
    comes back with ``set_timesteps(timesteps=int_grid)`` already called (call it again before each new chain).
    """
    import diffusers  # diffusers is heavy; only export paths need it

    if sampler not in SOLVER_ORDER:
        raise ValueError(f"sampler={sampler!r}: expected one of {sorted(SOLVER_ORDER)}")
    grid = [int(t) for t in int_grid]
    sched = NoiseSchedule.from_scheduler_config(schedule_config)
    n = sched.num_train_timesteps
    if not grid or any(b >= a for a, b in zip(grid, grid[1:])) or grid[-1] < 0 or grid[0] > n - 1:
        raise ValueError(f"int_grid={grid}: expected strictly descending integers in [0, {n - 1}]")
    if sched.clip_sample and sched.clip_sample_range != 1.0:
        raise ValueError(
            f"clip_sample_range={sched.clip_sample_range}: diffusers' DPM-Solver thresholds statically only at 1.0"
        )
    if sched.final_alpha_cumprod == 1.0:
        final = "zero"
    elif sched.final_alpha_cumprod == float(sched.alphas_cumprod[0]):
        final = "sigma_min"
    else:
        raise ValueError(f"final_alpha_cumprod={sched.final_alpha_cumprod}: not expressible in diffusers")
    keep = (
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "prediction_type",
    )
    cfg = {k: schedule_config[k] for k in keep if k in schedule_config and schedule_config[k] is not None}
    cls: Any = diffusers.DPMSolverMultistepScheduler
    scheduler = cls.from_config(
        {
            **cfg,
            "algorithm_type": "dpmsolver++",
            "solver_order": SOLVER_ORDER[sampler],
            "solver_type": "midpoint",
            "lower_order_final": True,
            "euler_at_final": True,
            "final_sigmas_type": final,
            "thresholding": sched.clip_sample,
            "sample_max_value": 1.0,
            "use_karras_sigmas": False,
        }
    )
    scheduler.set_timesteps(timesteps=grid)
    return scheduler
