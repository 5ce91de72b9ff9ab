"""Real-scale stand-ins: the real architectures and on-disk formats, with random weights.

Nothing here downloads anything. Every builder writes files in the format the real artefact has,
so the product's loaders run exactly as they would on a cluster node:

``write_hub_model(hub_cache, repo_id, unet_config, scheduler_config)``
    A Hugging Face hub-cache entry (``models--org--name/{refs/main, snapshots/<sha>/}``) holding a
    diffusers model laid out as ``google/ddpm-cifar10-32`` is on the Hub: ``config.json``,
    ``diffusion_pytorch_model.safetensors`` (``UNet2DModel.save_pretrained``) and
    ``scheduler_config.json`` at the root. With ``HF_HUB_CACHE`` pointing at ``hub_cache``,
    ``model.path: google/ddpm-cifar10-32`` resolves to it unchanged.
``CIFAR10_UNET_CONFIG`` / ``CIFAR10_SCHEDULER_CONFIG``
    The Hub's ``google/ddpm-cifar10-32`` configs, key for key (35.7M parameters).
``church_unet_config(sample_size, width)`` / ``CHURCH_SCHEDULER_CONFIG``
    ``google/ddpm-ema-church-256``'s config (blocks, layers, attention at the 5th level, norm,
    time embedding) at a reduced ``sample_size``; ``width=128`` keeps the Hub's channels
    (128, 128, 256, 256, 512, 512; 113.7M parameters), a smaller width keeps the pattern.
``write_inception_torchscript(path)``
    A small random TorchScript module with the interface of clean-fid's
    ``inception-2015-12-05.pt``: ``forward(img, return_features=False, ...)`` on [0, 255] images
    of any size (resized to 299 inside) returning (N, 2048) features or (N, 1008) logits, and a
    ``layers`` submodule taking normalised 299x299 images to (N, 2048, 1, 1), as
    ``cleanfid.inception_torchscript.InceptionV3W`` uses it.
``write_clip_weights(path, arch)``
    ``open_clip.create_model(arch, pretrained=None).state_dict()`` saved with ``torch.save``
    (the format of the Hub's ``open_clip_pytorch_model.bin``), loadable with
    ``open_clip.create_model(arch, pretrained=path)``.
``write_cifar10_python(root, per_batch, test)``
    ``cifar-10-batches-py/`` with ``data_batch_1..5``, ``test_batch``, ``batches.meta`` and
    ``readme.html``, pickled as the originals were (Python 2 protocol 2: byte-string keys and
    values, numpy 1.x ``numpy.core.multiarray._reconstruct``), so
    ``pickle.load(f, encoding="bytes")`` gives ``{b"data": uint8 (N, 3072), b"labels": [...]}``.
``write_lsun_lmdb(path, count, image_format)``
    An LSUN export directory (``data.mdb``, ``lock.mdb``): keys are 40-hex-digit image ids,
    values encoded images of varying size with a 256-pixel short side (LSUN's exports hold WebP;
    JPEG can be chosen).
``build_realscale(root)``
    All of the above under ``root``; returns a :class:`RealScale` with every path.

The pytest fixture ``realscale`` (session-scoped) builds one set under a temporary directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

CIFAR10_REPO = "google/ddpm-cifar10-32"
CHURCH_REPO = "google/ddpm-ema-church-256"
INCEPTION_FILENAME = "inception-2015-12-05.pt"
CLIP_FILENAME = "open_clip_vit_b_32_laion2b_s34b_b79k.bin"

CIFAR10_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}

CIFAR10_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.1.1",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_large",
}

CHURCH_SCHEDULER_CONFIG: dict[str, Any] = {**CIFAR10_SCHEDULER_CONFIG, "variance_type": "fixed_small"}


def church_unet_config(sample_size: int = 64, width: int = 128) -> dict[str, Any]:
    """``google/ddpm-ema-church-256``'s UNet config at ``sample_size`` (the Hub's is 256).

    ``width`` is the first level's channels; the Hub's multipliers (1, 1, 2, 2, 4, 4) are kept.
    """
    if width % 32:
        raise ValueError(f"width must be a multiple of 32 (norm_num_groups), got {width}")
    if sample_size % 32:
        raise ValueError(f"sample_size must be a multiple of 32 (five downsamplings), got {sample_size}")
    return {
        **CIFAR10_UNET_CONFIG,
        "block_out_channels": [width * m for m in (1, 1, 2, 2, 4, 4)],
        "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
        "sample_size": sample_size,
    }


# ----------------------------------------------------------------------------- diffusers models


def write_model_dir(
    directory: Path, unet_config: dict[str, Any], scheduler_config: dict[str, Any], *, seed: int = 0
) -> Path:
    """A flat diffusers model directory (as the Hub's google/ddpm-* repositories): random weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    kwargs = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    unet = UNet2DModel(**kwargs)
    directory.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(directory, safe_serialization=True)
    # save_pretrained writes the current diffusers' full config; keep the Hub's file, key for key
    (directory / "config.json").write_text(json.dumps(unet_config, indent=2) + "\n")
    (directory / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2) + "\n")
    return directory


