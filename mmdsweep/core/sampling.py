"""Differentiable few-step samplers for MMD-DDM fine-tuning.

MMD-DDM (Aiello, Valsesia, Magli 2023, arXiv:2301.07969) runs a short sampling chain *with* gradients and
backpropagates an MMD loss through every step.  This module therefore keeps the sampler maths in small pure
functions (no ``torch.no_grad`` anywhere; the caller decides) and offers optional per-step activation
checkpointing so that the autograd memory of the denoiser does not grow with the number of steps.

Notation: ``alpha_t`` always means the cumulative product :math:`\\bar\\alpha_t = \\prod_{s\\le t}(1-\\beta_s)`
(diffusers' ``alphas_cumprod``); timestep ``t_prev < 0`` denotes the end of the chain, whose
:math:`\\bar\\alpha` is :attr:`NoiseSchedule.final_alpha_cumprod`.

The schedule arithmetic follows diffusers' ``DDIMScheduler`` and ``DPMSolverMultistepScheduler`` so that a
model fine-tuned here behaves identically when exported as a diffusers pipeline (see ``tests/test_sampling.py``
for the golden comparisons).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "PREDICTION_TYPES",
    "SAMPLERS",
    "BETA_SCHEDULES",
    "TIMESTEP_SPACINGS",
    "ChainSampler",
    "Denoiser",
    "NoiseSchedule",
    "cosine_betas",
    "ddim_sigma",
    "ddim_step",
    "dpmpp_2m_step",
    "half_log_snr",
    "linear_betas",
    "predict_x0_eps",
    "sample",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_dpmpp_3m",
    "sample_unipc",
    "ChainSpec",
    "run_chain",
    "normalize_spacing",
    "LEGACY_SPACINGS",
    "MULTISTEP_SAMPLERS",
    "scaled_linear_betas",
    "select_timesteps",
]

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace", "quadratic")
LEGACY_SPACINGS: dict[str, str] = {"uniform": "leading"}
"""Old spacing names still accepted (one release): ``uniform`` is diffusers' ``leading``."""
MULTISTEP_SAMPLERS: tuple[str, ...] = ("dpmpp_2m", "dpmpp_3m", "unipc")
"""Samplers whose grids follow diffusers' multistep schedulers (T+1 points, the last (t=0) dropped)."""

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``denoiser(x, t) -> model_output``; ``t`` is a LongTensor of shape ``(B,)`` on ``x.device``."""


# --------------------------------------------------------------------------------------------------------------
# Beta schedules (computed exactly like diffusers: float32 betas, here accumulated in float64)
# --------------------------------------------------------------------------------------------------------------


def linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Linear beta schedule of DDPM (Ho, Jain, Abbeel 2020, Sec. 4): betas evenly spaced in [start, end].

    Returned in float32, the precision in which diffusers defines its betas.
    """
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def scaled_linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Latent-diffusion schedule (Rombach et al. 2022): :math:`\\sqrt{\\beta}` linear in t, then squared (float32)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def cosine_betas(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021 ("Improved DDPM"), Eq. 17.

    :math:`f(u) = \\cos^2\\big(\\tfrac{u + s}{1 + s}\\tfrac{\\pi}{2}\\big)`, :math:`\\bar\\alpha_t = f(t/T)/f(0)` and
    :math:`\\beta_t = \\min(1 - f(\\tfrac{t+1}{T}) / f(\\tfrac{t}{T}),\\ \\text{max\\_beta})` (their Sec. 3.2 clipping).
    Evaluated in float64 and returned in float32 (diffusers' ``squaredcos_cap_v2``).
    """

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    n = num_train_timesteps
    return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------
# Noise schedule
# --------------------------------------------------------------------------------------------------------------


def _config_bool(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"scheduler config {key!r}={value!r}: expected a bool")
    return value


def _config_float(cfg: Mapping[str, Any], key: str, default: float) -> float:
    value = cfg.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"scheduler config {key!r}={value!r}: expected a number")
    return float(value)


@dataclass(frozen=True)
class NoiseSchedule:
    """Discrete variance-preserving noise schedule :math:`\\bar\\alpha_0 > \\dots > \\bar\\alpha_{N-1}`.

    Attributes:
        alphas_cumprod: float64 tensor of shape ``(num_train_timesteps,)``, strictly decreasing in (0, 1); any
            floating tensor is accepted and stored as a detached, contiguous float64 CPU copy.
        prediction_type: what the denoiser predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        final_alpha_cumprod: :math:`\\bar\\alpha` at the end of the chain (``t_prev < 0``); 1.0 is diffusers'
            ``set_alpha_to_one=True``, ``alphas_cumprod[0]`` is ``set_alpha_to_one=False``.
        clip_sample: clamp the predicted x0 to ``[-clip_sample_range, clip_sample_range]`` at every step.
        clip_sample_range: see ``clip_sample``.
    """

    alphas_cumprod: Tensor
    prediction_type: str = "epsilon"
    final_alpha_cumprod: float = 1.0
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def __post_init__(self) -> None:
        ac = self.alphas_cumprod
        if not isinstance(ac, Tensor) or not ac.is_floating_point():
            raise ValueError(f"alphas_cumprod={ac!r}: expected a floating-point torch.Tensor")
        if ac.ndim != 1 or ac.numel() < 1:
            raise ValueError(f"alphas_cumprod shape={tuple(ac.shape)}: expected a non-empty 1-D tensor")
        ac = ac.detach().to(device="cpu", dtype=torch.float64).contiguous()
        if not bool(torch.isfinite(ac).all()) or bool((ac <= 0).any()) or bool((ac >= 1).any()):
            raise ValueError(
                f"alphas_cumprod in [{ac.min().item()}, {ac.max().item()}]: expected finite values in (0, 1)"
            )
        if bool((ac[1:] >= ac[:-1]).any()):
            raise ValueError("alphas_cumprod: expected strictly decreasing values (more noise at larger t)")
        object.__setattr__(self, "alphas_cumprod", ac)
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={self.prediction_type!r}: expected one of {PREDICTION_TYPES}")
        if not 0.0 < self.final_alpha_cumprod <= 1.0:
            raise ValueError(f"final_alpha_cumprod={self.final_alpha_cumprod!r}: expected a value in (0, 1]")
        if not self.clip_sample_range > 0.0:
            raise ValueError(f"clip_sample_range={self.clip_sample_range!r}: expected a positive number")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NoiseSchedule):
            return NotImplemented
        return (
            self.prediction_type == other.prediction_type
            and self.final_alpha_cumprod == other.final_alpha_cumprod
            and self.clip_sample == other.clip_sample
            and self.clip_sample_range == other.clip_sample_range
            and torch.equal(self.alphas_cumprod, other.alphas_cumprod)
        )

    def __hash__(self) -> int:
        return hash(
            (
                self.num_train_timesteps,
                self.prediction_type,
                self.final_alpha_cumprod,
                self.clip_sample,
                self.clip_sample_range,
            )
        )

    @property
    def num_train_timesteps(self) -> int:
        """Number N of discrete training timesteps (valid t are 0..N-1)."""
        return int(self.alphas_cumprod.shape[0])

    @property
    def betas(self) -> Tensor:
        """float64 betas recovered from :math:`\\beta_t = 1 - \\bar\\alpha_t / \\bar\\alpha_{t-1}` (with ᾱ_{-1}=1)."""
        ac = self.alphas_cumprod
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        return 1.0 - ac / prev

    def alpha_bar(self, t: int) -> float:
        """:math:`\\bar\\alpha_t` as a Python float (float64); ``t < 0`` gives ``final_alpha_cumprod``."""
        if t < 0:
            return float(self.final_alpha_cumprod)
        if t >= self.num_train_timesteps:
            raise ValueError(f"timestep t={t}: expected t < num_train_timesteps={self.num_train_timesteps}")
        return float(self.alphas_cumprod[t].item())

    @classmethod
    def from_betas(
        cls,
        betas: Tensor,
        prediction_type: str = "epsilon",
        set_alpha_to_one: bool = True,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
    ) -> NoiseSchedule:
        """Schedule from betas: :math:`\\bar\\alpha_t = \\prod_{s \\le t} (1 - \\beta_s)` (Ho et al. 2020, Eq. 4),
        accumulated in float64."""
        b = betas.detach().to(device="cpu", dtype=torch.float64)
        if b.ndim != 1 or b.numel() < 1 or bool((b <= 0).any()) or bool((b >= 1).any()):
            raise ValueError(
                f"betas shape={tuple(b.shape)}: expected a non-empty 1-D tensor with values in (0, 1)"
            )
        ac = torch.cumprod(1.0 - b, dim=0)
        return cls(
            alphas_cumprod=ac,
            prediction_type=prediction_type,
            final_alpha_cumprod=1.0 if set_alpha_to_one else float(ac[0].item()),
            clip_sample=clip_sample,
            clip_sample_range=clip_sample_range,
        )

    @classmethod
    def from_scheduler_config(cls, cfg: Mapping[str, Any]) -> NoiseSchedule:
        """Build from a diffusers scheduler config (``scheduler_config.json`` of DDPM/DDIM schedulers).

        Betas are computed as diffusers computes them (float32), missing keys take diffusers' DDIMScheduler
        defaults (note ``clip_sample`` defaults to True there).  Keys that only govern diffusers' own timestep
        selection (``timestep_spacing``, ``steps_offset``) and bookkeeping keys are ignored; options that would
        change the sampler and are unsupported raise ``ValueError`` naming the key.
        """
        if not isinstance(cfg, Mapping):
            raise ValueError(f"scheduler config of type {type(cfg).__name__}: expected a mapping")
        if _config_bool(cfg, "thresholding", False):
            raise ValueError("scheduler config 'thresholding'=True: dynamic thresholding is not supported")
        if _config_bool(cfg, "rescale_betas_zero_snr", False):
            raise ValueError(
                "scheduler config 'rescale_betas_zero_snr'=True: zero-terminal-SNR is not supported"
            )
        variance_type = cfg.get("variance_type")
        if variance_type in ("learned", "learned_range"):
            raise ValueError(
                f"scheduler config 'variance_type'={variance_type!r}: models with learned variance are not supported"
            )

        n_raw = cfg.get("num_train_timesteps", 1000)
        if isinstance(n_raw, bool) or not isinstance(n_raw, int) or n_raw < 1:
            raise ValueError(f"scheduler config 'num_train_timesteps'={n_raw!r}: expected a positive int")
        n = int(n_raw)

        trained = cfg.get("trained_betas")
        if trained is not None:
            try:
                betas = torch.as_tensor(trained, dtype=torch.float32).flatten()
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ValueError(
                    f"scheduler config 'trained_betas': expected a list of floats ({exc})"
                ) from None
            if "num_train_timesteps" in cfg and betas.numel() != n:
                raise ValueError(
                    f"scheduler config 'trained_betas' has {betas.numel()} entries: "
                    f"expected num_train_timesteps={n}"
                )
        else:
            schedule = cfg.get("beta_schedule", "linear")
            beta_start = _config_float(cfg, "beta_start", 0.0001)
            beta_end = _config_float(cfg, "beta_end", 0.02)
            if schedule == "linear":
                betas = linear_betas(n, beta_start, beta_end)
            elif schedule == "scaled_linear":
                betas = scaled_linear_betas(n, beta_start, beta_end)
            elif schedule == "squaredcos_cap_v2":
                betas = cosine_betas(n)
            else:
                raise ValueError(
                    f"scheduler config 'beta_schedule'={schedule!r}: expected one of {BETA_SCHEDULES}"
                )

        prediction_type = cfg.get("prediction_type", "epsilon")
        if prediction_type is None:
            prediction_type = "epsilon"
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"scheduler config 'prediction_type'={prediction_type!r}: expected one of {PREDICTION_TYPES}"
            )
        clip_range = _config_float(cfg, "clip_sample_range", 1.0)
        if not clip_range > 0:
            raise ValueError(
                f"scheduler config 'clip_sample_range'={clip_range!r}: expected a positive number"
            )
        return cls.from_betas(
            betas,
            prediction_type=prediction_type,
            set_alpha_to_one=_config_bool(cfg, "set_alpha_to_one", True),
            clip_sample=_config_bool(cfg, "clip_sample", True),
            clip_sample_range=clip_range,
        )

    def to_scheduler_config(self) -> dict[str, Any]:
        """Inverse of :meth:`from_scheduler_config` as a ``DDIMScheduler.from_config`` dict.

        The schedule is exported losslessly as ``trained_betas`` (diffusers casts them to float32, which recovers
        float32 betas exactly); ``timestep_spacing="leading"`` with ``steps_offset=0`` makes diffusers' DDIM
        timesteps coincide with ``select_timesteps(T, N, "uniform")``.
        """
        first = float(self.alphas_cumprod[0].item())
        if self.final_alpha_cumprod == 1.0:
            set_alpha_to_one = True
        elif self.final_alpha_cumprod == first:
            set_alpha_to_one = False
        else:
            raise ValueError(
                f"final_alpha_cumprod={self.final_alpha_cumprod!r}: expected 1.0 or alphas_cumprod[0]={first!r} "
                "to be expressible as diffusers' set_alpha_to_one"
            )
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": "linear",
            "trained_betas": [float(b) for b in self.betas.tolist()],
            "prediction_type": self.prediction_type,
            "clip_sample": self.clip_sample,
            "clip_sample_range": self.clip_sample_range,
            "set_alpha_to_one": set_alpha_to_one,
            "thresholding": False,
            "rescale_betas_zero_snr": False,
            "timestep_spacing": "leading",
            "steps_offset": 0,
        }


# --------------------------------------------------------------------------------------------------------------
# Timestep selection
# --------------------------------------------------------------------------------------------------------------


def normalize_spacing(spacing: str | None, sampler: str = "ddim") -> str:
    """Resolve a spacing name: ``None`` -> the sampler's standard grid (``ddim``: ``leading``, the
    multistep solvers: ``linspace``, diffusers' defaults); the legacy ``uniform`` -> ``leading``."""
    if spacing is None:
        return "linspace" if sampler in MULTISTEP_SAMPLERS else "leading"
    spacing = LEGACY_SPACINGS.get(spacing, spacing)
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"spacing={spacing!r}: expected one of {TIMESTEP_SPACINGS} (or null)")
    return spacing


def select_timesteps(
    T: int, num_train_timesteps: int, spacing: str | None = "leading", sampler: str = "ddim"
) -> list[int]:
    """Descending grid of T training timesteps, with diffusers' names and formulas.

    For ``sampler="ddim"`` (diffusers' ``DDIMScheduler.set_timesteps``, N = ``num_train_timesteps``):

    * ``leading`` (old name ``uniform``): :math:`\\tau_i = i\\lfloor N/T\\rfloor`, T=5 -> [800, 600, 400, 200, 0];
    * ``trailing``: ``round(arange(N, 0, -N/T)) - 1``, T=5 -> [999, 799, 599, 399, 199];
    * ``linspace``: ``round(linspace(0, N-1, T))`` reversed, T=5 -> [999, 749, 500, 250, 0].

    For the multistep solvers (``dpmpp_2m``, ``dpmpp_3m``, ``unipc``: diffusers'
    ``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler.set_timesteps``, which lay T+1 points and drop t=0):

    * ``leading``: ``arange(T+1) * (N // (T+1))`` reversed without its last point, T=5 -> [830, ..., 166];
    * ``trailing``: as for DDIM;
    * ``linspace``: ``round(linspace(0, N-1, T+1))`` reversed without its last point, T=5 -> [999, 799, 599, 400, 200].

    ``quadratic`` (DDIM paper, App. D.2, for every sampler): :math:`\\tau_i = \\lfloor 0.8N\\,i^2/(T-1)^2\\rfloor`
    in exact integer arithmetic, colliding values pushed up to keep the grid strictly increasing.
    ``None`` selects the sampler's standard grid (:func:`normalize_spacing`).  NumPy's rounding (half to even)
    is used, as diffusers uses it.

    Note: diffusers' DDIM ``step()`` goes from t to ``t - N // T`` whatever the grid; on the leading grid (and on
    trailing when T divides N) that is the next grid point, elsewhere it is not (diffusers issues 12633, 11347).
    Our DDIM always steps to the next grid point: on ``linspace`` and non-dividing ``trailing`` grids it equals
    diffusers' first-order DPM-Solver++ with these timesteps (the export uses that), not diffusers' DDIM.
    """
    import numpy as np

    for name, value in (("T", T), ("num_train_timesteps", num_train_timesteps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}={value!r}: expected an int")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps={num_train_timesteps}: expected >= 1")
    if not 1 <= T <= num_train_timesteps:
        raise ValueError(f"T={T}: expected 1 <= T <= num_train_timesteps={num_train_timesteps}")
    spacing = normalize_spacing(spacing, sampler)
    n = num_train_timesteps
    multistep = sampler in MULTISTEP_SAMPLERS
    if spacing == "leading":
        if multistep:
            step = n // (T + 1)
            descending = [int(v) for v in (np.arange(0, T + 1) * step)[::-1][:-1]]
        else:
            step = n // T
            descending = [i * step for i in range(T)][::-1]
    elif spacing == "trailing":
        descending = [int(v) - 1 for v in np.round(np.arange(n, 0, -n / T)).astype(np.int64)]
    elif spacing == "linspace":
        if multistep:
            descending = [int(v) for v in np.linspace(0, n - 1, T + 1).round()[::-1][:-1].astype(np.int64)]
        else:
            descending = [int(v) for v in np.linspace(0, n - 1, T).round()[::-1].astype(np.int64)]
    else:  # quadratic
        if T == 1:
            ascending = [0]
        else:
            # floor(0.8 * N * i^2 / (T-1)^2) without floating-point rounding
            ascending = [(4 * n * i * i) // (5 * (T - 1) ** 2) for i in range(T)]
            for i in range(1, T):
                ascending[i] = max(ascending[i], ascending[i - 1] + 1)
        descending = ascending[::-1]
    if len(descending) != T or any(b >= a for a, b in zip(descending, descending[1:])) or descending[-1] < 0:
        raise ValueError(
            f"T={T}: the {spacing!r} grid for num_train_timesteps={n} is not {T} distinct timesteps: {descending}"
        )
    if descending[0] >= n:
        raise ValueError(f"T={T}: too many {spacing!r} steps for num_train_timesteps={n}")
    return descending


# --------------------------------------------------------------------------------------------------------------
# Pure step functions
# --------------------------------------------------------------------------------------------------------------


def predict_x0_eps(
    model_output: Tensor, x: Tensor, alpha_t: float, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """Convert a model output at :math:`x_t = \\sqrt{\\bar\\alpha_t} x_0 + \\sqrt{1-\\bar\\alpha_t}\\,\\epsilon` to (x0, eps).

    * epsilon (Ho et al. 2020, Eq. 15 / DDIM Eq. 12's "predicted x0"):
      :math:`x_0 = (x_t - \\sqrt{1-\\bar\\alpha_t}\\,\\epsilon)/\\sqrt{\\bar\\alpha_t}`.
    * sample: :math:`\\epsilon = (x_t - \\sqrt{\\bar\\alpha_t}\\,x_0)/\\sqrt{1-\\bar\\alpha_t}`.
    * v_prediction (Salimans & Ho 2022, "Progressive Distillation", Sec. 4 / App. D), with
      :math:`v = \\sqrt{\\bar\\alpha_t}\\,\\epsilon - \\sqrt{1-\\bar\\alpha_t}\\,x_0`:
      :math:`x_0 = \\sqrt{\\bar\\alpha_t} x_t - \\sqrt{1-\\bar\\alpha_t} v`,
      :math:`\\epsilon = \\sqrt{\\bar\\alpha_t} v + \\sqrt{1-\\bar\\alpha_t} x_t`.

    ``alpha_t`` is :math:`\\bar\\alpha_t` (a cumulative product) as a Python float.
    """
    if not 0.0 < alpha_t <= 1.0:
        raise ValueError(f"alpha_t={alpha_t!r}: expected a cumulative alpha in (0, 1]")
    sqrt_a = math.sqrt(alpha_t)
    sqrt_1ma = math.sqrt(1.0 - alpha_t)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x - sqrt_1ma * eps) / sqrt_a
    elif prediction_type == "sample":
        x0 = model_output
        if sqrt_1ma == 0.0:
            raise ValueError(
                f"alpha_t={alpha_t!r}: epsilon is undefined at alpha_t=1 for prediction_type='sample'"
            )
        eps = (x - sqrt_a * x0) / sqrt_1ma
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * x - sqrt_1ma * model_output
        eps = sqrt_a * model_output + sqrt_1ma * x
    else:
        raise ValueError(f"prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")
    return x0, eps


def _clip_x0(x0: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Static thresholding of the data prediction (DDPM/DDIM ``clip_sample``; Saharia et al. 2022, Sec. 2.3)."""
    if schedule.clip_sample:
        return x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    return x0


def _check_step(t: int, t_prev: int, schedule: NoiseSchedule) -> None:
    n = schedule.num_train_timesteps
    if not 0 <= t < n:
        raise ValueError(f"timestep t={t}: expected 0 <= t < num_train_timesteps={n}")
    if t_prev >= t:
        raise ValueError(f"t_prev={t_prev}: expected t_prev < t={t} (the chain runs towards t=0)")


def ddim_sigma(alpha_t: float, alpha_prev: float, eta: float) -> float:
    """DDIM noise scale, Song et al. 2021, Eq. 16:
    :math:`\\sigma_t(\\eta) = \\eta \\sqrt{(1-\\bar\\alpha_{t-1})/(1-\\bar\\alpha_t)}\\sqrt{1-\\bar\\alpha_t/\\bar\\alpha_{t-1}}`.
    """
    if eta == 0.0:
        return 0.0
    return eta * math.sqrt((1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev))


def ddim_step(
    x: Tensor,
    model_output: Tensor,
    t: int,
    t_prev: int,
    schedule: NoiseSchedule,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    """One generalised DDIM update, Song et al. 2021, Eq. 12:

    :math:`x_{t_{prev}} = \\sqrt{\\bar\\alpha_{prev}}\\,\\hat x_0 + \\sqrt{1-\\bar\\alpha_{prev}-\\sigma_t^2}\\,\\hat\\epsilon
    + \\sigma_t z`, with :math:`\\sigma_t` from Eq. 16 (:func:`ddim_sigma`).

    ``t_prev < 0`` targets ``schedule.final_alpha_cumprod``.  :math:`\\hat x_0` is clipped when
    ``schedule.clip_sample`` while :math:`\\hat\\epsilon` is not re-derived (diffusers' default
    ``use_clipped_model_output=False``).  ``noise`` (z, shaped like ``x``) is required when ``eta > 0``.
    """
    _check_step(t, t_prev, schedule)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta!r}: expected 0 <= eta <= 1")
    alpha_t = schedule.alpha_bar(t)
    alpha_prev = schedule.alpha_bar(t_prev)
    x0, eps = predict_x0_eps(model_output, x, alpha_t, schedule.prediction_type)
    x0 = _clip_x0(x0, schedule)
    sigma = ddim_sigma(alpha_t, alpha_prev, eta)
    direction = math.sqrt(max(1.0 - alpha_prev - sigma**2, 0.0))
    x_prev = math.sqrt(alpha_prev) * x0 + direction * eps
    if sigma > 0.0:
        if noise is None:
            raise ValueError(f"noise=None with eta={eta}: expected a noise tensor shaped like x")
        if noise.shape != x.shape:
            raise ValueError(f"noise shape={tuple(noise.shape)}: expected the shape of x {tuple(x.shape)}")
        x_prev = x_prev + sigma * noise
    return x_prev


def half_log_snr(alpha_bar: float) -> float:
    """Half log-SNR :math:`\\lambda = \\log(\\alpha/\\sigma)` with :math:`\\alpha=\\sqrt{\\bar\\alpha}`,
    :math:`\\sigma=\\sqrt{1-\\bar\\alpha}` (Lu et al. 2022, DPM-Solver, Sec. 3.1); +inf at :math:`\\bar\\alpha=1`."""
    if alpha_bar >= 1.0:
        return math.inf
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


def _alpha_sigma_lambda(schedule: NoiseSchedule, t: int) -> tuple[float, float, float]:
    """:math:`(\\alpha_t, \\sigma_t, \\lambda_t)` with :math:`\\alpha=\\sqrt{\\bar\\alpha}`; ``t < 0`` is the end of a
    multistep chain, :math:`\\sigma=0` (diffusers' ``final_sigmas_type="zero"``)."""
    if t < 0:
        return 1.0, 0.0, math.inf
    ab = schedule.alpha_bar(t)
    return math.sqrt(ab), math.sqrt(1.0 - ab), half_log_snr(ab)


def data_prediction(model_output: Tensor, x: Tensor, t: int, schedule: NoiseSchedule) -> Tensor:
    """Clipped data prediction :math:`\\hat x_0(x_t, t)` (static thresholding when ``schedule.clip_sample``)."""
    x0, _ = predict_x0_eps(model_output, x, schedule.alpha_bar(t), schedule.prediction_type)
    return _clip_x0(x0, schedule)


def dpmpp_multistep_update(
    x: Tensor,
    x0s: Sequence[Tensor],
    ts: Sequence[int],
    t_prev: int,
    schedule: NoiseSchedule,
) -> Tensor:
    """One DPM-Solver++ multistep update of order ``len(x0s)`` (1, 2 or 3) in data-prediction form
    (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and its third-order multistep variant, as diffusers'
    ``DPMSolverMultistepScheduler`` with ``solver_type="midpoint"``).

    ``x0s``/``ts`` hold the data predictions and their timesteps, most recent LAST (``ts[-1]`` is the current
    t).  With :math:`h = \\lambda_{prev} - \\lambda_{s_0}`, :math:`r_k = h_k/h`, :math:`D_0 = m_0`:

    * order 1: :math:`x' = \\tfrac{\\sigma'}{\\sigma_{s_0}} x - \\alpha'(e^{-h}-1) D_0` (= DDIM, eta=0);
    * order 2: minus :math:`\\tfrac12\\alpha'(e^{-h}-1) D_1`, :math:`D_1 = (m_0 - m_1)/r_0`;
    * order 3: :math:`+\\alpha'(\\tfrac{e^{-h}-1}{h}+1) D_1 - \\alpha'(\\tfrac{e^{-h}-1+h}{h^2}-\\tfrac12) D_2` with
      :math:`D_1 = D_{1,0} + \\tfrac{r_0}{r_0+r_1}(D_{1,0}-D_{1,1})`, :math:`D_2 = \\tfrac{D_{1,0}-D_{1,1}}{r_0+r_1}`.

    ``t_prev < 0`` is the end of the chain (:math:`\\sigma'=0`): the update returns :math:`D_0` (first order).
    """
    order = len(x0s)
    if order not in (1, 2, 3) or len(ts) != order:
        raise ValueError(f"order={order}: expected 1, 2 or 3 data predictions with as many timesteps")
    m0 = x0s[-1]
    if t_prev < 0:
        return m0
    a_t, s_t, lam_t = _alpha_sigma_lambda(schedule, t_prev)
    _, s_0, lam_0 = _alpha_sigma_lambda(schedule, ts[-1])
    h = lam_t - lam_0
    em1 = math.expm1(-h)  # e^{-h} - 1
    out = (s_t / s_0) * x - (a_t * em1) * m0
    if order == 2:
        lam_1 = _alpha_sigma_lambda(schedule, ts[-2])[2]
        r0 = (lam_0 - lam_1) / h
        out = out - (0.5 * a_t * em1 / r0) * (m0 - x0s[-2])
    elif order == 3:
        lam_1 = _alpha_sigma_lambda(schedule, ts[-2])[2]
        lam_2 = _alpha_sigma_lambda(schedule, ts[-3])[2]
        r0, r1 = (lam_0 - lam_1) / h, (lam_1 - lam_2) / h
        d10 = (m0 - x0s[-2]) / r0
        d11 = (x0s[-2] - x0s[-3]) / r1
        d1 = d10 + (r0 / (r0 + r1)) * (d10 - d11)
        d2 = (d10 - d11) / (r0 + r1)
        out = out + (a_t * (em1 / h + 1.0)) * d1 - (a_t * ((em1 + h) / h**2 - 0.5)) * d2
    return out


def dpmpp_2m_step(
    x: Tensor,
    model_output: Tensor,
    t: int,
    t_prev: int,
    schedule: NoiseSchedule,
    history: tuple[Tensor, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """One DPM-Solver++(2M) step (Lu et al. 2022, Algorithm 2); ``history = (x0_last, t_last)`` of the previous
    step gives the second-order update, the step into the end of the chain (``t_prev < 0``) is first order
    and returns :math:`D_0` (diffusers' ``final_sigmas_type="zero"``).  Returns ``(x_prev, x0)``."""
    _check_step(t, t_prev, schedule)
    x0 = data_prediction(model_output, x, t, schedule)
    if history is not None and t_prev >= 0:
        x0_last, t_last = history
        if t_last <= t:
            raise ValueError(f"history timestep t_last={t_last}: expected t_last > t={t}")
        return dpmpp_multistep_update(x, [x0_last, x0], [t_last, t], t_prev, schedule), x0
    return dpmpp_multistep_update(x, [x0], [t], t_prev, schedule), x0


def _unipc_coefficients(hh: float, rks: Sequence[float], order: int) -> tuple[Tensor, Tensor, float, float]:
    """``(R, b, h_phi_1, B_h)`` of UniPC's B(h) variant bh2 (Zhao et al. 2023, "UniPC", Alg. 2 / App. C),
    exactly as diffusers' ``UniPCMultistepScheduler`` builds them, in float64."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = math.expm1(hh)  # bh2
    factorial = 1
    r_rows, b = [], []
    r = torch.tensor([*rks, 1.0], dtype=torch.float64)
    for i in range(1, order + 1):
        r_rows.append(r ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return torch.stack(r_rows), torch.tensor(b, dtype=torch.float64), h_phi_1, b_h


def unipc_predictor(
    x: Tensor, x0s: Sequence[Tensor], ts: Sequence[int], t_next: int, schedule: NoiseSchedule, order: int
) -> Tensor:
    """UniP-``order`` (bh2, data prediction) from ``x`` at ``ts[-1]`` to ``t_next`` (``< 0``: the end, where the
    update is :math:`\\hat x_0`); ``x0s``/``ts`` most recent last (diffusers' ``multistep_uni_p_bh_update``)."""
    m0 = x0s[-1]
    if t_next < 0:
        if order != 1:
            raise ValueError("the final UniPC step is first order (lower_order_final)")
        return m0
    a_t, s_t, lam_t = _alpha_sigma_lambda(schedule, t_next)
    _, s_0, lam_0 = _alpha_sigma_lambda(schedule, ts[-1])
    h = lam_t - lam_0
    rks, d1s = [], []
    for i in range(1, order):
        rk = (_alpha_sigma_lambda(schedule, ts[-1 - i])[2] - lam_0) / h
        rks.append(rk)
        d1s.append((x0s[-1 - i] - m0) / rk)
    big_r, b, h_phi_1, b_h = _unipc_coefficients(-h, rks, order)
    out = (s_t / s_0) * x - (a_t * h_phi_1) * m0
    if d1s:
        rhos = [0.5] if order == 2 else torch.linalg.solve(big_r[:-1, :-1], b[:-1]).tolist()
        res = sum(rho * d for rho, d in zip(rhos, d1s))
        out = out - (a_t * b_h) * res
    return out


def unipc_corrector(
    x_pred: Tensor,
    model_x0: Tensor,
    last_x: Tensor,
    x0s: Sequence[Tensor],
    ts: Sequence[int],
    t: int,
    schedule: NoiseSchedule,
    order: int,
) -> Tensor:
    """UniC-``order`` (bh2): corrects the predicted ``x_pred`` at ``t`` using its data prediction ``model_x0``;
    ``last_x`` is the (corrected) sample at ``ts[-1]`` and ``x0s``/``ts`` the earlier data predictions, most
    recent last (diffusers' ``multistep_uni_c_bh_update``).  Costs no model call (UniPC's point)."""
    del x_pred  # the corrector replaces the predictor's sample; kept for the signature's clarity
    m0 = x0s[-1]
    a_t, s_t, lam_t = _alpha_sigma_lambda(schedule, t)
    _, s_0, lam_0 = _alpha_sigma_lambda(schedule, ts[-1])
    h = lam_t - lam_0
    rks, d1s = [], []
    for i in range(1, order):
        rk = (_alpha_sigma_lambda(schedule, ts[-1 - i])[2] - lam_0) / h
        rks.append(rk)
        d1s.append((x0s[-1 - i] - m0) / rk)
    big_r, b, h_phi_1, b_h = _unipc_coefficients(-h, rks, order)
    rhos = [0.5] if order == 1 else torch.linalg.solve(big_r, b).tolist()
    out = (s_t / s_0) * last_x - (a_t * h_phi_1) * m0
    res = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), start=rhos[-1] * (model_x0 - m0))
    return out - (a_t * b_h) * res


# --------------------------------------------------------------------------------------------------------------
# Chains
# --------------------------------------------------------------------------------------------------------------


class ChainSampler(Protocol):
    """A complete sampling chain as registered in :data:`SAMPLERS`."""

    def __call__(
        self,
        denoiser: Denoiser,
        x_T: Tensor,
        schedule: NoiseSchedule,
        timesteps: Sequence[int],
        *,
        eta: float,
        noise: Tensor | None,
        checkpointing: bool,
    ) -> Tensor: ...


def _call_denoiser(denoiser: Denoiser, x: Tensor, t: int) -> Tensor:
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    out = denoiser(x, t_batch)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"denoiser output {shape}: expected a tensor shaped like x {tuple(x.shape)}")
    return out.to(x.dtype)


def _run_step(fn: Callable[..., Any], checkpointing: bool, *args: Tensor | None) -> Any:
    """Run one sampler step, optionally under non-reentrant activation checkpointing."""
    if checkpointing:
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _ddim_model_step(
    x: Tensor,
    noise: Tensor | None,
    *,
    denoiser: Denoiser,
    t: int,
    t_prev: int,
    schedule: NoiseSchedule,
    eta: float,
) -> Tensor:
    return ddim_step(x, _call_denoiser(denoiser, x, t), t, t_prev, schedule, eta, noise)


def _step_pairs(timesteps: Sequence[int]) -> list[tuple[int, int]]:
    """``(t, t_prev)`` of each step of a descending chain; the last step goes to ``t_prev = -1`` (x_0)."""
    return list(zip(timesteps, [*timesteps[1:], -1]))


def sample_ddim(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int],
    *,
    eta: float = 0.0,
    noise: Tensor | None = None,
    checkpointing: bool = False,
) -> Tensor:
    """DDIM chain (Song et al. 2021, Eq. 12) over descending ``timesteps``; ``noise[i]`` is z of step i."""
    x = x_T
    for i, (t, t_prev) in enumerate(_step_pairs(timesteps)):
        fn = functools.partial(
            _ddim_model_step, denoiser=denoiser, t=t, t_prev=t_prev, schedule=schedule, eta=eta
        )
        x = _run_step(fn, checkpointing, x, None if noise is None else noise[i])
    return x


def multistep_order(i: int, T: int, solver_order: int) -> int:
    """Order of step ``i`` of a ``T``-step DPM-Solver++ chain as diffusers picks it (``lower_order_final=True``,
    ``final_sigmas_type="zero"``): warm-up ``min(order, i+1)``, the last step first order and, for T < 15, the
    second-to-last at most second order."""
    order = min(solver_order, i + 1)
    if i == T - 1:
        return 1
    if i == T - 2 and T < 15:
        return min(order, 2)
    return order


def _dpmpp_model_step(
    x: Tensor,
    *history: Tensor,
    denoiser: Denoiser,
    ts: tuple[int, ...],
    t_prev: int,
    order: int,
    schedule: NoiseSchedule,
) -> tuple[Tensor, Tensor]:
    t = ts[-1]
    x0 = data_prediction(_call_denoiser(denoiser, x, t), x, t, schedule)
    x0s = [*history[len(history) - (order - 1) :], x0] if order > 1 else [x0]
    return dpmpp_multistep_update(x, x0s, ts[len(ts) - order :], t_prev, schedule), x0


def _sample_dpmpp(
    solver_order: int,
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int],
    *,
    eta: float = 0.0,
    noise: Tensor | None = None,
    checkpointing: bool = False,
) -> Tensor:
    if eta != 0.0:
        raise ValueError(f"eta={eta!r}: dpmpp_{solver_order}m is deterministic, expected eta=0")
    del noise
    x = x_T
    x0s: list[Tensor] = []
    T = len(timesteps)
    for i, (_t, t_prev) in enumerate(_step_pairs(timesteps)):
        order = multistep_order(i, T, solver_order)
        fn = functools.partial(
            _dpmpp_model_step,
            denoiser=denoiser,
            ts=tuple(timesteps[: i + 1]),
            t_prev=t_prev,
            order=order,
            schedule=schedule,
        )
        x, x0 = _run_step(fn, checkpointing, x, *x0s[-(solver_order - 1) :] if solver_order > 1 else ())
        x0s = [*x0s, x0][-solver_order:]
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int],
    *,
    eta: float = 0.0,
    noise: Tensor | None = None,
    checkpointing: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) chain (Lu et al. 2022, Algorithm 2); deterministic, so ``eta`` must be 0."""
    return _sample_dpmpp(
        2, denoiser, x_T, schedule, timesteps, eta=eta, noise=noise, checkpointing=checkpointing
    )


def sample_dpmpp_3m(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int],
    *,
    eta: float = 0.0,
    noise: Tensor | None = None,
    checkpointing: bool = False,
) -> Tensor:
    """DPM-Solver++(3M) chain (diffusers' ``solver_order=3``); deterministic, so ``eta`` must be 0."""
    return _sample_dpmpp(
        3, denoiser, x_T, schedule, timesteps, eta=eta, noise=noise, checkpointing=checkpointing
    )


def _unipc_model_step(
    x: Tensor,
    last_x: Tensor | None,
    *history: Tensor,
    denoiser: Denoiser,
    ts: tuple[int, ...],
    t_next: int,
    order: int,
    prev_order: int,
    schedule: NoiseSchedule,
) -> tuple[Tensor, Tensor, Tensor]:
    t = ts[-1]
    x0 = data_prediction(_call_denoiser(denoiser, x, t), x, t, schedule)
    if last_x is not None:  # UniC on the model output of the predicted sample (no extra model call)
        x = unipc_corrector(x, x0, last_x, history, ts[:-1], t, schedule, prev_order)
    x0s = [*history, x0]
    x_next = unipc_predictor(x, x0s[len(x0s) - order :], ts[len(ts) - order :], t_next, schedule, order)
    return x_next, x0, x


def sample_unipc(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int],
    *,
    eta: float = 0.0,
    noise: Tensor | None = None,
    checkpointing: bool = False,
) -> Tensor:
    """UniPC chain (Zhao et al. 2023), variant bh2, order 2, as diffusers' ``UniPCMultistepScheduler`` defaults
    (``predict_x0=True``, ``lower_order_final=True``, ``final_sigmas_type="zero"``, corrector after every step
    but the last: the final step is a first-order predictor to :math:`\\hat x_0`).  Exactly T model calls."""
    if eta != 0.0:
        raise ValueError(f"eta={eta!r}: unipc is deterministic, expected eta=0")
    del noise
    solver_order = 2
    T = len(timesteps)
    x = x_T
    last_x: Tensor | None = None
    x0s: list[Tensor] = []
    prev_order = 1
    for i, (_t, t_next) in enumerate(_step_pairs(timesteps)):
        order = min(solver_order, T - i, i + 1)
        hist = x0s[-solver_order:]  # earlier data predictions, most recent last (aligned with ts[:-1])
        fn = functools.partial(
            _unipc_model_step,
            denoiser=denoiser,
            ts=tuple(timesteps[i - len(hist) : i + 1]),
            t_next=t_next,
            order=order,
            prev_order=prev_order,
            schedule=schedule,
        )
        x, x0, last_x = _run_step(fn, checkpointing, x, last_x, *hist)
        x0s = [*x0s, x0][-solver_order:]
        prev_order = order
    return x


