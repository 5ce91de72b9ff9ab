"""FID and KID on precomputed features (numpy in, floats out) via clean-fid's feature-level code.

* FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to the
  two feature sets, ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``, computed
  by ``cleanfid.fid.frechet_distance``.  This module adds the guards clean-fid
  lacks: a warning when a set has too few samples for a full-rank covariance,
  and a warning with the magnitude of the imaginary part of ``sqrtm(S1 S2)``
  that clean-fid silently drops (it only rejects > 1e-3 on the diagonal).
* KID (Binkowski et al. 2018, Sec. 4): unbiased MMD^2 with the cubic kernel
  ``(x.y / d + 1)^3`` averaged over random subsets, computed by
  ``cleanfid.fid.kernel_distance`` (equal to :func:`mmdsweep.core.mmd.mmd2_unbiased`
  with the default kernel on one full subset).

Reference statistics are cached on disk as ``.npz`` keyed by a caller-given
string (see :func:`load_or_compute_reference`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cleanfid.fid import kernel_distance
from scipy import linalg

from mmdsweep.assets.bank import cache_path
from mmdsweep.fsio import atomic_path

__all__ = [
    "MetricWarning",
    "ReferenceStats",
    "feature_stats",
    "fid",
    "fid_from_stats",
    "kid",
    "load_or_compute_reference",
    "sqrtm_imag_magnitude",
    "frechet_distance_one_root",
    "collect_warnings",
    "forget_shown_warnings",
]


class MetricWarning(UserWarning):
    """A metric was computed but is likely unreliable (too few samples, numerical trouble)."""


def _as_feats(feats: np.ndarray, name: str, min_rows: int = 2) -> np.ndarray:
    """Validate a 2-D finite feature array with at least ``min_rows`` rows and return it."""
    arr = np.asarray(feats)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (n, d), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if arr.shape[0] < min_rows or arr.shape[1] < 1:
        raise ValueError(f"{name}: need >= {min_rows} samples of dim >= 1, got shape {arr.shape}")
    bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise ValueError(f"{name}: expected finite features, got {bad} NaN/inf entries")
    return arr


_SHOWN: set[tuple[type[Warning], str]] = set()
"""Warnings :func:`collect_warnings` has already re-emitted in this process (see there)."""


def forget_shown_warnings() -> None:
    """Let :func:`collect_warnings` re-emit every message again (for tests: a fresh process's state)."""
    _SHOWN.clear()


@contextlib.contextmanager
def collect_warnings(into: list[str]):  # type: ignore[no-untyped-def]
    """Record (never silence) metric and numerical warnings raised inside the block as one-line messages in
    ``into``; each distinct message is also re-emitted outside, the first time this process sees it, so a
    console shows it once.

    Every block records its warnings, so each evaluation's ``warnings`` column is complete. The console
    copy is deduplicated here because Python's own once-per-location filter cannot do it: every
    ``warnings.catch_warnings`` (this block's) resets that filter's memory, so a sweep printed the same line
    once per evaluation (about 50 times in the README's run).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield into
    new: list[tuple[type[Warning], str]] = []
    for w in caught:
        text = str(w.message).splitlines()[0]
        msg = f"{w.category.__name__}: {text}"
        if msg not in into:
            into.append(msg)
            new.append((w.category, text))
    for category, text in new:  # with its own category (the console shows "MetricWarning: <text>")
        if (category, text) in _SHOWN:
            continue
        _SHOWN.add((category, text))
        warnings.warn(text, category, stacklevel=3)


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(d,)`` and unbiased covariance ``(d, d)`` of ``feats`` ``(n, d)``, as clean-fid computes them."""
    arr = _as_feats(feats, "feature_stats")
    return np.mean(arr, axis=0), np.cov(arr, rowvar=False)


def sqrtm_imag_magnitude(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """Largest ``|Im|`` entry of ``sqrtm(sigma1 @ sigma2)`` (0.0 if the root is real).

    Mirrors clean-fid: if the root is not finite, ``eps * I`` is added to both
    covariances first.
    """
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        return float(np.max(np.abs(covmean.imag)))
    return 0.0


def fid_from_stats(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    *,
    check_imag: bool = True,
    imag_atol: float = 1e-3,
    root2: tuple[np.ndarray, float] | None = None,
) -> float:
    """FID between two Gaussians, via ``cleanfid.fid.frechet_distance``.

    With ``check_imag`` the matrix root is computed once more here and a
    :class:`MetricWarning` reports the magnitude of its imaginary part when it
    exceeds ``imag_atol`` (clean-fid keeps only the real part).  If clean-fid
    rejects the root, a one-line ValueError is raised.
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, dtype=np.float64)),
        np.atleast_1d(np.asarray(mu2, dtype=np.float64)),
    )
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.ndim != 1 or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"fid: expected mu (d,) and sigma (d, d) of one dim d, got mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
            f"mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"fid: {name} must be finite, got NaN/inf entries")
    value, negative = frechet_distance_one_root(mu1, sigma1, mu2, sigma2, root2)
    if check_imag and negative > imag_atol:
        warnings.warn(
            f"fid: sigma1^(1/2) sigma2 sigma1^(1/2) has a negative eigenvalue of magnitude {negative:.3g} "
            f"(> {imag_atol:g} of the largest); it was set to 0, so the FID may be inaccurate",
            MetricWarning,
            stacklevel=2,
        )
    return float(value)


def _psd_sqrt(a: np.ndarray) -> tuple[np.ndarray, float]:
    """Symmetric square root of a symmetric PSD matrix via ``eigh`` (negative eigenvalues -> 0), and the
    magnitude of its most negative eigenvalue relative to its largest."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    top = float(max(np.abs(w).max(initial=0.0), 1e-300))
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T, float(max(0.0, -w.min(initial=0.0)) / top)


def frechet_distance_one_root(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    root2: tuple[np.ndarray, float] | None = None,
) -> tuple[float, float]:
    """Fréchet distance (Heusel et al. 2017, eq. 6) with ONE matrix square root.

    :math:`\\mathrm{tr}\\,(\\Sigma_1\\Sigma_2)^{1/2} = \\sum_i \\sqrt{\\lambda_i}` where :math:`\\lambda_i` are the
    eigenvalues of the symmetric PSD matrix :math:`M = \\Sigma_1^{1/2}\\Sigma_2\\Sigma_1^{1/2}` (similar to
    :math:`\\Sigma_1\\Sigma_2`).  :math:`\\Sigma_1^{1/2}` comes from one symmetric eigen-decomposition and the
    eigenvalues of M from ``eigvalsh``: no general ``sqrtm`` (clean-fid computes ``sqrtm(S1 S2)``, a Schur
    decomposition of a non-symmetric matrix, and ``sqrtm_imag_magnitude`` computed a second one).  Equals
    clean-fid's ``frechet_distance`` to ~1e-9 relative on full-rank covariances (tests/test_metrics.py).

    Returns ``(fid, negative)``: ``negative`` is the magnitude of the most negative eigenvalue of M relative to
    its largest (round-off or a non-PSD input), clipped to 0 in the sum.
    """
    diff = mu1 - mu2
    if (
        root2 is not None
    ):  # tr (S1 S2)^(1/2) = tr (S2 S1)^(1/2): use the reference's cached root, one eigvalsh
        root1, negative1 = root2
        m = root1 @ sigma1 @ root1
    else:
        root1, negative1 = _psd_sqrt(sigma1)
        m = root1 @ sigma2 @ root1
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    top = float(max(np.abs(lam).max(initial=0.0), 1e-300))
    negative = max(negative1, float(max(0.0, -lam.min(initial=0.0)) / top))
    tr_covmean = float(np.sqrt(np.clip(lam, 0, None)).sum())
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return value, negative


_SCIPY_WARNED: list[bool] = []


def _warn_scipy_once(err: Exception) -> None:
    if not _SCIPY_WARNED:
        import scipy

        _SCIPY_WARNED.append(True)
        warnings.warn(
            f"fid: clean-fid's frechet_distance fails with scipy {scipy.__version__} ({err}); "
            "using mmdsweep's identical formula instead",
            MetricWarning,
            stacklevel=3,
        )


def frechet_distance_same_as_cleanfid(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6):
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``, with clean-fid's handling of
    a singular product (add ``eps`` to the diagonals) and of a complex root (real part, if the
    imaginary diagonal is below 1e-3)."""
    from scipy import linalg

    def root(a: np.ndarray) -> np.ndarray:
        out = linalg.sqrtm(a)
        return np.asarray(out[0] if isinstance(out, tuple) else out)

    diff = mu1 - mu2
    covmean = root(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = root((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@dataclass
class ReferenceStats:
    """Statistics of the reference (real) features.

    ``mu``/``sigma`` are for FID; ``feats`` (optional, possibly a random subset of
    the ``n`` features) is for KID; ``key`` identifies what they were computed on.
    """

    key: str
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    feats: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"ReferenceStats.key: expected a non-empty string, got {self.key!r}")
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        d = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if d < 1 or self.sigma.shape != (d, d):
            raise ValueError(
                f"ReferenceStats: expected mu (d,) and sigma (d, d), got {self.mu.shape} and {self.sigma.shape}"
            )
        if isinstance(self.n, bool) or int(self.n) != self.n or self.n < 2:
            raise ValueError(f"ReferenceStats.n: expected an integer >= 2, got {self.n!r}")
        self.n = int(self.n)
        if self.feats is not None:
            self.feats = _as_feats(self.feats, "ReferenceStats.feats")
            if self.feats.shape[1] != d:
                raise ValueError(f"ReferenceStats.feats: expected dim {d}, got shape {self.feats.shape}")

    @property
    def dim(self) -> int:
        """Feature dimension ``d``."""
        return int(self.mu.shape[0])

    @classmethod
    def from_feats(
        cls, key: str, feats: np.ndarray, kid_max_feats: int | None = 10_000, seed: int = 0
    ) -> ReferenceStats:
        """Stats of all ``feats``; keeps at most ``kid_max_feats`` of them (random, seeded) for KID.

        ``kid_max_feats=None`` keeps all features, ``0`` keeps none.
        """
        arr = _as_feats(feats, "ReferenceStats.from_feats")
        mu, sigma = feature_stats(arr)
        if kid_max_feats is not None and (isinstance(kid_max_feats, bool) or kid_max_feats < 0):
            raise ValueError(f"kid_max_feats: expected None or an integer >= 0, got {kid_max_feats!r}")
        kept: np.ndarray | None = arr
        if kid_max_feats is not None and kid_max_feats < arr.shape[0]:
            if kid_max_feats < 2:
                kept = None
            else:
                idx = np.sort(np.random.default_rng(seed).choice(arr.shape[0], kid_max_feats, replace=False))
                kept = arr[idx]
        return cls(key=key, mu=mu, sigma=sigma, n=arr.shape[0], feats=kept)

    def save(self, path: str | Path) -> None:
        """Write to ``path`` as ``.npz`` atomically (temporary file + ``os.replace``)."""
        arrays: dict[str, np.ndarray] = {
            "key": np.array(self.key),
            "mu": self.mu,
            "sigma": self.sigma,
            "n": np.array(self.n),
        }
        if self.feats is not None:
            arrays["feats"] = self.feats
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | Path, key: str | None = None) -> ReferenceStats:
        """Read stats written by :meth:`save`; if ``key`` is given it must match the stored key."""
        with np.load(path, allow_pickle=False) as data:
            stored = str(data["key"])
            if key is not None and stored != key:
                raise ValueError(
                    f"reference stats cache {path}: holds key {stored!r}, expected {key!r} "
                    "(stale file or hash collision); delete it or use another cache_dir"
                )
            feats = data["feats"] if "feats" in data.files else None
            return cls(key=stored, mu=data["mu"], sigma=data["sigma"], n=int(data["n"]), feats=feats)


def load_or_compute_reference(
    cache_dir: str | Path,
    key: str,
    compute_fn: Callable[[], np.ndarray | ReferenceStats],
    *,
    kid_max_feats: int | None = 10_000,
    seed: int = 0,
) -> ReferenceStats:
    """Reference stats for ``key``, from ``cache_dir`` if cached, else from ``compute_fn()`` then cached.

    ``compute_fn`` returns the reference features ``(n, d)`` (or ready-made
    :class:`ReferenceStats` with the same key).  The cache file is
    ``cache_dir / (sha256(key)[:16] + ".ref.npz")`` and stores ``key``, which is
    checked on load.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"load_or_compute_reference: key must be a non-empty string, got {key!r}")
    path = cache_path(cache_dir, key, suffix=".ref.npz")
    if path.exists():
        return ReferenceStats.load(path, key=key)
    result = compute_fn()
    if isinstance(result, ReferenceStats):
        if result.key != key:
            raise ValueError(f"compute_fn: returned ReferenceStats with key {result.key!r}, expected {key!r}")
        stats = result
    else:
        stats = ReferenceStats.from_feats(key, result, kid_max_feats=kid_max_feats, seed=seed)
    stats.save(path)
    return stats


def _warn_few_samples(n: int, d: int, which: str, min_samples: int | None) -> None:
    need = d + 1 if min_samples is None else min_samples
    if n < need:
        why = (
            f"the covariance is rank-deficient below {d + 1}"
            if n <= d
            else "FID is biased upwards at small n"
        )
        warnings.warn(
            f"fid: only {n} {which} samples for {d}-dim features (need >= {need}: {why}), "
            "the FID is not comparable to full-sample values",
            MetricWarning,
            stacklevel=3,
        )


def fid(
    gen_feats: np.ndarray,
    ref: ReferenceStats | np.ndarray | tuple[np.ndarray, np.ndarray],
    *,
    min_samples: int | None = None,
    check_imag: bool = True,
) -> float:
    """FID between generated features ``(n, d)`` and a reference.

    ``ref`` is :class:`ReferenceStats`, reference features ``(m, d)`` or a tuple
    ``(mu, sigma)``.  Warns (:class:`MetricWarning`) when either set has fewer than
    ``min_samples`` (default ``d + 1``) samples.  Equals
    ``cleanfid.fid.fid_from_feats`` for two feature arrays.
    """
    gen = _as_feats(gen_feats, "fid: gen_feats")
    d = gen.shape[1]
    _warn_few_samples(gen.shape[0], d, "generated", min_samples)
    if isinstance(ref, ReferenceStats):
        mu2, sigma2, n_ref = ref.mu, ref.sigma, ref.n
    elif isinstance(ref, tuple):
        if len(ref) != 2:
            raise ValueError(f"fid: ref tuple must be (mu, sigma), got {len(ref)} elements")
        mu2, sigma2, n_ref = np.asarray(ref[0]), np.asarray(ref[1]), None
    else:
        ref_arr = _as_feats(ref, "fid: ref")
        mu2, sigma2 = feature_stats(ref_arr)
        n_ref = ref_arr.shape[0]
    if mu2.shape != (d,):
        raise ValueError(f"fid: reference dim {mu2.shape} does not match generated features dim {d}")
    if n_ref is not None:
        _warn_few_samples(n_ref, d, "reference", min_samples)
    mu1, sigma1 = feature_stats(gen)
    root2 = _reference_root(ref) if isinstance(ref, ReferenceStats) else None
    return fid_from_stats(mu1, sigma1, mu2, sigma2, check_imag=check_imag, root2=root2)


_ROOTS: dict[tuple[str, int, int], tuple[np.ndarray, float]] = {}


def _reference_root(ref: ReferenceStats) -> tuple[np.ndarray, float]:
    """The reference covariance's symmetric root, computed once per reference (every evaluation reuses it)."""
    key = (ref.key, int(ref.n), int(ref.sigma.shape[0]))
    if key not in _ROOTS:
        if len(_ROOTS) > 16:
            _ROOTS.clear()
        _ROOTS[key] = _psd_sqrt(np.asarray(ref.sigma, dtype=np.float64))
    return _ROOTS[key]


def kid(
    gen_feats: np.ndarray,
    ref_feats: np.ndarray | ReferenceStats,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int | None = 0,
) -> float:
    """KID via ``cleanfid.fid.kernel_distance`` (features cast to float64).

    Subsets have ``min(n, m, max_subset_size)`` samples.  clean-fid draws them
    with numpy's global RNG; with ``seed`` set it is seeded for this call and
    restored afterwards, so the result is reproducible.
    """
    if isinstance(ref_feats, ReferenceStats):
        if ref_feats.feats is None:
            raise ValueError(
                f"kid: ReferenceStats {ref_feats.key!r} holds no features, expected feats for KID"
            )
        ref_feats = ref_feats.feats
    gen = _as_feats(gen_feats, "kid: gen_feats").astype(np.float64, copy=False)
    ref = _as_feats(ref_feats, "kid: ref_feats").astype(np.float64, copy=False)
    if gen.shape[1] != ref.shape[1]:
        raise ValueError(f"kid: feature dims differ, got {gen.shape[1]} and {ref.shape[1]}")
    if isinstance(num_subsets, bool) or not isinstance(num_subsets, int) or num_subsets < 1:
        raise ValueError(f"kid: num_subsets must be an integer >= 1, got {num_subsets!r}")
    if isinstance(max_subset_size, bool) or not isinstance(max_subset_size, int) or max_subset_size < 2:
        raise ValueError(f"kid: max_subset_size must be an integer >= 2, got {max_subset_size!r}")
    if seed is None:
        return float(kernel_distance(gen, ref, num_subsets=num_subsets, max_subset_size=max_subset_size))
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(kernel_distance(gen, ref, num_subsets=num_subsets, max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)
