"""Kernels and the unbiased MMD^2 estimator used as the MMD-DDM fine-tuning loss.

All functions are small, pure and differentiable (torch only).  A kernel is a
callable ``k(x, y) -> Tensor`` mapping features ``x`` of shape ``(n, d)`` and
``y`` of shape ``(m, d)`` to the Gram matrix ``K[i, j] = k(x_i, y_j)`` of shape
``(n, m)``.

References
----------
* Gretton, Borgwardt, Rasch, Schoelkopf, Smola (2012), "A Kernel Two-Sample
  Test", JMLR 13: unbiased MMD^2 estimator, eq. (3) / Lemma 6; the median
  heuristic for the Gaussian bandwidth (Sec. 8).
* Binkowski, Sutherland, Arbel, Gretton (2018), "Demystifying MMD GANs",
  ICLR: Kernel Inception Distance (KID) = unbiased MMD^2 with the cubic
  polynomial kernel ``k(x, y) = (x.y / d + 1)^3`` (Sec. 4).
* Tolstikhin, Bousquet, Gelly, Schoelkopf (2018), "Wasserstein
  Auto-Encoders", ICLR: inverse multiquadric kernel ``C / (C + ||x - y||^2)``
  (Sec. 4).
* Aiello et al. (2023), "Fast Inference in Denoising Diffusion Models via
  MMD Finetuning" (MMD-DDM, arXiv 2301.07969): MMD^2 with the KID kernel on
  frozen features as the fine-tuning objective.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "KERNEL_TYPES",
    "BANDWIDTH_MODES",
    "BandwidthMode",
    "Kernel",
    "KernelSpec",
    "KernelType",
    "imq_kernel",
    "make_kernel",
    "median_pairwise_distance",
    "mmd2_unbiased",
    "polynomial_kernel",
    "rbf_kernel",
    "rbf_mixture_kernel",
    "squared_distances",
]

Kernel = Callable[[Tensor, Tensor], Tensor]
KernelType = Literal["polynomial", "rbf", "rbf_mixture", "imq"]
BandwidthMode = Literal["absolute", "median"]

KERNEL_TYPES: tuple[str, ...] = ("polynomial", "rbf", "rbf_mixture", "imq")
BANDWIDTH_MODES: tuple[str, ...] = ("absolute", "median")


def _check_pair(x: Tensor, y: Tensor, name: str = "features") -> None:
    """Raise ValueError unless ``x`` and ``y`` are 2-D float tensors with one feature dim."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError(f"{name}: expected torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(
            f"{name}: expected 2-D tensors (n, d) and (m, d), got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{name}: feature dims differ, got {x.shape[1]} and {y.shape[1]}")
    if not x.is_floating_point() or not y.is_floating_point():
        raise ValueError(f"{name}: expected floating-point tensors, got {x.dtype} and {y.dtype}")


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances ``D[i, j] = ||x_i - y_j||^2``, shape ``(n, m)``.

    Uses ``||x||^2 + ||y||^2 - 2 x.y`` after subtracting the (detached) mean of the
    pooled set, which is exact in real arithmetic (distances are translation
    invariant) and reduces cancellation when the features share a large offset.
    Round-off can still make the expansion slightly negative; it is clamped at 0.
    """
    centre = torch.cat([x, y], dim=0).mean(dim=0, keepdim=True).detach()
    xc = x - centre
    yc = y - centre
    x2 = (xc * xc).sum(dim=1, keepdim=True)
    y2 = (yc * yc).sum(dim=1, keepdim=True)
    return (x2 + y2.T - 2.0 * (xc @ yc.T)).clamp_min(0.0)


def polynomial_kernel(
    x: Tensor, y: Tensor, degree: int = 3, gamma: float | None = None, coef0: float = 1.0
) -> Tensor:
    """Polynomial kernel ``k(x, y) = (gamma * x.y + coef0)^degree``.

    ``gamma=None`` means ``1/d``; with the defaults this is the cubic KID kernel
    ``(x.y / d + 1)^3`` of Binkowski et al. (2018), Sec. 4, which MMD-DDM uses.
    """
    g = 1.0 / x.shape[1] if gamma is None else gamma
    return (g * (x @ y.T) + coef0) ** degree


def rbf_kernel(x: Tensor, y: Tensor, bandwidth: float | Tensor) -> Tensor:
    """Gaussian (RBF) kernel ``k(x, y) = exp(-||x - y||^2 / (2 * bandwidth^2))``."""
    return torch.exp(-squared_distances(x, y) / (2.0 * bandwidth**2))


def rbf_mixture_kernel(x: Tensor, y: Tensor, bandwidths: Sequence[float] | Tensor) -> Tensor:
    """Sum of Gaussian kernels ``sum_s exp(-||x - y||^2 / (2 * s^2))`` over ``s`` in ``bandwidths``.

    A sum of characteristic kernels is characteristic (mixture of RBFs as in
    Li et al. 2015, "Generative Moment Matching Networks"); the squared
    distances are computed once and shared by all bandwidths.
    """
    d2 = squared_distances(x, y)
    out = torch.zeros_like(d2)
    for s in bandwidths:
        out = out + torch.exp(-d2 / (2.0 * s**2))
    return out


def imq_kernel(x: Tensor, y: Tensor, c: float | Tensor, beta: float = 1.0) -> Tensor:
    """Inverse multiquadric kernel ``k(x, y) = (c^2 / (c^2 + ||x - y||^2))^beta``.

    With ``beta = 1`` this is the IMQ kernel ``C / (C + ||x - y||^2)`` (``C = c^2``)
    of Tolstikhin et al. (2018), Sec. 4; ``beta = 1/2`` is the classical inverse
    multiquadric ``(c^2 + r^2)^(-1/2)`` normalised to ``k(x, x) = 1``.  It is
    positive definite for every ``beta > 0`` and has heavier tails than the RBF.
    """
    c2 = c**2
    return (c2 / (c2 + squared_distances(x, y))) ** beta


def median_pairwise_distance(x: Tensor, y: Tensor) -> Tensor:
    """Median Euclidean distance over distinct pairs of the pooled set ``x ∪ y`` (detached).

    This is the median heuristic of Gretton et al. (2012), Sec. 8.  For an even
    number of pairs the two middle values are averaged (as ``numpy.median``).
    Returns a 0-d tensor with the dtype of the inputs.
    """
    _check_pair(x, y)
    z = torch.cat([x, y], dim=0).detach()
    if z.shape[0] < 2:
        raise ValueError(f"median_pairwise_distance: need >= 2 pooled points, got {z.shape[0]}")
    d2 = squared_distances(z, z)
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
    dist = d2[iu[0], iu[1]].sqrt()
    count = dist.numel()
    lo = torch.kthvalue(dist, (count - 1) // 2 + 1).values
    hi = torch.kthvalue(dist, count // 2 + 1).values
    return 0.5 * (lo + hi)


def _positive(name: str, value: Any) -> float:
    """Return ``value`` as float or raise if it is not a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"kernel.{name}: must be a number > 0, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"kernel.{name}: must be > 0, got {value!r}")
    return float(value)


