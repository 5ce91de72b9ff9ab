"""Tests for mmdsweep.assets.metrics (FID/KID via clean-fid, cached reference stats) and their
agreement with mmdsweep.core.mmd."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from cleanfid.fid import fid_from_feats, kernel_distance

from mmdsweep.assets import metrics
from mmdsweep.assets.bank import cache_path
from mmdsweep.assets.metrics import (
    MetricWarning,
    ReferenceStats,
    feature_stats,
    fid,
    fid_from_stats,
    kid,
    load_or_compute_reference,
)
from mmdsweep.core.mmd import KernelSpec, mmd2_unbiased

pytestmark = pytest.mark.threads  # scripts/test.sh runs these with 1 and 2 torch threads


def _feats(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Non-negative, Inception-like (post-ReLU average-pool) features in float64."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.standard_normal((n, d)) + shift, 0.0) * 0.5


@pytest.mark.parametrize(("n", "d", "shift"), [(150, 32, 0.3), (64, 2048, 0.0), (40, 8, 1.0)])
def test_mmd2_default_kernel_equals_clean_fid_kernel_distance(n: int, d: int, shift: float) -> None:
    gen, ref = _feats(n, d, seed=1, shift=shift), _feats(n, d, seed=2)
    # One subset with max_subset_size >= n is a permutation of the full sets, and the
    # statistic is permutation invariant, so clean-fid's random draw does not matter.
    expected = kernel_distance(gen, ref, num_subsets=1, max_subset_size=n + 10)
    ours, info = mmd2_unbiased(torch.from_numpy(gen), torch.from_numpy(ref), KernelSpec())
    assert info["gamma"] == pytest.approx(1.0 / d)
    assert abs(float(ours) - expected) < 1e-10
    assert abs(kid(gen, ref, num_subsets=1, max_subset_size=n) - expected) < 1e-10


def test_kid_matches_clean_fid_with_same_seed_and_restores_global_rng() -> None:
    gen, ref = _feats(120, 16, seed=3, shift=0.2), _feats(200, 16, seed=4)
    np.random.seed(99)
    expected = kernel_distance(gen, ref, num_subsets=20, max_subset_size=50)
    np.random.seed(7)
    untouched = np.random.random_sample(3)
    np.random.seed(7)
    ours = kid(gen, ref, num_subsets=20, max_subset_size=50, seed=99)
    assert np.array_equal(np.random.random_sample(3), untouched)  # global RNG state restored
    assert ours == pytest.approx(expected, rel=1e-12)
    assert kid(gen, ref, num_subsets=20, max_subset_size=50, seed=99) == ours
    assert kid(gen, ref, num_subsets=20, max_subset_size=50, seed=100) != ours


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")
def test_fid_equals_clean_fid_fid_from_feats_for_every_ref_form() -> None:
    gen, ref = _feats(300, 24, seed=5, shift=0.4), _feats(400, 24, seed=6)
    expected = fid_from_feats(gen, ref)
    assert expected > 0
    mu, sigma = feature_stats(ref)
    stats = ReferenceStats.from_feats("ref", ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough samples, real root: no warning of any kind
        assert fid(gen, ref) == pytest.approx(expected, rel=1e-12)
        assert fid(gen, stats) == pytest.approx(expected, rel=1e-12)
        assert fid(gen, (mu, sigma)) == pytest.approx(expected, rel=1e-12)
    assert fid(ref, ref) == pytest.approx(0.0, abs=1e-6)


def test_fid_warns_with_number_of_samples_when_too_few() -> None:
    gen, ref = _feats(10, 16, seed=7), _feats(200, 16, seed=8)
    with pytest.warns(MetricWarning, match=r"only 10 generated samples for 16-dim features \(need >= 17"):
        value = fid(gen, ref, check_imag=False)
    assert np.isfinite(value)
    stats = ReferenceStats.from_feats("r", ref[:12])
    with pytest.warns(MetricWarning, match=r"only 12 reference samples"):
        fid(_feats(200, 16, seed=9), stats, check_imag=False)
    with pytest.warns(MetricWarning, match=r"only 100 generated samples .*need >= 150: FID is biased"):
        fid(_feats(100, 16, seed=9), ref, min_samples=150)


def test_fid_warns_with_magnitude_of_a_negative_eigenvalue() -> None:
    """One symmetric root: S1^(1/2) S2 S1^(1/2) has no imaginary part to drop (the old sqrtm(S1 S2) test); a
    non-PSD input shows up as a negative eigenvalue, reported with its magnitude and clipped, never hidden."""
    mu = np.zeros(2)
    with pytest.warns(MetricWarning, match=r"negative eigenvalue of magnitude 1 "):
        value = fid_from_stats(
            mu, np.diag([1.0, -1.0]) @ np.diag([1.0, -1.0]) - np.diag([0.0, 2.0]), mu, np.eye(2)
        )
    assert np.isfinite(value)


def test_fid_from_stats_shape_and_finiteness_errors() -> None:
    with pytest.raises(ValueError, match=r"fid: expected mu \(d,\) and sigma \(d, d\)"):
        fid_from_stats(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match=r"fid: sigma2 must be finite"):
        fid_from_stats(np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.nan))


def test_metric_input_errors() -> None:
    a = _feats(20, 4, seed=12)
    with pytest.raises(ValueError, match=r"fid: gen_feats: expected a 2-D array \(n, d\), got shape \(20,\)"):
        fid(a[:, 0], a)
    with pytest.raises(
        ValueError, match=r"fid: reference dim \(5,\) does not match generated features dim 4"
    ):
        fid(a, _feats(20, 5, seed=13))
    bad = a.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"kid: gen_feats: expected finite features, got 1 NaN/inf entries"):
        kid(bad, a)
    with pytest.raises(ValueError, match=r"kid: feature dims differ, got 4 and 5"):
        kid(a, _feats(20, 5, seed=13))
    with pytest.raises(ValueError, match=r"kid: num_subsets must be an integer >= 1, got 0"):
        kid(a, a, num_subsets=0)
    with pytest.raises(ValueError, match=r"kid: max_subset_size must be an integer >= 2, got 1"):
        kid(a, a, max_subset_size=1)
    with pytest.raises(ValueError, match=r"need >= 2 samples"):
        kid(a[:1], a)
    no_feats = ReferenceStats.from_feats("k", a, kid_max_feats=0)
    assert no_feats.feats is None
    with pytest.raises(ValueError, match=r"kid: ReferenceStats 'k' holds no features"):
        kid(a, no_feats)


def test_reference_stats_kid_subset_is_seeded() -> None:
    a = _feats(100, 4, seed=14)
    s1 = ReferenceStats.from_feats("k", a, kid_max_feats=30, seed=1)
    s2 = ReferenceStats.from_feats("k", a, kid_max_feats=30, seed=1)
    s3 = ReferenceStats.from_feats("k", a, kid_max_feats=30, seed=2)
    assert s1.n == 100 and s1.feats is not None and s1.feats.shape == (30, 4)
    assert s2.feats is not None and s3.feats is not None
    assert np.array_equal(s1.feats, s2.feats) and not np.array_equal(s1.feats, s3.feats)
    mu, sigma = feature_stats(a)  # the FID stats always use all n features
    assert np.array_equal(s1.mu, mu) and np.array_equal(s1.sigma, sigma)


def test_load_or_compute_reference_caches_on_disk(tmp_path: Path) -> None:
    a = _feats(50, 6, seed=15)
    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return a

    first = load_or_compute_reference(tmp_path, "cifar10/train/inception/32/50", compute)
    second = load_or_compute_reference(tmp_path, "cifar10/train/inception/32/50", compute)
    assert len(calls) == 1
    assert cache_path(tmp_path, "cifar10/train/inception/32/50", suffix=".ref.npz").exists()
    assert [p.name for p in tmp_path.iterdir()] == [
        cache_path(tmp_path, "cifar10/train/inception/32/50", ".ref.npz").name
    ]
    assert second.key == first.key and second.n == 50
    assert np.array_equal(second.mu, first.mu) and np.array_equal(second.sigma, first.sigma)
    assert second.feats is not None and np.array_equal(second.feats, a)
    # A different key is a different cache entry.
    load_or_compute_reference(tmp_path, "cifar10/train/inception/32/49", lambda: a[:49])
    assert len(list(tmp_path.iterdir())) == 2


def test_load_or_compute_reference_detects_key_mismatch(tmp_path: Path) -> None:
    a = _feats(30, 3, seed=16)
    load_or_compute_reference(tmp_path, "key-a", lambda: a)
    # Simulate a stale file / hash collision: key-a's file sitting at key-b's path.
    cache_path(tmp_path, "key-a", ".ref.npz").rename(cache_path(tmp_path, "key-b", ".ref.npz"))
    with pytest.raises(ValueError, match=r"holds key 'key-a', expected 'key-b'"):
        load_or_compute_reference(tmp_path, "key-b", lambda: a)


def test_load_or_compute_reference_accepts_ready_stats(tmp_path: Path) -> None:
    mu, sigma = np.zeros(3), np.eye(3)
    stats = load_or_compute_reference(tmp_path, "pre", lambda: ReferenceStats("pre", mu, sigma, n=50000))
    assert stats.feats is None and stats.n == 50000
    assert load_or_compute_reference(tmp_path, "pre", lambda: np.zeros((0, 3))).n == 50000
    with pytest.raises(
        ValueError, match=r"compute_fn: returned ReferenceStats with key 'other', expected 'x'"
    ):
        load_or_compute_reference(tmp_path, "x", lambda: ReferenceStats("other", mu, sigma, n=5))


def test_reference_cache_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_compute() -> np.ndarray:
        raise RuntimeError("feature extractor crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        load_or_compute_reference(tmp_path, "k", failing_compute)
    assert list(tmp_path.iterdir()) == []

    def partial_savez(fh, **arrays: np.ndarray) -> None:
        fh.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(metrics.np, "savez", partial_savez)
    with pytest.raises(OSError, match="disk full"):
        load_or_compute_reference(tmp_path, "k", lambda: _feats(10, 2, seed=17))
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary file remains


def test_fallback_frechet_distance_equals_clean_fid() -> None:
    """The formula used when clean-fid cannot call scipy (>= 1.18) gives clean-fid's value."""
    from cleanfid.fid import frechet_distance

    from mmdsweep.assets.metrics import feature_stats, frechet_distance_same_as_cleanfid

    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 16))
    b = rng.normal(loc=0.3, scale=1.2, size=(280, 16))
    (m1, s1), (m2, s2) = feature_stats(a), feature_stats(b)
    ours = frechet_distance_same_as_cleanfid(m1, s1, m2, s2)
    assert ours == pytest.approx(float(frechet_distance(m1, s1, m2, s2)), rel=1e-9)
    assert ours > 0.5