def write_hub_model(
    hub_cache: Path,
    repo_id: str,
    unet_config: dict[str, Any],
    scheduler_config: dict[str, Any],
    *,
    seed: int = 0,
) -> Path:
    """A hub-cache entry for ``repo_id`` (refs/main -> snapshots/<sha>); returns the snapshot dir."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    sha = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = write_model_dir(repo / "snapshots" / sha, unet_config, scheduler_config, seed=seed)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "blobs").mkdir(exist_ok=True)
    return snapshot


# ----------------------------------------------------------------------------- Inception (clean-fid)


class _InceptionLayers(torch.nn.Module):
    """Stands in for the scripted Inception trunk: normalised 299x299 -> (N, 2048, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 32, kernel_size=13, stride=13)
        self.proj = torch.nn.Conv2d(32, 2048, kernel_size=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.proj(torch.relu(self.conv(x)))))


class _InceptionStandIn(torch.nn.Module):
    """clean-fid's ``inception-2015-12-05.pt`` call convention with a tiny random network."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _InceptionLayers()
        self.output = torch.nn.Linear(2048, 1008)

    def forward(
        self,
        img: torch.Tensor,
        return_features: bool = False,
        use_fp16: bool = False,
        no_output_bias: bool = False,
    ) -> torch.Tensor:
        batch_size, channels, height, width = img.shape
        assert channels == 3
        x = img.to(torch.float32)
        if height != 299 or width != 299:
            x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = (x - 128.0) / 128.0
        features = self.layers(x).reshape(batch_size, 2048)
        if return_features:
            return features
        if no_output_bias:
            return features @ self.output.weight.t()
        return self.output(features)


def write_inception_torchscript(path: Path, *, seed: int = 0) -> Path:
    """A TorchScript file with the interface of clean-fid's Inception (see module docstring)."""
    torch.manual_seed(seed)
    scripted = torch.jit.script(_InceptionStandIn().eval())
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(path))
    return path


# ----------------------------------------------------------------------------- CLIP (open_clip)


def write_clip_weights(path: Path, arch: str = "ViT-B-32", *, seed: int = 0) -> Path:
    """``open_clip.create_model(arch).state_dict()`` with ``torch.save`` (random weights)."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None, device="cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


# ----------------------------------------------------------------------------- CIFAR-10 python version


class _Py2Pickler(pickle._Pickler):  # type: ignore[misc]
    """Pickles bytes and str as Python 2 ``str`` (BINSTRING opcodes), as cPickle wrote CIFAR-10."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj: Any) -> bytes:
    """Protocol-2 pickle of ``obj`` as Python 2 + numpy 1.x wrote it (``numpy.core.multiarray``)."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # GLOBAL opcodes carry the module as newline-terminated text: safe to rename in place
    return (
        buf.getvalue()
        .replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        .replace(b"numpy._core.numeric\n", b"numpy.core.numeric\n")
    )


CIFAR10_LABELS = [
    b"airplane",
    b"automobile",
    b"bird",
    b"cat",
    b"deer",
    b"dog",
    b"frog",
    b"horse",
    b"ship",
    b"truck",
]


def _cifar_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` 32x32 RGB images (smooth random colour fields plus noise) as CIFAR rows (N, 3072)."""
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    out = np.empty((n, 3, 32, 32), dtype=np.float64)
    for i in range(n):
        for c in range(3):
            a, b, d = rng.uniform(-1, 1, size=3)
            out[i, c] = 128 + 80 * (a * xx + b * yy + d * xx * yy) + rng.normal(0, 20, size=(32, 32))
    return np.clip(out, 0, 255).astype(np.uint8).reshape(n, 3072)