@dataclass
class KernelSpec:
    """Configuration of the MMD kernel, validated on construction.

    Attributes
    ----------
    type: ``"polynomial"`` | ``"rbf"`` | ``"rbf_mixture"`` | ``"imq"``.
    degree, gamma, coef0: polynomial kernel ``(gamma x.y + coef0)^degree``;
        ``gamma=None`` means ``1/d`` (defaults = KID's cubic kernel).
    bandwidth: RBF bandwidth (sigma).
    bandwidths: bandwidths summed by the RBF mixture.
    imq_c, imq_beta: IMQ scale ``c`` and exponent ``beta``.
    bandwidth_mode: ``"absolute"``: ``bandwidth``, ``bandwidths`` and ``imq_c`` are
        used as given; ``"median"``: they are multiples of the median pairwise
        distance of the pooled features (median heuristic), recomputed for every
        call of :func:`mmd2_unbiased` and treated as a constant for gradients.
        Ignored by the polynomial kernel.
    """

    # the defaults are those of the experiment's ``kernel:`` section (mmdsweep.config.KernelConfig);
    # tests/test_architecture.py checks that they agree
    type: KernelType = "polynomial"
    degree: int = 3
    gamma: float | None = None
    coef0: float = 1.0
    bandwidth: float = 1.0
    bandwidth_mode: BandwidthMode = "median"
    bandwidths: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    imq_c: float = 1.0
    imq_beta: float = 1.0

    @classmethod
    def from_config(cls, cfg: Any) -> KernelSpec:
        """The one conversion from a configuration's ``kernel:`` section (any object with the
        attributes): every field of :class:`KernelSpec` it has is copied, the rest keep their
        defaults. ``float64`` is not a kernel property but an argument of :func:`mmd2_unbiased`."""
        names = [f.name for f in fields(cls)]
        values = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
        if "bandwidths" in values:
            values["bandwidths"] = list(values["bandwidths"])
        return cls(**values)

    def __post_init__(self) -> None:
        if self.type not in KERNEL_TYPES:
            raise ValueError(f"kernel.type: must be one of {list(KERNEL_TYPES)}, got {self.type!r}")
        if self.bandwidth_mode not in BANDWIDTH_MODES:
            raise ValueError(
                f"kernel.bandwidth_mode: must be one of {list(BANDWIDTH_MODES)}, got {self.bandwidth_mode!r}"
            )
        if isinstance(self.degree, bool) or not isinstance(self.degree, numbers.Integral) or self.degree < 1:
            raise ValueError(f"kernel.degree: must be an integer >= 1, got {self.degree!r}")
        self.degree = int(self.degree)
        if self.gamma is not None:
            self.gamma = _positive("gamma", self.gamma)
        if (
            isinstance(self.coef0, bool)
            or not isinstance(self.coef0, numbers.Real)
            or not math.isfinite(self.coef0)
            or self.coef0 < 0
        ):
            raise ValueError(f"kernel.coef0: must be >= 0 (else the kernel is not PSD), got {self.coef0!r}")
        self.coef0 = float(self.coef0)
        self.bandwidth = _positive("bandwidth", self.bandwidth)
        if isinstance(self.bandwidths, (str, bytes)) or not isinstance(self.bandwidths, Sequence):
            raise ValueError(
                f"kernel.bandwidths: must be a non-empty list of numbers > 0, got {self.bandwidths!r}"
            )
        if len(self.bandwidths) == 0:
            raise ValueError("kernel.bandwidths: must be a non-empty list of numbers > 0, got []")
        self.bandwidths = [_positive(f"bandwidths[{i}]", b) for i, b in enumerate(self.bandwidths)]
        self.imq_c = _positive("imq_c", self.imq_c)
        self.imq_beta = _positive("imq_beta", self.imq_beta)


