"""Tests for mmdsweep.core.mmd: kernels, median heuristic and the unbiased MMD^2 estimator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from mmdsweep.core.mmd import (
    KernelSpec,
    KernelType,
    imq_kernel,
    median_pairwise_distance,
    mmd2_unbiased,
    polynomial_kernel,
    rbf_kernel,
    rbf_mixture_kernel,
    squared_distances,
)

pytestmark = pytest.mark.threads  # scripts/test.sh runs these with 1 and 2 torch threads


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _sqdist_loop(a: list[float], b: list[float]) -> float:
    return sum((p - q) ** 2 for p, q in zip(a, b, strict=True))


# Brute-force reference kernels on python lists (one pair at a time).
def _poly_ref(a: list[float], b: list[float], degree: int, gamma: float | None, coef0: float) -> float:
    g = 1.0 / len(a) if gamma is None else gamma
    return (g * sum(p * q for p, q in zip(a, b, strict=True)) + coef0) ** degree


def _rbf_ref(a: list[float], b: list[float], bw: float) -> float:
    return math.exp(-_sqdist_loop(a, b) / (2 * bw**2))


def _mix_ref(a: list[float], b: list[float], bws: list[float]) -> float:
    return sum(_rbf_ref(a, b, s) for s in bws)


def _imq_ref(a: list[float], b: list[float], c: float, beta: float) -> float:
    return (c**2 / (c**2 + _sqdist_loop(a, b))) ** beta


KERNEL_CASES = [
    ("poly_default", lambda x, y: polynomial_kernel(x, y), lambda a, b: _poly_ref(a, b, 3, None, 1.0)),
    (
        "poly_custom",
        lambda x, y: polynomial_kernel(x, y, degree=2, gamma=0.7, coef0=0.5),
        lambda a, b: _poly_ref(a, b, 2, 0.7, 0.5),
    ),
    ("rbf", lambda x, y: rbf_kernel(x, y, 1.3), lambda a, b: _rbf_ref(a, b, 1.3)),
    (
        "rbf_mixture",
        lambda x, y: rbf_mixture_kernel(x, y, [0.5, 1.0, 4.0]),
        lambda a, b: _mix_ref(a, b, [0.5, 1.0, 4.0]),
    ),
    ("imq", lambda x, y: imq_kernel(x, y, 0.8), lambda a, b: _imq_ref(a, b, 0.8, 1.0)),
    ("imq_half", lambda x, y: imq_kernel(x, y, 2.0, beta=0.5), lambda a, b: _imq_ref(a, b, 2.0, 0.5)),
]

SPECS = {
    "polynomial": KernelSpec(),
    "rbf": KernelSpec(type="rbf", bandwidth=1.5, bandwidth_mode="absolute"),
    "rbf_mixture": KernelSpec(type="rbf_mixture", bandwidths=[0.7, 2.0], bandwidth_mode="absolute"),
    "imq": KernelSpec(type="imq", imq_c=1.2, bandwidth_mode="absolute"),
}


@pytest.mark.parametrize(("name", "kernel", "ref"), KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_kernel_matches_brute_force_loop(name, kernel, ref) -> None:
    x, y = _randn(5, 3, seed=1), _randn(4, 3, seed=2)
    gram = kernel(x, y)
    assert gram.shape == (5, 4)
    expected = [[ref(a, b) for b in y.tolist()] for a in x.tolist()]
    torch.testing.assert_close(gram, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("name", "kernel", "ref"), KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_kernel_gram_is_symmetric_psd(name, kernel, ref) -> None:
    z = _randn(12, 4, seed=3)
    gram = kernel(z, z)
    torch.testing.assert_close(gram, gram.T, rtol=1e-12, atol=1e-12)
    eig = torch.linalg.eigvalsh(gram)
    assert eig.min() >= -1e-9 * eig.abs().max()


def test_default_polynomial_is_kid_cubic_kernel() -> None:
    x, y = _randn(6, 8, seed=4), _randn(7, 8, seed=5)
    torch.testing.assert_close(polynomial_kernel(x, y), (x @ y.T / 8 + 1) ** 3)


def test_squared_distances_clamped_and_stable_under_offset() -> None:
    x = _randn(6, 5, seed=6)
    d2 = squared_distances(x, x)
    assert (d2 >= 0).all()
    assert d2.diagonal().abs().max() < 1e-12
    # A large common offset would wreck the naive expansion in float32; centring keeps it accurate.
    offset = 1e4
    xo = (x + offset).float()
    expected = torch.cdist(x, x) ** 2
    torch.testing.assert_close(squared_distances(xo, xo).double(), expected, rtol=1e-3, atol=1e-3)


def test_median_pairwise_distance_matches_numpy() -> None:
    x = _randn(7, 3, seed=7, dtype=torch.float32).requires_grad_(True)
    y = _randn(6, 3, seed=8, dtype=torch.float32)
    z = torch.cat([x, y]).detach().double().numpy()
    dists = [np.linalg.norm(z[i] - z[j]) for i in range(len(z)) for j in range(i + 1, len(z))]
    assert len(dists) % 2 == 0  # 78 pairs: checks the averaging of the two middle values
    med = median_pairwise_distance(x, y)
    assert not med.requires_grad
    assert med.dim() == 0
    assert float(med) == pytest.approx(float(np.median(dists)), rel=1e-6)


@pytest.mark.parametrize("kind", ["rbf", "rbf_mixture", "imq"])
def test_median_mode_reports_effective_bandwidth(kind: KernelType) -> None:
    x, y = _randn(10, 4, seed=9), _randn(12, 4, seed=10) + 0.5
    med = float(median_pairwise_distance(x, y))
    rel = KernelSpec(type=kind, bandwidth_mode="median", bandwidth=0.5, bandwidths=[0.25, 2.0], imq_c=3.0)
    value, info = mmd2_unbiased(x, y, rel)
    assert info["median_distance"] == pytest.approx(med, rel=1e-12)
    if kind == "rbf":
        assert info["bandwidth"] == pytest.approx(0.5 * med, rel=1e-12)
        absolute = KernelSpec(type="rbf", bandwidth=info["bandwidth"], bandwidth_mode="absolute")
    elif kind == "rbf_mixture":
        assert info["bandwidths"] == pytest.approx([0.25 * med, 2.0 * med], rel=1e-12)
        absolute = KernelSpec(type="rbf_mixture", bandwidths=info["bandwidths"], bandwidth_mode="absolute")
    else:
        assert info["imq_c"] == pytest.approx(3.0 * med, rel=1e-12)
        absolute = KernelSpec(type="imq", imq_c=info["imq_c"], bandwidth_mode="absolute")
    value_abs, info_abs = mmd2_unbiased(x, y, absolute)
    assert "median_distance" not in info_abs
    torch.testing.assert_close(value, value_abs, rtol=1e-12, atol=1e-14)


def _mmd2_loop(x: Tensor, y: Tensor, k) -> float:
    xs, ys = x.tolist(), y.tolist()
    n, m = len(xs), len(ys)
    sxx = sum(k(xs[i], xs[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    syy = sum(k(ys[i], ys[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sxy = sum(k(a, b) for a in xs for b in ys) / (n * m)
    return sxx + syy - 2 * sxy


@pytest.mark.parametrize("kind", list(SPECS))
def test_mmd2_matches_gretton_eq3_loop(kind: str) -> None:
    x, y = _randn(6, 3, seed=11), _randn(9, 3, seed=12) * 1.5
    spec = SPECS[kind]
    refs = {
        "polynomial": lambda a, b: _poly_ref(a, b, 3, None, 1.0),
        "rbf": lambda a, b: _rbf_ref(a, b, 1.5),
        "rbf_mixture": lambda a, b: _mix_ref(a, b, [0.7, 2.0]),
        "imq": lambda a, b: _imq_ref(a, b, 1.2, 1.0),
    }
    value, info = mmd2_unbiased(x, y, spec)
    assert value.dim() == 0
    assert float(value) == pytest.approx(_mmd2_loop(x, y, refs[kind]), rel=1e-10, abs=1e-12)
    assert info["kernel"] == kind and info["n"] == 6 and info["m"] == 9
    assert info["kxx"] + info["kyy"] - 2 * info["kxy"] == pytest.approx(float(value), abs=1e-12)


def test_mmd2_is_unbiased_for_equal_distributions_and_positive_for_shift() -> None:
    draws, n, d = 400, 16, 4
    g = torch.Generator().manual_seed(123)
    same, shifted, biased = [], [], []
    for _ in range(draws):
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = torch.randn(n, d, generator=g, dtype=torch.float64)
        same.append(float(mmd2_unbiased(x, y)[0]))
        shifted.append(float(mmd2_unbiased(x, y + 0.5)[0]))
        k = polynomial_kernel
        biased.append(float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()))
    same_t, shifted_t, biased_t = torch.tensor(same), torch.tensor(shifted), torch.tensor(biased)
    sem = float(same_t.std() / math.sqrt(draws))
    assert abs(float(same_t.mean())) < 4 * sem
    # The test has power: the biased V-statistic is clearly positive on the same draws.
    assert float(biased_t.mean()) > 10 * sem
    assert float(shifted_t.mean()) > 10 * float(shifted_t.std() / math.sqrt(draws))
    assert float(shifted_t.mean()) > 5 * abs(float(same_t.mean()))


@pytest.mark.parametrize("kind", list(SPECS))
def test_float64_and_float32_agree_and_keep_input_dtype(kind: str) -> None:
    x = _randn(64, 16, seed=13, dtype=torch.float32)
    y = _randn(64, 16, seed=14, dtype=torch.float32) + 0.3
    v64, info64 = mmd2_unbiased(x, y, SPECS[kind], float64=True)
    v32, info32 = mmd2_unbiased(x, y, SPECS[kind], float64=False)
    assert v64.dtype == torch.float32 and v32.dtype == torch.float32
    assert info64["dtype"] == "float64" and info32["dtype"] == "float32"
    assert float(v64) > 0
    assert float(v32) == pytest.approx(float(v64), rel=1e-3, abs=1e-5)


def test_low_precision_inputs_return_their_dtype() -> None:
    x = _randn(8, 4, seed=15, dtype=torch.bfloat16)
    y = _randn(8, 4, seed=16, dtype=torch.bfloat16)
    value, info = mmd2_unbiased(x, y, float64=False)
    assert value.dtype == torch.bfloat16
    assert info["dtype"] == "float32"


@pytest.mark.parametrize("kind", list(SPECS))
def test_gradcheck(kind: str) -> None:
    x = _randn(5, 3, seed=17).requires_grad_(True)
    y = _randn(4, 3, seed=18).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: mmd2_unbiased(a, b, SPECS[kind])[0], (x, y))


def test_gradients_flow_to_float32_generator_output() -> None:
    x = _randn(8, 5, seed=19, dtype=torch.float32).requires_grad_(True)
    y = _randn(8, 5, seed=20, dtype=torch.float32) + 1.0
    value, _ = mmd2_unbiased(x, y, KernelSpec(type="rbf", bandwidth_mode="median"))
    value.backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # One small step against the gradient lowers the MMD.
    with torch.no_grad():
        lower, _ = mmd2_unbiased(x - 0.05 * x.grad, y, KernelSpec(type="rbf", bandwidth_mode="median"))
    assert float(lower) < float(value.detach())


def test_median_mode_gradient_treats_bandwidth_as_constant() -> None:
    x = _randn(6, 3, seed=21).requires_grad_(True)
    y = _randn(7, 3, seed=22)
    v_med, info = mmd2_unbiased(x, y, KernelSpec(type="rbf", bandwidth_mode="median"))
    (g_med,) = torch.autograd.grad(v_med, x)
    v_abs, _ = mmd2_unbiased(
        x, y, KernelSpec(type="rbf", bandwidth=info["bandwidth"], bandwidth_mode="absolute")
    )
    (g_abs,) = torch.autograd.grad(v_abs, x)
    torch.testing.assert_close(g_med, g_abs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"type": "rbf", "bandwidth": 0.0}, r"kernel\.bandwidth: must be > 0, got 0\.0"),
        ({"bandwidth": -1.0}, r"kernel\.bandwidth: must be > 0, got -1\.0"),
        ({"bandwidth": float("nan")}, r"kernel\.bandwidth: must be > 0, got nan"),
        ({"type": "gaussian"}, r"kernel\.type: must be one of .*got 'gaussian'"),
        ({"bandwidth_mode": "mean"}, r"kernel\.bandwidth_mode: must be one of .*got 'mean'"),
        ({"bandwidths": []}, r"kernel\.bandwidths: must be a non-empty list"),
        ({"bandwidths": [1.0, -2.0]}, r"kernel\.bandwidths\[1\]: must be > 0, got -2\.0"),
        ({"degree": 0}, r"kernel\.degree: must be an integer >= 1, got 0"),
        ({"degree": 2.5}, r"kernel\.degree: must be an integer >= 1, got 2\.5"),
        ({"gamma": 0}, r"kernel\.gamma: must be > 0, got 0"),
        ({"coef0": -1.0}, r"kernel\.coef0: must be >= 0"),
        ({"imq_c": 0.0}, r"kernel\.imq_c: must be > 0, got 0\.0"),
        ({"imq_beta": -0.5}, r"kernel\.imq_beta: must be > 0, got -0\.5"),
    ],
)
def test_kernel_spec_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KernelSpec(**kwargs)


def test_mmd2_input_errors() -> None:
    x = _randn(5, 3)
    with pytest.raises(ValueError, match=r"need >= 2 samples in each set, got n=1 and m=5"):
        mmd2_unbiased(x[:1], x)
    with pytest.raises(ValueError, match=r"feature dims differ, got 3 and 2"):
        mmd2_unbiased(x, x[:, :2])
    with pytest.raises(ValueError, match=r"expected 2-D tensors"):
        mmd2_unbiased(x[0], x)
    with pytest.raises(ValueError, match=r"expected floating-point tensors"):
        mmd2_unbiased(x.long(), x.long())
    with pytest.raises(ValueError, match=r"kernel: expected a KernelSpec, got dict"):
        mmd2_unbiased(x, x, {"type": "rbf"})  # type: ignore[arg-type]
    same = torch.ones(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'median' needs distinct points, got median pairwise distance 0"):
        mmd2_unbiased(same, same, KernelSpec(type="rbf", bandwidth_mode="median"))


def test_kernel_spec_accepts_numpy_scalars_and_normalises_types() -> None:
    # Loosely typed values as they come from YAML/numpy configs.
    loose: dict = {"degree": np.int64(2), "bandwidth": np.float32(2.0), "bandwidths": (1, 3)}
    spec = KernelSpec(type="rbf_mixture", **loose)
    assert spec.degree == 2 and type(spec.degree) is int
    assert spec.bandwidth == 2.0 and type(spec.bandwidth) is float
    assert spec.bandwidths == [1.0, 3.0] and all(type(b) is float for b in spec.bandwidths)
