"""Bank of real-image features for the MMD-DDM loss, computed once and cached on disk.

The cache file is ``cache_dir / f"{sha256(key)[:16]}.safetensors"``; the full key
is stored in the file's metadata and compared on load, so a stale file or a hash
prefix collision is detected instead of silently reused.  The caller builds the
key from everything that determines the features (dataset id, feature space id,
resolution, number of images).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mmdsweep.fsio import atomic_path

__all__ = ["FeatureBank", "atomic_path", "cache_path"]

_TENSOR_NAME = "features"


def cache_path(cache_dir: str | Path, key: str, suffix: str = ".safetensors") -> Path:
    """Cache file for ``key``: ``cache_dir / (sha256(key)[:16] + suffix)``."""
    return Path(cache_dir) / f"{hashlib.sha256(key.encode('utf-8')).hexdigest()[:16]}{suffix}"


def _images_of(batch: object) -> Tensor:
    """Images of a collated batch: the batch itself or the first element of ``(image, label)``."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError(
                "dataset: items must be image tensors or (image, label) tuples, got empty tuples"
            )
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise ValueError(
            f"dataset: items must be image tensors (C,H,W) or (image, label) tuples, got {type(batch).__name__}"
        )
    return batch


class FeatureBank:
    """Real-image features ``(N, D)`` (float32, CPU) identified by ``key``."""

    def __init__(self, features: Tensor, key: str) -> None:
        if not isinstance(features, Tensor) or features.dim() != 2:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"FeatureBank.features: expected a 2-D tensor (N, D), got {shape}")
        if features.shape[0] < 1 or features.shape[1] < 1:
            raise ValueError(
                f"FeatureBank.features: expected N >= 1 and D >= 1, got shape {tuple(features.shape)}"
            )
        if not isinstance(key, str) or not key:
            raise ValueError(f"FeatureBank.key: expected a non-empty string, got {key!r}")
        self.features: Tensor = features.detach().to(torch.float32).contiguous()
        self.key: str = key

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __repr__(self) -> str:
        return f"FeatureBank(n={len(self)}, dim={self.dim}, key={self.key!r})"

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return int(self.features.shape[1])

    def to(self, device: torch.device | str) -> FeatureBank:
        """A bank with the same key whose features live on ``device``."""
        bank = FeatureBank.__new__(FeatureBank)
        bank.features = self.features.to(device)
        bank.key = self.key
        return bank

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` distinct rows drawn uniformly (without replacement) using ``generator``.

        The generator must live on the CPU; the rows are returned on the bank's device.
        """
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(self):
            raise ValueError(f"FeatureBank.sample: n must be an integer in [1, {len(self)}], got {n!r}")
        idx = torch.randperm(len(self), generator=generator)[:n]
        return self.features[idx.to(self.features.device)]

    def save(self, path: str | Path) -> None:
        """Write the bank atomically as safetensors, with the key in the metadata."""
        with atomic_path(path) as tmp:
            save_file(
                {_TENSOR_NAME: self.features.cpu()},
                str(tmp),
                metadata={"key": self.key, "n": str(len(self)), "dim": str(self.dim)},
            )

    @classmethod
    def load(cls, path: str | Path, key: str | None = None) -> FeatureBank:
        """Read a bank written by :meth:`save`; if ``key`` is given it must match the stored key."""
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            stored = metadata.get("key")
            if stored is None:
                raise ValueError(
                    f"feature bank cache {path}: no 'key' in metadata; delete the file to rebuild it"
                )
            if key is not None and stored != key:
                raise ValueError(
                    f"feature bank cache {path}: holds key {stored!r}, expected {key!r} "
                    "(stale file or hash collision); delete it or use another cache_dir"
                )
            features = f.get_tensor(_TENSOR_NAME)
        return cls(features, stored)

    @classmethod
    def build(
        cls,
        dataset: Dataset,
        feature_fn: Callable[[Tensor], Tensor],
        key: str,
        cache_dir: str | Path | None,
        batch_size: int = 256,
        device: torch.device | str = "cpu",
        progress: bool = False,
        num_workers: int = 0,
    ) -> FeatureBank:
        """Features of every image of ``dataset``, loaded from the cache when present.

        ``num_workers`` DataLoader processes decode images in parallel (large file-backed sets).

        Items of ``dataset`` are image tensors ``(C, H, W)`` in ``[-1, 1]`` or
        ``(image, label)`` tuples.  ``feature_fn`` maps a batch ``(B, C, H, W)`` on
        ``device`` to features ``(B, D)``; it is called under ``torch.no_grad`` and
        not at all when ``cache_dir`` already holds the features for ``key``.
        """
        if not isinstance(key, str) or not key:
            raise ValueError(f"FeatureBank.build: key must be a non-empty string, got {key!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"FeatureBank.build: batch_size must be an integer >= 1, got {batch_size!r}")
        path = cache_path(cache_dir, key) if cache_dir is not None else None
        if path is not None and path.exists():
            return cls.load(path, key=key)

        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        chunks: list[Tensor] = []
        seen = 0
        iterator: Iterable[Any] = loader
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(loader, desc=f"feature bank {key}", unit="batch")
        with torch.no_grad():
            for batch in iterator:
                images = _images_of(batch)
                if images.dim() != 4:
                    raise ValueError(
                        f"dataset: items must be images (C, H, W), got a batch of shape {tuple(images.shape)}"
                    )
                lo, hi = float(images.min()), float(images.max())
                if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
                    raise ValueError(
                        f"dataset: images must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]"
                    )
                feats = feature_fn(images.to(device))
                if not isinstance(feats, Tensor) or feats.dim() != 2 or feats.shape[0] != images.shape[0]:
                    got = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
                    raise ValueError(
                        f"feature_fn: expected features of shape ({images.shape[0]}, D) for a batch of "
                        f"{images.shape[0]} images, got {got}"
                    )
                chunks.append(feats.detach().to("cpu", torch.float32))
                seen += images.shape[0]
        if seen == 0:
            raise ValueError("FeatureBank.build: dataset is empty, expected at least 1 image")
        bank = cls(torch.cat(chunks, dim=0), key)
        if path is not None:
            bank.save(path)
        return bank
