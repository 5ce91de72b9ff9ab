"""Tests for mmdsweep.assets.bank.FeatureBank: building, on-disk caching, key checks, sampling."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from mmdsweep.assets import bank as bank_mod
from mmdsweep.assets.bank import FeatureBank, cache_path


class _Images(Dataset):
    """Plain image tensors (C, H, W) in [-1, 1], no labels."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


class _CountingFeatures:
    """Deterministic feature map (B, 3, 4, 4) -> (B, 5) that counts calls and images seen."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls = 0
        self.images = 0
        self.grad_enabled: list[bool] = []
        self.fail_on_call = fail_on_call
        self.weight = torch.randn(48, 5, generator=torch.Generator().manual_seed(0))

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.images += x.shape[0]
        self.grad_enabled.append(torch.is_grad_enabled())
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("feature extractor crashed")
        return x.flatten(1) @ self.weight


def _images(n: int = 23, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 4, 4, generator=g) * 2 - 1


def test_build_computes_features_of_every_image_without_grad() -> None:
    images = _images()
    fn = _CountingFeatures()
    bank = FeatureBank.build(
        TensorDataset(images, torch.arange(23)), fn, key="k", cache_dir=None, batch_size=10
    )
    assert fn.calls == 3 and fn.images == 23  # batches 10 + 10 + 3
    assert fn.grad_enabled == [False, False, False]
    assert len(bank) == 23 and bank.dim == 5 and bank.key == "k"
    assert bank.features.dtype == torch.float32
    torch.testing.assert_close(bank.features, images.flatten(1) @ fn.weight)


def test_second_build_loads_from_cache_without_calling_feature_fn(tmp_path: Path) -> None:
    images = _images()
    key = "cifar10-train|inception-2048|32px|n=23"
    fn = _CountingFeatures()
    first = FeatureBank.build(_Images(images), fn, key=key, cache_dir=tmp_path, batch_size=8, progress=True)
    assert fn.calls == 3
    expected_file = tmp_path / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    assert cache_path(tmp_path, key) == expected_file
    assert [p.name for p in tmp_path.iterdir()] == [expected_file.name]
    with safe_open(str(expected_file), framework="pt") as f:
        assert f.metadata()["key"] == key

    second = FeatureBank.build(_Images(images), fn, key=key, cache_dir=tmp_path, batch_size=8)
    assert fn.calls == 3  # not called again
    assert second.key == key
    assert torch.equal(second.features, first.features)

    other = FeatureBank.build(_Images(images[:20]), fn, key=key + "-20", cache_dir=tmp_path)
    assert fn.calls == 4 and len(other) == 20
    assert len(list(tmp_path.iterdir())) == 2


def test_key_mismatch_in_cache_file_is_detected(tmp_path: Path) -> None:
    fn = _CountingFeatures()
    FeatureBank.build(_Images(_images()), fn, key="key-a", cache_dir=tmp_path)
    # A stale file or a hash-prefix collision: key-a's features at key-b's path.
    cache_path(tmp_path, "key-a").rename(cache_path(tmp_path, "key-b"))
    with pytest.raises(ValueError, match=r"holds key 'key-a', expected 'key-b'"):
        FeatureBank.build(_Images(_images()), fn, key="key-b", cache_dir=tmp_path)
    assert fn.calls == 1


def test_failed_build_leaves_no_file(tmp_path: Path) -> None:
    fn = _CountingFeatures(fail_on_call=2)
    with pytest.raises(RuntimeError, match="crashed"):
        FeatureBank.build(_Images(_images()), fn, key="k", cache_dir=tmp_path, batch_size=8)
    assert list(tmp_path.iterdir()) == []
    # The next build computes from scratch and succeeds.
    ok = _CountingFeatures()
    assert len(FeatureBank.build(_Images(_images()), ok, key="k", cache_dir=tmp_path, batch_size=8)) == 23
    assert ok.calls == 3


def test_interrupted_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def partial_save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{partial")
        raise OSError("disk full")

    monkeypatch.setattr(bank_mod, "save_file", partial_save_file)
    with pytest.raises(OSError, match="disk full"):
        FeatureBank.build(_Images(_images()), _CountingFeatures(), key="k", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_sample_is_deterministic_per_seed_and_without_replacement() -> None:
    bank = FeatureBank(torch.arange(100, dtype=torch.float32).unsqueeze(1).repeat(1, 3), key="k")
    a = bank.sample(40, torch.Generator().manual_seed(5))
    b = bank.sample(40, torch.Generator().manual_seed(5))
    c = bank.sample(40, torch.Generator().manual_seed(6))
    assert a.shape == (40, 3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a[:, 0].unique().numel() == 40  # no row twice within a draw
    full = bank.sample(100, torch.Generator().manual_seed(0))
    assert sorted(full[:, 0].tolist()) == list(range(100))
    g = torch.Generator().manual_seed(5)
    assert not torch.equal(bank.sample(40, g), bank.sample(40, g))  # successive draws differ


def test_to_keeps_key_and_values() -> None:
    bank = FeatureBank(torch.randn(4, 2, dtype=torch.float64), key="k")
    assert bank.features.dtype == torch.float32
    moved = bank.to("cpu")
    assert moved.key == "k" and torch.equal(moved.features, bank.features)
    assert "n=4" in repr(bank)


def test_bad_inputs_raise_one_line_value_errors(tmp_path: Path) -> None:
    bank = FeatureBank(torch.zeros(10, 2), key="k")
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 10\], got 11"):
        bank.sample(11, torch.Generator())
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 10\], got 0"):
        bank.sample(0, torch.Generator())
    with pytest.raises(ValueError, match=r"expected a 2-D tensor \(N, D\), got \(10,\)"):
        FeatureBank(torch.zeros(10), key="k")
    with pytest.raises(ValueError, match=r"FeatureBank.key: expected a non-empty string, got ''"):
        FeatureBank(torch.zeros(10, 2), key="")
    fn = _CountingFeatures()
    with pytest.raises(ValueError, match=r"images must lie in \[-1, 1\], got values in \[0, 255\]"):
        FeatureBank.build(
            _Images(torch.full((3, 3, 4, 4), 255.0).index_fill_(0, torch.tensor([0]), 0.0)), fn, "k", None
        )
    with pytest.raises(ValueError, match=r"feature_fn: expected features of shape \(23, D\)"):
        FeatureBank.build(_Images(_images()), lambda x: x.flatten(1)[:1], "k", None)
    with pytest.raises(ValueError, match=r"dataset is empty"):
        FeatureBank.build(_Images(_images(0)), fn, "k", None)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        FeatureBank.build(_Images(_images()), fn, "k", None, batch_size=0)
    with pytest.raises(ValueError, match=r"items must be image tensors"):
        FeatureBank.build([{"image": 1.0}, {"image": 2.0}], fn, "k", None)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