SAMPLERS: dict[str, ChainSampler] = {
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "unipc": sample_unipc,
}
"""Registry of sampling chains by name."""


def _validate_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> list[int]:
    if isinstance(timesteps, (str, bytes)) or len(timesteps) == 0:
        raise ValueError(f"timesteps={timesteps!r}: expected a non-empty sequence of ints")
    out: list[int] = []
    for t in timesteps:
        try:
            ti = operator.index(t)
        except TypeError:
            raise ValueError(f"timestep {t!r}: expected an int") from None
        if not 0 <= ti < num_train_timesteps:
            raise ValueError(f"timestep {ti}: expected 0 <= t < num_train_timesteps={num_train_timesteps}")
        if out and ti >= out[-1]:
            raise ValueError(f"timesteps={list(timesteps)!r}: expected strictly descending values")
        out.append(ti)
    return out


def sample(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int],
    sampler: str = "ddim",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    checkpointing: bool = False,
    step_noise: Tensor | None = None,
) -> Tensor:
    """Run a few-step sampler from ``x_T`` with gradients (MMD-DDM, Aiello et al. 2023, Sec. 3).

    Makes exactly ``len(timesteps)`` denoiser calls in the forward pass (``checkpointing`` recomputes each once
    more during backward).  Per-step noise for ``eta > 0`` is ``step_noise`` (shape ``(T, *x_T.shape)``, from
    :mod:`mmdsweep.core.noise`, the one per-sample owner) or, for direct use, drawn up front from ``generator``,
    so checkpoint recomputation sees identical noise.  Computation runs in ``x_T.dtype``; schedule scalars come
    from the float64 ``alphas_cumprod``.  Gradients flow to ``x_T`` and to the denoiser's parameters;
    ``checkpointing=True`` wraps each step in non-reentrant ``torch.utils.checkpoint`` so the denoiser's
    activations are not kept for all T steps.  No final clamp here: see :func:`run_chain`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: expected one of {sorted(SAMPLERS)}")
    if not isinstance(x_T, Tensor) or not x_T.is_floating_point() or x_T.ndim < 1:
        raise ValueError(f"x_T={type(x_T).__name__}: expected a floating-point tensor with a batch dimension")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta!r}: expected 0 <= eta <= 1")
    if eta > 0.0 and sampler != "ddim":
        raise ValueError(
            f"eta={eta!r} with sampler={sampler!r}: stochastic sampling (eta > 0) needs sampler='ddim'"
        )
    steps = _validate_timesteps(timesteps, schedule.num_train_timesteps)
    noise: Tensor | None = None
    if eta > 0.0:
        if step_noise is not None:
            if tuple(step_noise.shape) != (len(steps), *x_T.shape):
                raise ValueError(
                    f"step_noise shape={tuple(step_noise.shape)}: expected {(len(steps), *x_T.shape)}"
                )
            noise = step_noise.to(device=x_T.device, dtype=x_T.dtype)
        else:
            device = generator.device if generator is not None else x_T.device
            noise = torch.randn(
                (len(steps), *x_T.shape), generator=generator, device=device, dtype=x_T.dtype
            ).to(x_T.device)
    return SAMPLERS[sampler](
        denoiser, x_T, schedule, steps, eta=eta, noise=noise, checkpointing=checkpointing
    )


# --------------------------------------------------------------------------------------------------------------
# The one chain: sampler, grid, clipping and final clamp from one place
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainSpec:
    """Everything that decides the images a model produces from given noise, resolved.

    Built once from the experiment (``sampler.*``) and the model's scheduler config (``clip_sample: null``
    takes the model's), saved in every checkpoint's ``state.json`` and in every export's ``mmdsweep.json``,
    and used by the training loss, the evaluator, ``mmdsweep.sample``, ``mmdsweep.evaluate`` and the export
    check (:func:`run_chain`).

    ``final_clamp`` clamps the chain's output x0 to [-1, 1] (what an image can hold).  Its gradient is the true
    gradient of the clamp: 1 inside (-1, 1), 0 outside, so pixels the clamp pins receive no gradient.  We chose
    this over a straight-through estimator because the MMD loss then differentiates exactly the function that
    is evaluated and exported; a pinned pixel's feature value does not change with a small move of the raw
    output, and a straight-through gradient would be biased there.
    """

    sampler: str = "ddim"
    timesteps: int = 5
    spacing: str = "leading"
    eta: float = 0.0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    final_clamp: bool = True
    grid: tuple[int, ...] | None = None  # explicit (e.g. learned, rounded) grid; overrides ``spacing``

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r}: expected one of {sorted(SAMPLERS)}")
        object.__setattr__(self, "spacing", normalize_spacing(self.spacing, self.sampler))
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta={self.eta!r}: expected 0 <= eta <= 1")
        if self.eta > 0 and self.sampler != "ddim":
            raise ValueError(f"eta={self.eta!r}: stochastic sampling (eta > 0) needs sampler='ddim'")
        if not self.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range={self.clip_sample_range!r}: expected > 0")
        if self.grid is not None:
            object.__setattr__(self, "grid", tuple(int(t) for t in self.grid))
            if len(self.grid) != self.timesteps:
                raise ValueError(f"grid {self.grid}: expected {self.timesteps} timesteps")

    @classmethod
    def resolve(
        cls,
        *,
        sampler: str,
        timesteps: int,
        spacing: str | None,
        eta: float,
        clip_sample: bool | None,
        clip_sample_range: float | None,
        final_clamp: bool,
        scheduler_config: Mapping[str, Any] | None = None,
        grid: Sequence[int] | None = None,
    ) -> ChainSpec:
        """Resolve the ``null`` choices: the spacing from the sampler, ``clip_sample``/``clip_sample_range``
        from the model's scheduler config (diffusers' default ``clip_sample`` is True)."""
        cfg = dict(scheduler_config or {})
        if clip_sample is None:
            clip_sample = _config_bool(cfg, "clip_sample", True)
        if clip_sample_range is None:
            clip_sample_range = _config_float(cfg, "clip_sample_range", 1.0)
        return cls(
            sampler=sampler,
            timesteps=int(timesteps),
            spacing=normalize_spacing(spacing, sampler),
            eta=float(eta),
            clip_sample=bool(clip_sample),
            clip_sample_range=float(clip_sample_range),
            final_clamp=bool(final_clamp),
            grid=None if grid is None else tuple(grid),
        )

    def schedule_for(self, schedule: NoiseSchedule) -> NoiseSchedule:
        """``schedule`` with this chain's clipping (the model's betas and prediction type are kept)."""
        import dataclasses

        return dataclasses.replace(
            schedule, clip_sample=self.clip_sample, clip_sample_range=self.clip_sample_range
        )

    def timestep_grid(self, num_train_timesteps: int) -> list[int]:
        if self.grid is not None:
            return _validate_timesteps(self.grid, num_train_timesteps)
        return select_timesteps(self.timesteps, num_train_timesteps, self.spacing, self.sampler)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        out = asdict(self)
        out["grid"] = None if self.grid is None else list(self.grid)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChainSpec:
        keys = {
            "sampler",
            "timesteps",
            "spacing",
            "eta",
            "clip_sample",
            "clip_sample_range",
            "final_clamp",
            "grid",
        }
        kw = {k: v for k, v in data.items() if k in keys}
        if kw.get("grid") is not None:
            kw["grid"] = tuple(kw["grid"])
        return cls(**kw)


def run_chain(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    chain: ChainSpec,
    *,
    step_noise: Tensor | None = None,
    checkpointing: bool = False,
) -> Tensor:
    """The one chain: ``chain``'s sampler on its grid with its clipping, then its final clamp.

    ``schedule`` is the model's schedule (its own ``clip_sample`` is replaced by the chain's).  Exactly T
    denoiser calls; gradients flow (see :class:`ChainSpec` for the clamp's gradient).
    """
    sched = chain.schedule_for(schedule)
    x = sample(
        denoiser,
        x_T,
        sched,
        chain.timestep_grid(schedule.num_train_timesteps),
        sampler=chain.sampler,
        eta=chain.eta,
        checkpointing=checkpointing,
        step_noise=step_noise,
    )
    return x.clamp(-1.0, 1.0) if chain.final_clamp else x


# Continuous timesteps (learned grids, issue 9): the schedule at real-valued t and a chain over a tensor grid
# --------------------------------------------------------------------------------------------------------------


def alpha_bar_at(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """:math:`\\bar\\alpha(t)` at real-valued ``t`` in ``[-1, N-1]``, differentiable in ``t`` (float64).

    Piecewise-linear interpolation of :math:`\\log\\bar\\alpha` between the integer training timesteps, with the
    clean end of the chain at ``t = -1`` (:math:`\\bar\\alpha_{-1}` = ``final_alpha_cumprod``, 1 for diffusers'
    ``set_alpha_to_one``): for :math:`t = k + f`, :math:`k = \\lfloor t \\rfloor`,

    :math:`\\log\\bar\\alpha(t) = (1-f)\\log\\bar\\alpha_k + f \\log\\bar\\alpha_{k+1}`, i.e.
    :math:`\\bar\\alpha(t) = \\bar\\alpha_k (1-\\beta_{k+1})^{f}`.

    This is the interpolation of the official DPM-Solver code for discrete-time models (Lu et al. 2022,
    ``NoiseScheduleVP(schedule='discrete')``: piecewise-linear :math:`\\log\\alpha_t`, i.e. half of
    :math:`\\log\\bar\\alpha`). It equals the discrete schedule at integers, is strictly monotone, keeps
    :math:`\\bar\\alpha \\in (0, 1]` and corresponds to a constant :math:`\\beta` inside each unit interval of
    the VP-SDE :math:`d\\log\\bar\\alpha/dt = -\\beta(t)` (Song et al. 2021, score SDE, Eq. 11 / App. B).
    """
    table = torch.cat(
        [
            torch.tensor([schedule.final_alpha_cumprod], dtype=torch.float64),
            schedule.alphas_cumprod,
        ]
    ).log()
    table = table.to(t.device)
    n = schedule.num_train_timesteps
    u = (t.to(torch.float64) + 1.0).clamp(0.0, float(n))
    k = u.detach().floor().clamp(max=n - 1).long()
    f = u - k.to(torch.float64)
    return (table[k] + f * (table[k + 1] - table[k])).exp()


def _predict_x0_eps_t(
    model_output: Tensor, x: Tensor, alpha_t: Tensor, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """:func:`predict_x0_eps` with a 0-dim tensor :math:`\\bar\\alpha_t` (so gradients reach it)."""
    sqrt_a, sqrt_1ma = alpha_t.sqrt(), (1.0 - alpha_t).sqrt()
    if prediction_type == "epsilon":
        return (x - sqrt_1ma * model_output) / sqrt_a, model_output
    if prediction_type == "sample":
        return model_output, (x - sqrt_a * model_output) / sqrt_1ma
    if prediction_type == "v_prediction":
        return sqrt_a * x - sqrt_1ma * model_output, sqrt_a * model_output + sqrt_1ma * x
    raise ValueError(f"prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")


def _ddim_step_t(
    x: Tensor,
    out: Tensor,
    a_t: Tensor,
    a_prev: Tensor | float,
    schedule: NoiseSchedule,
    eta: float,
    noise: Tensor | None,
) -> Tensor:
    """:func:`ddim_step` (Song et al. 2021, Eq. 12 and 16) with tensor :math:`\\bar\\alpha`; a float ``a_prev``
    is the constant end of the chain."""
    x0, eps = _predict_x0_eps_t(out, x, a_t, schedule.prediction_type)
    x0 = _clip_x0(x0, schedule)
    if isinstance(a_prev, float) and a_prev >= 1.0:
        return x0  # sqrt(1 - 1) = 0: the direction term and sigma vanish
    a_p = torch.as_tensor(a_prev, dtype=torch.float64)
    if eta > 0.0:
        sigma = eta * ((1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p)).sqrt()
        x_prev = a_p.sqrt() * x0 + (1.0 - a_p - sigma**2).clamp(min=0.0).sqrt() * eps
        if noise is None or noise.shape != x.shape:
            raise ValueError(f"eta={eta}: expected per-step noise shaped like x {tuple(x.shape)}")
        return x_prev + sigma * noise
    return a_p.sqrt() * x0 + (1.0 - a_p).sqrt() * eps


def _half_log_snr_t(a: Tensor) -> Tensor:
    return 0.5 * (a.log() - torch.log1p(-a))


def _dpmpp_2m_step_t(
    x: Tensor,
    out: Tensor,
    a_t: Tensor,
    a_prev: Tensor | float,
    schedule: NoiseSchedule,
    x0_last: Tensor | None,
    a_last: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """:func:`dpmpp_2m_step` (Lu et al. 2022, DPM-Solver++ Algorithm 2) with tensor :math:`\\bar\\alpha`."""
    x0, _ = _predict_x0_eps_t(out, x, a_t, schedule.prediction_type)
    x0 = _clip_x0(x0, schedule)
    if isinstance(a_prev, float) and a_prev >= 1.0:
        return x0, x0
    a_p = torch.as_tensor(a_prev, dtype=torch.float64)
    lam_t, lam_p = _half_log_snr_t(a_t), _half_log_snr_t(a_p)
    h = lam_p - lam_t
    coeff = -a_p.sqrt() * torch.expm1(-h)
    x_prev = ((1.0 - a_p).sqrt() / (1.0 - a_t).sqrt()) * x + coeff * x0
    if x0_last is not None and a_last is not None and not isinstance(a_prev, float):
        r = (lam_t - _half_log_snr_t(a_last)) / h
        x_prev = x_prev + (0.5 * coeff / r) * (x0 - x0_last)
    return x_prev, x0


def _continuous_step(
    x: Tensor,
    x0_last: Tensor | None,
    t: Tensor,
    a_t: Tensor,
    a_prev: Tensor | None,
    a_last: Tensor | None,
    noise: Tensor | None,
    *,
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    sampler: str,
    eta: float,
) -> tuple[Tensor, Tensor]:
    t_in = t.to(torch.float64 if x.dtype == torch.float64 else torch.float32).expand(x.shape[0])
    out = denoiser(x, t_in)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        raise ValueError(f"denoiser output: expected a tensor shaped like x {tuple(x.shape)}")
    out = out.to(x.dtype)
    prev: Tensor | float = float(schedule.final_alpha_cumprod) if a_prev is None else a_prev
    if sampler == "ddim":
        x_next = _ddim_step_t(x, out, a_t, prev, schedule, eta, noise)
        return x_next, x_next
    return _dpmpp_2m_step_t(x, out, a_t, prev, schedule, x0_last, a_last)


def sample_continuous(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    timesteps: Tensor,
    sampler: str = "ddim",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    checkpointing: bool = False,
) -> Tensor:
    """:func:`sample` over a real-valued, strictly descending grid ``timesteps`` (a 1-D tensor in ``[-1, N-1]``,
    e.g. the output of :class:`mmdsweep.core.timegrid.TimeGrid`), differentiable in the grid as well.

    The schedule is evaluated with :func:`alpha_bar_at` and the denoiser receives the real-valued ``t`` (diffusers'
    sinusoidal timestep embedding accepts fractional timesteps); the last step goes to the chain's clean end
    (``final_alpha_cumprod``), as in :func:`sample`. On an integer grid the result equals :func:`sample`'s for
    ``ddim`` and ``dpmpp_2m`` (same step equations, tensor instead of Python-float scalars).
    """
    if sampler not in ("ddim", "dpmpp_2m"):
        raise ValueError(f"sampler={sampler!r}: learned grids support 'ddim' and 'dpmpp_2m'")
    if not 0.0 <= eta <= 1.0 or (eta > 0.0 and sampler != "ddim"):
        raise ValueError(f"eta={eta!r}: expected 0 <= eta <= 1, and eta = 0 unless sampler='ddim'")
    if not isinstance(timesteps, Tensor) or timesteps.ndim != 1 or timesteps.numel() < 1:
        raise ValueError("timesteps: expected a non-empty 1-D tensor")
    tt = timesteps.detach()
    n = schedule.num_train_timesteps
    if bool((tt[1:] >= tt[:-1]).any()) or float(tt.min()) < -1.0 or float(tt.max()) > n - 1:
        raise ValueError(f"timesteps={tt.tolist()}: expected strictly descending values in [-1, {n - 1}]")
    a = alpha_bar_at(schedule, timesteps)
    T = int(timesteps.numel())
    noise: Tensor | None = None
    if eta > 0.0:
        device = generator.device if generator is not None else x_T.device
        noise = torch.randn((T, *x_T.shape), generator=generator, device=device, dtype=x_T.dtype).to(
            x_T.device
        )
    fn = functools.partial(_continuous_step, denoiser=denoiser, schedule=schedule, sampler=sampler, eta=eta)
    x, x0_last = x_T, None
    for i in range(T):
        args = (
            x,
            x0_last,
            timesteps[i],
            a[i],
            a[i + 1] if i + 1 < T else None,
            a[i - 1] if i > 0 else None,
            None if noise is None else noise[i],
        )
        x, x0_last = _run_step(fn, checkpointing, *args)
    return x