def test_fid_survives_a_clean_fid_that_cannot_call_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmdsweep.assets import metrics as M

    def broken(*args: object, **kwargs: object) -> float:
        raise TypeError("sqrtm() got an unexpected keyword argument 'disp'")

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 8)), rng.normal(loc=0.5, size=(200, 8))
    expected = M.fid(a, b)
    monkeypatch.setattr(M, "frechet_distance", broken, raising=False)
    # FID no longer calls clean-fid's frechet_distance (nor scipy's sqrtm): one symmetric root of our own
    got = M.fid(a, b)
    assert got == expected


# ------------------------------------------------------------------------- issue 8: one root, warnings surfaced


def test_fid_uses_one_root_and_equals_cleanfid() -> None:
    """FID via the eigenvalues of S1^(1/2) S2 S1^(1/2) (one symmetric root) equals clean-fid's
    frechet_distance (sqrtm of S1 S2) to 1e-6 relative on full-rank covariances."""
    from unittest import mock

    from cleanfid.fid import frechet_distance

    from mmdsweep.assets import metrics as M

    rng = np.random.default_rng(3)
    for n, d, shift in ((300, 32, 0.1), (600, 64, 0.5), (2000, 128, 0.02)):
        a = rng.normal(size=(n, d))
        b = rng.normal(size=(n, d)) @ (np.eye(d) + 0.1 * rng.normal(size=(d, d))) + shift
        m1, s1 = M.feature_stats(a)
        m2, s2 = M.feature_stats(b)
        with mock.patch("scipy.linalg.sqrtm", side_effect=AssertionError("no general sqrtm")):
            ours = M.fid_from_stats(m1, s1, m2, s2)
        ref = frechet_distance(m1, s1, m2, s2)
        assert abs(ours - ref) <= 1e-6 * abs(ref), (ours, ref)


