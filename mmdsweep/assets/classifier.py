"""A small CNN domain classifier for low-resolution image domains.

The classifier serves two purposes for the embedded default domain (scikit-learn digits,
grayscale, 16x16, values in [-1, 1]):

* its penultimate layer is a cheap *domain* feature space for the MMD loss, and
* its logits are the evaluation network (accuracy / class-conditional statistics).

Weights are stored as safetensors; the architecture hyper-parameters travel in the safetensors
metadata so that :func:`load_classifier` needs nothing but the file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = [
    "ClassifierConfig",
    "DomainClassifier",
    "MissingWeightsError",
    "accuracy",
    "load_classifier",
    "random_shift",
    "save_classifier",
    "train_classifier",
]

_FORMAT_TAG = "mmdsweep.DomainClassifier"


class MissingWeightsError(FileNotFoundError):
    """Raised when a weights file a network needs is absent; the message says how to get it.

    Re-exported by :mod:`mmdsweep.assets.features`, which is its public home.
    """


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture hyper-parameters of a :class:`DomainClassifier`."""

    in_channels: int = 1
    resolution: int = 16
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 128


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """3x3 convolution, GroupNorm and ReLU."""
    groups = math.gcd(8, c_out)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(inplace=True),
    )


class DomainClassifier(nn.Module):
    """Small CNN: conv blocks at three scales, global average pool, a penultimate layer, a head.

    Inputs are images in [-1, 1] of shape (N, in_channels, H, W); any H, W works (global
    pooling), though the network is meant for ``resolution`` x ``resolution``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        resolution: int = 16,
        num_classes: int = 10,
        width: int = 32,
        feature_dim: int = 128,
    ) -> None:
        super().__init__()
        self.config = ClassifierConfig(in_channels, resolution, num_classes, width, feature_dim)
        self.body = nn.Sequential(
            _conv_block(in_channels, width, stride=1),
            _conv_block(width, 2 * width, stride=2),
            _conv_block(2 * width, 4 * width, stride=2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.penultimate = nn.Sequential(nn.Linear(4 * width, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def in_channels(self) -> int:
        """Number of input channels."""
        return self.config.in_channels

    @property
    def resolution(self) -> int:
        """Native input resolution."""
        return self.config.resolution

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.config.num_classes

    @property
    def feature_dim(self) -> int:
        """Dimension of :meth:`features`."""
        return self.config.feature_dim

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer activations, shape (N, feature_dim)."""
        return self.penultimate(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits, shape (N, num_classes)."""
        return self.head(self.features(x))


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image by an integer offset in [-max_shift, max_shift] per axis (edge pixels repeat)."""
    n, c, h, w = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (2, n), generator=generator, device=x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + shifts[0][:, None]).clamp(0, h - 1)
    cols = (torch.arange(w, device=x.device)[None, :] + shifts[1][:, None]).clamp(0, w - 1)
    batch_idx = torch.arange(n, device=x.device)[:, None, None, None]
    chan_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return x[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]


def _check_training_data(images: Tensor, labels: Tensor) -> None:
    """Validate shapes of the training tensors."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be (N,) matching images, got {tuple(labels.shape)}")
    if images.shape[0] == 0:
        raise ValueError("no training images")


def train_classifier(
    images: Tensor,
    labels: Tensor,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    augment: bool = True,
    width: int = 32,
    feature_dim: int = 128,
    num_classes: int | None = None,
) -> DomainClassifier:
    """Train a :class:`DomainClassifier` with Adam and a cosine learning-rate decay.

    ``images`` are (N, C, H, W) in [-1, 1] (square), ``labels`` integer class ids. The result is
    a deterministic function of the data and ``seed`` (initialisation, batches and augmentation
    draw from a private generator; the global RNG is left untouched). Returns the model in eval
    mode on the device of ``images``.
    """
    _check_training_data(images, labels)
    if steps < 0:
        raise ValueError("steps must be >= 0")
    labels = labels.long()
    n, c, h, _ = images.shape
    classes = int(labels.max().item()) + 1 if num_classes is None else num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DomainClassifier(c, h, classes, width=width, feature_dim=feature_dim)
    model = model.to(images.device)
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))
    )
    max_shift = max(1, h // 16)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=generator).to(images.device)
        batch = images[idx]
        if augment:
            batch = random_shift(batch, max_shift, generator)
        loss = F.cross_entropy(model(batch), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on ``images`` (evaluated in eval mode, mode restored after)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == labels[start : start + batch_size].to(logits.device)).sum())
    model.train(was_training)
    return correct / max(images.shape[0], 1)


def save_classifier(model: DomainClassifier, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` as safetensors, with its architecture in the metadata."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": _FORMAT_TAG, "config": json.dumps(asdict(model.config), sort_keys=True)}
    save_file(tensors, str(out), metadata=metadata)
    return out


def load_classifier(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> DomainClassifier:
    """Load a classifier written by :func:`save_classifier`; returned in eval mode."""
    src = Path(path)
    if not src.is_file():
        raise MissingWeightsError(
            f"domain classifier weights not found at {src}: train one with "
            "mmdsweep.assets.classifier.train_classifier and save it with save_classifier(model, path), "
            "then pass that path as features.classifier_path"
        )
    with safe_open(str(src), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != _FORMAT_TAG or "config" not in metadata:
            raise ValueError(f"{src} is not a DomainClassifier file (missing '{_FORMAT_TAG}' metadata)")
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    config = ClassifierConfig(**json.loads(metadata["config"]))
    model = DomainClassifier(**asdict(config))
    model.load_state_dict(state)
    return model.to(device).eval()
