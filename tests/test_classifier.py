"""Tests for mmdsweep.assets.classifier on scikit-learn's digits (16x16 grayscale in [-1, 1])."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import Tensor

from mmdsweep.assets.classifier import (
    DomainClassifier,
    MissingWeightsError,
    accuracy,
    load_classifier,
    random_shift,
    save_classifier,
    train_classifier,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread per module


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images, train labels, test images, test labels), images 16x16 in [-1, 1]."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0 * 2.0 - 1.0
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return images[train], labels[train], images[test], labels[test]


@pytest.fixture(scope="module")
def trained(digits: tuple[Tensor, Tensor, Tensor, Tensor]) -> DomainClassifier:
    """A classifier trained for 300 steps of 64 images (about 8 s of CPU on one core)."""
    x_train, y_train, _, _ = digits
    return train_classifier(x_train, y_train, steps=300, batch_size=64, seed=0)


@pytest.mark.threads
def test_reaches_90_percent_on_held_out_digits(
    trained: DomainClassifier, digits: tuple[Tensor, Tensor, Tensor, Tensor]
) -> None:
    _, _, x_test, y_test = digits
    assert not trained.training
    assert (trained.in_channels, trained.resolution, trained.num_classes) == (1, 16, 10)
    assert accuracy(trained, x_test, y_test) >= 0.9
    feats = trained.features(x_test[:5])
    assert feats.shape == (5, trained.feature_dim) and (feats >= 0).all()


def test_save_load_round_trip(trained: DomainClassifier, tmp_path: Path) -> None:
    path = save_classifier(trained, tmp_path / "sub" / "clf.safetensors")
    loaded = load_classifier(path)
    assert loaded.config == trained.config and not loaded.training
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
        assert torch.equal(loaded.features(x), trained.features(x))


def test_load_errors(tmp_path: Path) -> None:
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(MissingWeightsError, match="absent.safetensors"):
        load_classifier(missing)
    assert issubclass(MissingWeightsError, FileNotFoundError)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a DomainClassifier"):
        load_classifier(foreign)


def test_training_is_deterministic_per_seed(digits: tuple[Tensor, Tensor, Tensor, Tensor]) -> None:
    x_train, y_train, _, _ = digits
    rng_before = torch.get_rng_state()

    def train(seed: int) -> DomainClassifier:
        return train_classifier(x_train, y_train, steps=15, batch_size=32, seed=seed, width=8, feature_dim=16)

    first, second, other = train(3), train(3), train(4)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert not torch.equal(first.head.weight, other.head.weight)


def test_random_shift_moves_pixels_within_bounds() -> None:
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 4, 4] = 1.0
    shifted = random_shift(x, 1, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    peaks = shifted[:, 0].flatten(1).argmax(dim=1)
    rows, cols = peaks // 8, peaks % 8
    assert ((rows - 4).abs() <= 1).all() and ((cols - 4).abs() <= 1).all()
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 3  # several distinct offsets occur
    assert torch.equal(shifted.sum(dim=(1, 2, 3)), torch.ones(64))