def test_rank_deficient_warning_is_recorded_not_silenced() -> None:
    from mmdsweep.assets import metrics as M

    M.forget_shown_warnings()
    rng = np.random.default_rng(0)
    caught: list[str] = []
    with pytest.warns(M.MetricWarning) as shown, M.collect_warnings(caught):
        M.fid(rng.normal(size=(20, 64)), rng.normal(size=(500, 64)))
    assert any("rank-deficient" in w for w in caught), caught
    # recorded as "MetricWarning: <text>"; re-emitted once with its category, not as "MetricWarning: MetricWarning: ..."
    assert all(w.startswith("MetricWarning: ") for w in caught), caught
    texts = [str(w.message) for w in shown]
    assert texts and not any(t.startswith("MetricWarning") for t in texts), texts
    assert len(texts) == len(set(texts)), texts


def test_repeated_warning_is_recorded_every_time_and_shown_once() -> None:
    """Each block records its warnings (the evaluation rows stay complete); the console copy of a message
    is re-emitted only the first time (a sweep used to print the same line once per evaluation)."""
    import warnings

    from mmdsweep.assets import metrics as M

    M.forget_shown_warnings()
    rng = np.random.default_rng(1)
    records: list[list[str]] = []
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        for _ in range(3):
            caught: list[str] = []
            with M.collect_warnings(caught):
                M.fid(rng.normal(size=(20, 64)), rng.normal(size=(500, 64)))
            records.append(caught)
    assert all(any("only 20 generated samples" in w for w in r) for r in records), records
    texts = [str(w.message) for w in shown if issubclass(w.category, M.MetricWarning)]
    assert len(texts) == len(set(texts)) and any("only 20 generated samples" in t for t in texts), texts
    M.forget_shown_warnings()
    with pytest.warns(M.MetricWarning, match="only 20 generated samples"), M.collect_warnings([]):
        M.fid(rng.normal(size=(20, 64)), rng.normal(size=(500, 64)))