def write_cifar10_python(root: Path, *, per_batch: int = 8, test: int = 8, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py`` with five training batches, a test batch and the metadata."""
    rng = np.random.default_rng(seed)
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True, exist_ok=True)
    batches = [(f"data_batch_{i}", f"training batch {i} of 5", per_batch) for i in range(1, 6)]
    batches.append(("test_batch", "testing batch 1 of 1", test))
    for name, label, n in batches:
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        batch = {
            b"batch_label": label.encode(),
            b"labels": labels,
            b"data": _cifar_images(n, rng),
            b"filenames": [
                f"{CIFAR10_LABELS[k].decode()}_s_{i:06d}.png".encode() for i, k in enumerate(labels)
            ],
        }
        (directory / name).write_bytes(py2_pickle(batch))
    meta = {b"num_cases_per_batch": per_batch, b"label_names": CIFAR10_LABELS, b"num_vis": 3072}
    (directory / "batches.meta").write_bytes(py2_pickle(meta))
    (directory / "readme.html").write_text(
        "<meta HTTP-EQUIV='REFRESH' content='0; url=https://www.cs.toronto.edu/~kriz/cifar.html'>\n"
    )
    return directory


# ----------------------------------------------------------------------------- LSUN LMDB


def write_lsun_lmdb(path: Path, *, count: int = 36, image_format: str = "webp", seed: int = 0) -> Path:
    """An LSUN LMDB export at ``path`` (e.g. ``.../church_outdoor_train_lmdb``)."""
    import lmdb
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 28, subdir=True)
    with env.begin(write=True) as txn:
        for i in range(count):
            long_side = int(rng.integers(256, 400))
            w, h = (long_side, 256) if i % 2 == 0 else (256, long_side)
            yy, xx = np.mgrid[0:h, 0:w]
            base = rng.uniform(0, 255, size=3)
            img = np.stack(
                [
                    base[c] * 0.5 + 60 * np.sin(xx / rng.uniform(8, 40) + yy / rng.uniform(8, 40) + c)
                    for c in range(3)
                ],
                axis=-1,
            )
            img = np.clip(img + rng.normal(0, 10, img.shape) + 64, 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format=image_format.upper(), quality=75)
            key = hashlib.sha1(f"church-{seed}-{i}".encode()).hexdigest().encode()
            txn.put(key, buf.getvalue())
    env.close()
    return path


# ----------------------------------------------------------------------------- everything


@dataclass(frozen=True)
class RealScale:
    """Paths of one real-scale set (see :func:`build_realscale`)."""

    root: Path
    hub_cache: Path  # set HF_HUB_CACHE to this
    cifar10_model: Path  # snapshot dir of google/ddpm-cifar10-32
    church_model: Path  # snapshot dir of google/ddpm-ema-church-256 (reduced size)
    church_sample_size: int
    church_width: int
    inception: Path  # .../inception-2015-12-05.pt
    clip: Path  # .../open_clip_vit_b_32_laion2b_s34b_b79k.bin
    clip_arch: str
    cifar10: Path  # .../cifar-10-batches-py
    lsun: Path  # .../church_outdoor_train_lmdb
    cache: Path  # an empty directory for pretrain.cache_dir (banks, reference statistics)

    def env(self) -> dict[str, str]:
        """Environment a process needs to find the models by their repository ids (offline)."""
        return {"HF_HUB_CACHE": str(self.hub_cache), "HF_HUB_OFFLINE": "1"}


def build_realscale(
    root: Path,
    *,
    church_sample_size: int = 64,
    church_width: int = 128,
    cifar_per_batch: int = 8,
    cifar_test: int = 8,
    lsun_count: int = 36,
    lsun_format: str = "webp",
    clip_arch: str = "ViT-B-32",
) -> RealScale:
    """Write every real-scale stand-in under ``root`` (about 1.2 GB with ViT-B-32 and width 128)."""
    hub = root / "hf" / "hub"
    weights = root / "weights"
    return RealScale(
        root=root,
        hub_cache=hub,
        cifar10_model=write_hub_model(hub, CIFAR10_REPO, CIFAR10_UNET_CONFIG, CIFAR10_SCHEDULER_CONFIG),
        church_model=write_hub_model(
            hub,
            CHURCH_REPO,
            church_unet_config(church_sample_size, church_width),
            CHURCH_SCHEDULER_CONFIG,
            seed=1,
        ),
        church_sample_size=church_sample_size,
        church_width=church_width,
        inception=write_inception_torchscript(weights / INCEPTION_FILENAME),
        clip=write_clip_weights(weights / CLIP_FILENAME, clip_arch),
        clip_arch=clip_arch,
        cifar10=write_cifar10_python(root / "cifar10", per_batch=cifar_per_batch, test=cifar_test),
        lsun=write_lsun_lmdb(
            root / "lsun" / "church_outdoor_train_lmdb", count=lsun_count, image_format=lsun_format
        ),
        cache=(root / "cache"),
    )


@pytest.fixture(scope="session")
def realscale(tmp_path_factory: pytest.TempPathFactory) -> RealScale:
    """One real-scale set for the session: the exact CIFAR-10 DDPM; the church DDPM's architecture at
    32x32 and half the Hub's width (64: channels 64, 64, 128, 128, 256, 256; 28M parameters)."""
    return build_realscale(tmp_path_factory.mktemp("realscale"), church_sample_size=32, church_width=64)


if __name__ == "__main__":  # build one by hand: python tests/realscale_fixture.py /tmp/somewhere
    import sys
    import time

    t0 = time.time()
    print(build_realscale(Path(sys.argv[1])), f"{time.time() - t0:.1f} s")
