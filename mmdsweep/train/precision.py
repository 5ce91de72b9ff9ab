"""Mixed precision at the boundary of the UNet (``finetune.precision: fp32 | bf16 | fp16``).

Only the denoiser's forward runs under ``torch.autocast``; its output is cast back to float32 at
once, so the sampler arithmetic (schedule scalars, the DDIM / DPM-Solver++ updates), the feature
map and the MMD stay in float32 (nanoGPT's ``ptdtype`` idea: the dtype string is mapped here, once).
The parameters, their gradients and the optimizer state stay float32 (autocast casts weights per op).

fp16 has 5 exponent bits: small gradients flush to zero, so its backward is loss-scaled
(:class:`LossScaler`, the dynamic scheme of ``torch.amp.GradScaler``: multiply the seed gradient by
S, divide the parameter gradients by S, skip the step and halve S when they are not finite,
double S after ``growth_interval`` finite steps). bf16 has float32's exponent range and needs none.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator

import torch

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a ``finetune.precision`` value (None for fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {sorted(PRECISIONS)}")
    return None if precision == "fp32" else PRECISIONS[precision]


def check_supported(precision: str, device: torch.device | str) -> str | None:
    """None when ``precision`` runs on ``device``; else a one-line reason (for validation/--dry-run)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return None
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None  # judged on the worker that has the GPU
        if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return f"finetune.precision: bf16 is not supported by {torch.cuda.get_device_name(dev)}; use fp16 or fp32"
        return None
    try:
        with torch.autocast(dev.type, dtype=dtype):
            y = torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2))
        if y.dtype != dtype:
            return f"finetune.precision: {precision} autocast is not applied on {dev.type} by this torch"
    except RuntimeError as e:  # e.g. an older torch without CPU fp16 autocast
        return f"finetune.precision: {precision} is not supported on {dev.type} ({str(e).splitlines()[0]})"
    return None


@contextlib.contextmanager
def unet_autocast(precision: str, device: torch.device) -> Iterator[None]:
    """``torch.autocast`` for the UNet's forward (a no-op for fp32)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


def wrap_denoiser(
    eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], precision: str, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``eps`` with its forward under autocast and its output back in the input's dtype (float32)."""
    if autocast_dtype(precision) is None:
        return eps

    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with unet_autocast(precision, device):
            out = eps(x, t)
        return out.to(x.dtype)

    return f


class LossScaler:
    """Dynamic loss scaling for fp16 (identity, scale 1, for fp32/bf16).

    Use: ``seed_grad * scaler.scale`` in the backward, then :meth:`unscale_and_check` on the
    parameters' gradients (after any all-reduce) before clipping; when it returns False the step
    is skipped (gradients overflowed) and the scale was halved.
    """

    def __init__(
        self,
        precision: str,
        *,
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
        min_scale: float = 1.0,
    ) -> None:
        self.enabled = precision == "fp16"
        self.scale = float(init_scale) if self.enabled else 1.0
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self._good_steps = 0
        self.skipped = 0

    def unscale_and_check(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Divide gradients by the scale; False (and the scale halved) if any is not finite."""
        if not self.enabled:
            return True
        grads = [p.grad for p in params if p.grad is not None]
        finite = True
        for g in grads:
            g.div_(self.scale)
            if finite and not bool(torch.isfinite(g).all()):
                finite = False
        if not finite:
            self.scale = max(self.scale / 2.0, self.min_scale)
            self._good_steps = 0
            self.skipped += 1
            return False
        self._good_steps += 1
        if self._good_steps % self.growth_interval == 0 and math.isfinite(self.scale * 2.0):
            self.scale *= 2.0
        return True

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "good_steps": self._good_steps, "skipped": self.skipped}

    def load_state_dict(self, d: dict[str, float | int]) -> None:
        self.scale = float(d.get("scale", self.scale))
        self._good_steps = int(d.get("good_steps", 0))
        self.skipped = int(d.get("skipped", 0))