def make_kernel(spec: KernelSpec, x: Tensor, y: Tensor) -> tuple[Kernel, dict[str, Any]]:
    """Resolve ``spec`` for the samples ``x``, ``y`` into a kernel callable.

    Median-relative scales are turned into absolute ones here (median of the
    pooled pairwise distances of ``x`` and ``y``).  Returns the kernel and a dict
    of the effective parameters as Python floats.
    """
    info: dict[str, Any] = {"kernel": spec.type}
    if spec.type == "polynomial":
        gamma = 1.0 / x.shape[1] if spec.gamma is None else spec.gamma
        degree, coef0 = spec.degree, spec.coef0
        info.update(degree=degree, gamma=gamma, coef0=coef0)
        return (lambda a, b: polynomial_kernel(a, b, degree=degree, gamma=gamma, coef0=coef0)), info

    scale: float = 1.0
    if spec.bandwidth_mode == "median":
        median = float(median_pairwise_distance(x, y))
        if not median > 0:
            raise ValueError(
                f"kernel.bandwidth_mode: 'median' needs distinct points, got median pairwise distance {median}"
            )
        scale = median
        info["median_distance"] = median

    if spec.type == "rbf":
        bw = spec.bandwidth * scale
        info["bandwidth"] = bw
        return (lambda a, b: rbf_kernel(a, b, bw)), info
    if spec.type == "rbf_mixture":
        bws = [b * scale for b in spec.bandwidths]
        info["bandwidths"] = bws
        return (lambda a, b: rbf_mixture_kernel(a, b, bws)), info
    c = spec.imq_c * scale
    beta = spec.imq_beta
    info.update(imq_c=c, imq_beta=beta)
    return (lambda a, b: imq_kernel(a, b, c, beta)), info


def _offdiag_mean(k: Tensor) -> Tensor:
    """Mean of the off-diagonal entries of a square matrix: ``sum_{i != j} K_ij / (n (n - 1))``."""
    n = k.shape[0]
    return (k.sum() - k.diagonal().sum()) / (n * (n - 1))


def mmd2_unbiased(
    x: Tensor, y: Tensor, kernel: KernelSpec | None = None, float64: bool = True
) -> tuple[Tensor, dict[str, Any]]:
    """Unbiased estimate of MMD^2 between the samples ``x`` (n, d) and ``y`` (m, d).

    Gretton et al. (2012), eq. (3) / Lemma 6::

        MMD_u^2 = 1/(n(n-1)) sum_{i != j} k(x_i, x_j) + 1/(m(m-1)) sum_{i != j} k(y_i, y_j)
                  - 2/(nm) sum_{i, j} k(x_i, y_j)

    With the default kernel (cubic polynomial) and ``n == m`` this is exactly one
    subset of KID (Binkowski et al. 2018).  The estimate can be negative.

    Differentiable w.r.t. ``x`` and ``y``.  If ``float64`` the Gram matrices are
    computed in float64 (half/bfloat16 inputs are otherwise computed in float32);
    the result has the promoted dtype of the inputs.  Returns ``(mmd2, info)``
    where ``info`` holds the effective kernel parameters (e.g. the absolute
    ``bandwidth`` after the median heuristic) and the three terms as floats.
    """
    spec = KernelSpec() if kernel is None else kernel
    if not isinstance(spec, KernelSpec):
        raise ValueError(f"kernel: expected a KernelSpec, got {type(spec).__name__}")
    _check_pair(x, y, "mmd2_unbiased")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd2_unbiased: need >= 2 samples in each set, got n={n} and m={m}")
    out_dtype = torch.promote_types(x.dtype, y.dtype)
    compute_dtype = torch.float64 if float64 else torch.promote_types(out_dtype, torch.float32)
    xc = x.to(compute_dtype)
    yc = y.to(compute_dtype)

    k, info = make_kernel(spec, xc, yc)
    kxx = _offdiag_mean(k(xc, xc))
    kyy = _offdiag_mean(k(yc, yc))
    kxy = k(xc, yc).mean()
    mmd2 = kxx + kyy - 2.0 * kxy
    terms = torch.stack([kxx, kyy, kxy]).detach().tolist()  # one device sync
    info.update(
        n=n, m=m, dtype=str(compute_dtype).removeprefix("torch."), kxx=terms[0], kyy=terms[1], kxy=terms[2]
    )
    return mmd2.to(out_dtype), info
