"""Data layer: image datasets for MMD-DDM fine-tuning.

Every dataset built here yields ``(image, label)`` pairs where ``image`` is a
``float32`` tensor of shape ``(C, H, W)`` with ``H == W == resolution`` and
values in ``[-1, 1]``, and ``label`` is a Python ``int`` (``-1`` when the data
has no labels).

Registered datasets (see :data:`DATASETS`):

``digits``
    scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes),
    resized with bilinear interpolation (antialiased when downsampling).
    Held in memory. Splits: ``train`` (the first 80% of a permutation seeded
    by ``seed``), ``test`` (the remaining 20%) and ``all``.
``image_folder``
    Any directory tree of PNG/JPEG files (extensions matched case-insensitively,
    searched recursively, hidden files and directories skipped, sorted by
    relative path). Resized so the shorter side equals ``resolution`` with PIL
    ``BICUBIC`` (which is antialiased when downsampling), then centre-cropped.
    Loaded lazily. Labels are ``-1``. If ``root/<split>`` is a directory it
    is used for that split; otherwise ``train`` and ``all`` mean the whole tree.
``celeba``
    The aligned CelebA JPEGs (``img_align_celeba``, 178x218 pixels):
    centre crop 140x140, then resize to ``resolution`` with PIL ``BILINEAR``
    (antialiased; equal to torchvision's ``CenterCrop(140)`` + ``Resize``).
    Loaded lazily. Labels are ``-1``. ``root`` is the JPEG folder or its
    parent. Splits follow ``list_eval_partition.txt`` (or ``.csv``) found in
    either; without it ``train`` is every image and ``valid``/``test`` fail.
``cifar10``
    The CIFAR-10 python version (``cifar-10-batches-py``). Resized with PIL
    ``BICUBIC`` when ``resolution != 32``. Labels are the CIFAR classes.
    ``root`` is that directory or its parent. The uint8 pixels of a split are
    held in memory (150 MB for train); pickles are read with an unpickler that
    only rebuilds numpy arrays.
``lsun``
    An LSUN LMDB export (e.g. ``church_outdoor_train_lmdb``) read lazily with
    the optional ``lmdb`` package; images are decoded with PIL, resized so the
    shorter side equals ``resolution`` (``BICUBIC``) and centre-cropped.
    Labels are ``-1``. ``root`` is the LMDB directory (holding ``data.mdb``)
    or a parent holding exactly one ``*_<split>_lmdb`` directory.

``max_images`` always keeps the *first* N items of the split in its canonical
order (sorted relative paths, LMDB key order, CIFAR batch order, ascending
digit index); it never samples randomly.

Problems with paths or formats raise :class:`DatasetError` (a ``ValueError``)
or :class:`DatasetNotFoundError` (also a ``FileNotFoundError``) with a
one-line message naming the offending path or value and what was expected.
Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "CELEBA_CROP",
    "CIFAR10_TEST_FILES",
    "CIFAR10_TRAIN_FILES",
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "CIFAR10Dataset",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetRequest",
    "DatasetSpec",
    "ImageDataset",
    "ImageFileDataset",
    "InMemoryImageDataset",
    "LSUNDataset",
    "build_dataset",
    "celeba_crop_resize",
    "center_crop",
    "check_dataset",
    "dataset_id",
    "list_image_files",
    "load_tensor",
    "pil_to_tensor",
    "resize_center_crop",
]

#: File name suffixes (lower case) recognised as images by ``image_folder``/``celeba``.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")
#: Side of the square centre crop applied to aligned CelebA images before resizing.
CELEBA_CROP = 140
CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES: tuple[str, ...] = ("test_batch",)
CELEBA_DIRNAME = "img_align_celeba"
CELEBA_PARTITION_FILES: tuple[str, ...] = ("list_eval_partition.txt", "list_eval_partition.csv")
DIGITS_TRAIN_FRACTION = 0.8

_CIFAR_HINT = (
    "expected the CIFAR-10 python directory cifar-10-batches-py "
    "(download cifar-10-python.tar.gz from the CIFAR-10 site and extract it)"
)
_CELEBA_HINT = (
    "expected the aligned CelebA JPEG folder img_align_celeba or its parent "
    "(download img_align_celeba.zip from the CelebA site and extract it)"
)
_LSUN_HINT = (
    "expected an LSUN LMDB directory containing data.mdb, e.g. church_outdoor_train_lmdb, "
    "or its parent (export it with the LSUN download script and unzip it)"
)
_FOLDER_HINT = "expected a directory tree containing PNG or JPEG images"


class DatasetError(ValueError):
    """A dataset name, option, path or on-disk format is invalid."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A path that a dataset needs does not exist."""


# ---------------------------------------------------------------------------
# Image helpers
# ---------------------------------------------------------------------------


def _crop_offset(size: int, crop: int) -> int:
    """Return the start of a centred window of length ``crop`` in ``size`` (torchvision rounding)."""
    return int(round((size - crop) / 2.0))


def center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Crop the centred ``width`` x ``height`` window out of ``image``."""
    left = _crop_offset(image.width, width)
    top = _crop_offset(image.height, height)
    return image.crop((left, top, left + width, top + height))


def resize_center_crop(
    image: Image.Image, resolution: int, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    """Resize so the shorter side equals ``resolution``, then centre-crop a square.

    PIL's resampling filters widen their support when downsampling, so the
    result is antialiased.
    """
    scale = resolution / min(image.width, image.height)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, resample)
    return center_crop(image, resolution, resolution)


def celeba_crop_resize(image: Image.Image, resolution: int, source: str = "image") -> Image.Image:
    """Apply the CelebA-64 preprocessing: centre crop 140x140, then bilinear resize.

    Raises :class:`DatasetError` when ``image`` is smaller than the crop.
    """
    if image.width < CELEBA_CROP or image.height < CELEBA_CROP:
        raise DatasetError(
            f"{source}: image is {image.width}x{image.height}; expected an aligned CelebA image "
            f"of at least {CELEBA_CROP}x{CELEBA_CROP} (178x218)"
        )
    image = center_crop(image, CELEBA_CROP, CELEBA_CROP)
    if resolution != CELEBA_CROP:
        image = image.resize((resolution, resolution), Image.Resampling.BILINEAR)
    return image


def pil_to_tensor(image: Image.Image) -> Tensor:
    """Convert an ``L`` or ``RGB`` PIL image to a float32 CHW tensor in ``[-1, 1]``."""
    array = np.array(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    array = array / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


ALPHA_BACKGROUND = 255
"""Grey level (0-255) that transparent pixels are composited on: white, as image viewers show them."""


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert a decoded image of any mode PNG/JPEG can hold to ``L`` or ``RGB``, as displayed.

    - EXIF orientation is applied (a JPEG is used as it is displayed, not as it is stored);
    - transparency (``RGBA``, ``LA``, ``PA``, ``P``/``L``/``RGB`` with a ``transparency`` entry) is
      composited over :data:`ALPHA_BACKGROUND` (white), never dropped;
    - 16-bit and 32-bit integer greyscale (``I;16``, ``I``) is scaled to 8 bits (``v * 255 / 65535``),
      not clipped as PIL's own ``convert`` does; ``F`` is rounded and clipped to [0, 255];
    - ``CMYK`` (incl. Adobe's inverted JPEGs, which PIL undoes on decoding), ``YCbCr``, ``1`` and
      palette images go through PIL's conversion to ``RGB``; ``RGB`` -> ``L`` uses ITU-R 601-2 luma.
    """
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(array * 255.0 / 65535.0), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), "L")
    if "transparency" in image.info and image.mode in ("P", "L", "RGB"):
        image = image.convert("RGBA" if image.mode != "L" else "LA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (ALPHA_BACKGROUND,) * 3 + (255,))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == mode:
        return image.copy()
    if mode == "L" and image.mode not in ("RGB", "1", "L"):
        image = image.convert("RGB")
    return image.convert(mode)


def _decode_image(data: bytes | Path, source: str, mode: str) -> Image.Image:
    """Decode an encoded image (bytes or a file) and convert it to ``mode`` (see :func:`to_mode`)."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            image.load()
            return to_mode(image, mode)
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(
            f"{source}: does not exist; expected the image listed when the dataset was built"
        ) from exc
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        AttributeError,
        EOFError,
        IndexError,
        TypeError,
        struct.error,
        zlib.error,
    ) as exc:  # fmt: skip  (a corrupt PNG chunk surfaces as AttributeError/struct.error inside PIL)
        raise DatasetError(
            f"{source}: cannot decode image ({exc}); expected a PNG, JPEG or WebP image"
        ) from exc


def _image_mode(channels: int) -> str:
    """Return the PIL mode for a channel count (1 -> ``L``, 3 -> ``RGB``)."""
    return "L" if channels == 1 else "RGB"


# ---------------------------------------------------------------------------
# Dataset classes
# ---------------------------------------------------------------------------


class ImageDataset(Dataset[tuple[Tensor, int]]):
    """Map-style dataset of ``(image, label)`` pairs with a known length (base of all datasets here)."""

    def __len__(self) -> int:
        """Return the number of items."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Return the float32 CHW image in [-1, 1] and the int label (-1 if unknown) of item ``index``."""
        raise NotImplementedError


class InMemoryImageDataset(ImageDataset):
    """Images already preprocessed into one ``(N, C, H, W)`` tensor, with ``(N,)`` labels."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        """Store ``images`` (float32 in [-1, 1]) and integer ``labels`` of equal length."""
        if images.ndim != 4 or labels.shape != (images.shape[0],):
            raise DatasetError(
                f"images/labels: shapes {tuple(images.shape)} and {tuple(labels.shape)}; "
                "expected (N, C, H, W) and (N,)"
            )
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        """Return the number of images."""
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Return image ``index`` and its label."""
        return self.images[index], int(self.labels[index])


class ImageFileDataset(ImageDataset):
    """Lazily decoded image files; only the path list is held in memory."""

    def __init__(
        self,
        files: list[Path],
        resolution: int,
        channels: int = 3,
        crop: Literal["shorter_side", "celeba"] = "shorter_side",
    ) -> None:
        """Keep ``files`` and how to preprocess them (``crop`` picks the resize/crop rule)."""
        self.files = [str(path) for path in files]
        self.resolution = resolution
        self.channels = channels
        self.crop = crop

    def __len__(self) -> int:
        """Return the number of image files."""
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Decode, crop and resize file ``index``; the label is always ``-1``."""
        path = self.files[index]
        image = _decode_image(Path(path), path, _image_mode(self.channels))
        if self.crop == "celeba":
            image = celeba_crop_resize(image, self.resolution, path)
        else:
            image = resize_center_crop(image, self.resolution)
        return pil_to_tensor(image), -1


class CIFAR10Dataset(ImageDataset):
    """CIFAR-10 pixels kept as ``uint8`` (N, 32, 32, 3) in memory, converted per item."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, resolution: int, channels: int = 3) -> None:
        """Store HWC ``uint8`` pixels and integer labels; resize to ``resolution`` on access."""
        self.pixels = pixels
        self.labels = labels
        self.resolution = resolution
        self.channels = channels

    def __len__(self) -> int:
        """Return the number of images."""
        return int(self.pixels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Return image ``index`` (resized with BICUBIC if needed) and its class."""
        image = Image.fromarray(self.pixels[index])
        if self.channels == 1:
            image = image.convert("L")
        if self.resolution != image.width:
            image = image.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        return pil_to_tensor(image), int(self.labels[index])


class LSUNDataset(ImageDataset):
    """Lazy reader of an LSUN LMDB export; safe to pickle and to use in DataLoader workers.

    The key list is read once at construction. The LMDB environment is opened
    on first access in each process (read-only, ``lock=False``,
    ``readahead=False``), shared by every dataset on the same directory in
    that process (``lmdb`` refuses to open one environment twice), and never
    pickled. A forked worker closes its inherited copy and opens its own.
    """

    def __init__(self, path: Path, keys: list[bytes], resolution: int, channels: int = 3) -> None:
        """Keep the LMDB directory ``path`` and the ``keys`` to serve, in order."""
        self.path = str(path)
        self.keys = keys
        self.resolution = resolution
        self.channels = channels

    def __len__(self) -> int:
        """Return the number of images."""
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Read, decode, resize and centre-crop entry ``index``; the label is ``-1``."""
        key = self.keys[index]
        with _shared_lmdb(Path(self.path)).begin(write=False) as txn:
            value = txn.get(key)
        source = f"{self.path}[{key.decode(errors='replace')}]"
        if value is None:
            raise DatasetError(
                f"{source}: key is missing; expected the LMDB to be unchanged since it was opened"
            )
        image = _decode_image(bytes(value), source, _image_mode(self.channels))
        return pil_to_tensor(resize_center_crop(image, self.resolution)), -1


# ---------------------------------------------------------------------------
# Requests, validation and fingerprints
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetRequest:
    """Validated arguments of :func:`build_dataset` / :func:`dataset_id`."""

    name: str
    root: Path | None
    resolution: int
    split: str
    max_images: int | None
    seed: int
    channels: int


def _fingerprint(parts: Iterable[str]) -> str:
    """Return a short stable hash of ``parts``."""
    digest = hashlib.sha1()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:12]


def _require_root(root: Path | None, hint: str) -> Path:
    """Return ``root`` if it exists, else raise a clear error including ``hint``."""
    if root is None:
        raise DatasetError(f"data.root: not set; {hint}")
    if not root.exists():
        raise DatasetNotFoundError(f"data.root: {root} does not exist; {hint}")
    return root


def _require_dir(root: Path | None, hint: str) -> Path:
    """Return ``root`` if it is an existing directory, else raise a clear error."""
    path = _require_root(root, hint)
    if not path.is_dir():
        raise DatasetError(f"data.root: {path} is a file, not a directory; {hint}")
    return path


def _limit(items: list[Any], max_images: int | None) -> list[Any]:
    """Keep the first ``max_images`` items (all when ``None``)."""
    return items if max_images is None else items[:max_images]


def _check_split(spec: DatasetSpec, split: str) -> None:
    """Raise unless ``split`` is one of the dataset's splits."""
    if split not in spec.splits:
        raise DatasetError(
            f"data.split: {split!r} is not a split of {spec.name!r}; expected one of {list(spec.splits)}"
        )


# --- digits -----------------------------------------------------------------


def _digits_indices(count: int, split: str, seed: int) -> np.ndarray:
    """Return sorted indices of a digits split (train = first 80% of a seeded permutation)."""
    if split == "all":
        return np.arange(count)
    permutation = np.random.default_rng(seed).permutation(count)
    n_train = int(round(DIGITS_TRAIN_FRACTION * count))
    part = permutation[:n_train] if split == "train" else permutation[n_train:]
    return np.sort(part)


def _load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's digits as ``(1797, 8, 8)`` floats in 0..16 and ``(1797,)`` labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetError(
            "dataset 'digits' needs scikit-learn; install it with pip install scikit-learn"
        ) from exc
    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float32), np.asarray(bunch.target, dtype=np.int64)


def _build_digits(request: DatasetRequest) -> ImageDataset:
    """Build the in-memory digits dataset described by ``request``."""
    images, labels = _load_digits_arrays()
    indices = _limit(list(_digits_indices(len(images), request.split, request.seed)), request.max_images)
    x = torch.from_numpy(images[indices]).unsqueeze(1) / 8.0 - 1.0
    if request.resolution != x.shape[-1]:
        downsampling = request.resolution < x.shape[-1]
        x = F.interpolate(
            x, size=(request.resolution,) * 2, mode="bilinear", align_corners=False, antialias=downsampling
        )
    x = x.clamp(-1.0, 1.0).repeat(1, request.channels, 1, 1).contiguous()
    return InMemoryImageDataset(x, torch.from_numpy(labels[indices]))


def _check_digits(root: Path | None, split: str) -> None:
    """Check that scikit-learn (which bundles the digits) is importable."""
    del root, split
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError as exc:
        raise DatasetError(
            "dataset 'digits' needs scikit-learn; install it with pip install scikit-learn"
        ) from exc


def _fingerprint_digits(request: DatasetRequest) -> str:
    """Digits are bundled and fixed; only the seeded split changes the content."""
    seed = "" if request.split == "all" else f"seed={request.seed}"
    return _fingerprint(["sklearn-digits-1797", seed])


# --- image folders ----------------------------------------------------------


def list_image_files(root: Path) -> list[Path]:
    """List PNG/JPEG files under ``root`` recursively, sorted by relative path; skip hidden entries."""
    found: list[tuple[str, Path]] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                path = Path(directory, name)
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def _folder_split_root(root: Path, split: str) -> Path:
    """Use ``root/<split>`` when it exists; otherwise the whole tree (``train``/``all`` only)."""
    candidate = root / split
    if split != "all" and candidate.is_dir():
        return candidate
    if split in ("train", "all"):
        return root
    raise DatasetNotFoundError(
        f"data.root: {candidate} does not exist; expected a {split!r} subdirectory for split {split!r} "
        "(or use split 'train'/'all' for the whole tree)"
    )


def _folder_files(root: Path | None, split: str, max_images: int | None) -> list[Path]:
    """Return the (limited) image files of an ``image_folder`` split; raise if there are none."""
    base = _folder_split_root(_require_dir(root, _FOLDER_HINT), split)
    files = list_image_files(base)
    if not files:
        raise DatasetError(f"data.root: {base} contains no .png/.jpg/.jpeg files; {_FOLDER_HINT}")
    return _limit(files, max_images)


def _probe_image(path: Path, hint: str) -> Image.Image:
    """Open ``path`` lazily (header only) to check it is a readable image."""
    try:
        with Image.open(path) as image:
            return image
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read image header ({exc}); {hint}") from exc


def _build_image_folder(request: DatasetRequest) -> ImageDataset:
    """Build a lazy ``image_folder`` dataset."""
    files = _folder_files(request.root, request.split, request.max_images)
    return ImageFileDataset(files, request.resolution, request.channels, "shorter_side")


def _check_image_folder(root: Path | None, split: str) -> None:
    """Check the folder exists, holds images, and the first one has a readable header."""
    _probe_image(_folder_files(root, split, None)[0], _FOLDER_HINT)


def _files_fingerprint(files: list[Path], base: Path) -> str:
    """Hash relative paths and byte sizes of ``files`` (cheap: one ``stat`` per file)."""
    parts = [f"{len(files)}"]
    parts.extend(f"{path.relative_to(base).as_posix()}:{path.stat().st_size}" for path in files)
    return _fingerprint(parts)


def _fingerprint_image_folder(request: DatasetRequest) -> str:
    """Fingerprint the selected files of an ``image_folder`` split."""
    files = _folder_files(request.root, request.split, request.max_images)
    assert request.root is not None
    return _files_fingerprint(files, request.root)


# --- CelebA -----------------------------------------------------------------


def _celeba_dir(root: Path | None) -> Path:
    """Return the folder holding the CelebA JPEGs (``root`` or ``root/img_align_celeba``)."""
    path = _require_dir(root, _CELEBA_HINT)
    nested = path / CELEBA_DIRNAME
    return nested if nested.is_dir() else path


def _read_celeba_partition(path: Path) -> dict[str, int]:
    """Parse ``list_eval_partition`` (txt ``name part`` or csv ``image_id,partition``)."""
    partition: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.replace(",", " ").split()
        if not fields or fields[0] == "image_id":
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DatasetError(f"{path}:{number}: {line!r}; expected '<image>.jpg <0|1|2>'")
        partition[fields[0]] = int(fields[1])
    return partition


def _celeba_files(root: Path | None, split: str, max_images: int | None) -> list[Path]:
    """Return the (limited) JPEGs of a CelebA split, using ``list_eval_partition`` if present."""
    folder = _celeba_dir(root)
    files = list_image_files(folder)
    if not files:
        raise DatasetError(f"data.root: {folder} contains no .jpg images; {_CELEBA_HINT}")
    if split != "all":
        part_file = next(
            (d / n for d in (folder, folder.parent) for n in CELEBA_PARTITION_FILES if (d / n).is_file()),
            None,
        )
        if part_file is None and split != "train":
            raise DatasetNotFoundError(
                f"data.root: {folder.parent / CELEBA_PARTITION_FILES[0]} does not exist; "
                f"expected the CelebA list_eval_partition.txt for split {split!r}"
            )
        if part_file is not None:
            wanted = {"train": 0, "valid": 1, "test": 2}[split]
            partition = _read_celeba_partition(part_file)
            files = [path for path in files if partition.get(path.name) == wanted]
            if not files:
                raise DatasetError(
                    f"{part_file}: lists no image of {folder} for split {split!r}; {_CELEBA_HINT}"
                )
    return _limit(files, max_images)


def _build_celeba(request: DatasetRequest) -> ImageDataset:
    """Build a lazy CelebA dataset (centre crop 140, then resize)."""
    files = _celeba_files(request.root, request.split, request.max_images)
    return ImageFileDataset(files, request.resolution, request.channels, "celeba")


def _check_celeba(root: Path | None, split: str) -> None:
    """Check the CelebA folder exists, has JPEGs, and the first is at least 140x140."""
    files = _celeba_files(root, split, None)
    image = _probe_image(files[0], _CELEBA_HINT)
    if min(image.size) < CELEBA_CROP:
        raise DatasetError(
            f"{files[0]}: image is {image.width}x{image.height}; expected aligned CelebA images of 178x218"
        )


def _fingerprint_celeba(request: DatasetRequest) -> str:
    """Fingerprint the selected CelebA files."""
    folder = _celeba_dir(request.root)
    return _files_fingerprint(_celeba_files(request.root, request.split, request.max_images), folder)


# --- CIFAR-10 ---------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only reconstructs numpy arrays (the CIFAR pickles hold nothing else)."""

    _ALLOWED = {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only allow-listed globals; map numpy 1.x ``numpy.core`` to ``numpy._core``."""
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _cifar_dir(root: Path | None) -> Path:
    """Return the ``cifar-10-batches-py`` directory (``root`` itself or ``root/cifar-10-batches-py``)."""
    path = _require_dir(root, _CIFAR_HINT)
    nested = path / CIFAR10_DIRNAME
    if nested.is_dir():
        return nested
    if (path / CIFAR10_TRAIN_FILES[0]).exists() or (path / CIFAR10_TEST_FILES[0]).exists():
        return path
    raise DatasetNotFoundError(f"data.root: {path} has no {CIFAR10_DIRNAME} or data_batch_1; {_CIFAR_HINT}")


def _cifar_split_files(directory: Path, split: str) -> list[Path]:
    """Return the batch files of ``split``, checking that each exists and is a pickle."""
    names = {
        "train": CIFAR10_TRAIN_FILES,
        "test": CIFAR10_TEST_FILES,
        "all": CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES,
    }[split]
    files = [directory / name for name in names]
    for path in files:
        if not path.is_file():
            raise DatasetNotFoundError(f"data.root: {path} does not exist; {_CIFAR_HINT}")
        with path.open("rb") as handle:
            if handle.read(1) != b"\x80":
                raise DatasetError(
                    f"{path}: not a Python pickle; expected the CIFAR-10 python version, "
                    "not the binary or MATLAB version"
                )
    return files


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load one batch as HWC ``uint8`` pixels (R, G, B planes of 1024 row-major values) and labels."""
    try:
        with path.open("rb") as handle:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DatasetError(f"{path}: cannot unpickle ({exc}); {_CIFAR_HINT}") from exc
    if not isinstance(batch, dict):
        raise DatasetError(
            f"{path}: holds {type(batch).__name__}; expected a dict with b'data' and b'labels'"
        )
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: b'data' is {got}; expected a uint8 array of shape (N, 3072)")
    if labels is None or len(labels) != data.shape[0]:
        raise DatasetError(f"{path}: b'labels' missing or of wrong length; expected {data.shape[0]} labels")
    pixels = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(pixels), np.asarray(labels, dtype=np.int64)


def _build_cifar10(request: DatasetRequest) -> ImageDataset:
    """Load the CIFAR-10 batches of a split (stopping once ``max_images`` are loaded)."""
    pixels: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    loaded = 0
    for path in _cifar_split_files(_cifar_dir(request.root), request.split):
        if request.max_images is not None and loaded >= request.max_images:
            break
        batch_pixels, batch_labels = _load_cifar_batch(path)
        pixels.append(batch_pixels)
        labels.append(batch_labels)
        loaded += len(batch_labels)
    all_pixels = np.concatenate(pixels)[: request.max_images]
    all_labels = np.concatenate(labels)[: request.max_images]
    return CIFAR10Dataset(np.ascontiguousarray(all_pixels), all_labels, request.resolution, request.channels)


def _check_cifar10(root: Path | None, split: str) -> None:
    """Check the CIFAR-10 directory and the batch files of ``split`` (without unpickling)."""
    _cifar_split_files(_cifar_dir(root), split)


def _fingerprint_cifar10(request: DatasetRequest) -> str:
    """Fingerprint the CIFAR-10 batch files of a split by name and size."""
    files = _cifar_split_files(_cifar_dir(request.root), request.split)
    return _fingerprint(f"{path.name}:{path.stat().st_size}" for path in files)


# --- LSUN -------------------------------------------------------------------


def _import_lmdb() -> ModuleType:
    """Import the optional ``lmdb`` package or raise a clear install hint."""
    try:
        import lmdb
    except ImportError as exc:
        raise DatasetError(
            "dataset 'lsun' needs the lmdb package; install it with pip install 'mmdsweep[lsun]'"
        ) from exc
    return lmdb


def _open_lmdb(path: Path) -> Any:
    """Open an LMDB directory read-only without locking or readahead."""
    lmdb = _import_lmdb()
    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False, subdir=True)
    except lmdb.Error as exc:
        raise DatasetError(f"{path}: cannot open LMDB ({exc}); {_LSUN_HINT}") from exc


#: Open LMDB environments of this process: identity of data.mdb -> (pid that opened it, environment).
_LMDB_ENVS: dict[tuple[str, int, int], tuple[int, Any]] = {}
_LMDB_LOCK = threading.Lock()


def _lmdb_identity(path: Path) -> tuple[str, int, int]:
    """Identify an LMDB by resolved path and ``data.mdb`` device/inode (a re-created LMDB differs)."""
    try:
        stat = (path / "data.mdb").stat()
    except OSError as exc:
        raise DatasetNotFoundError(f"{path / 'data.mdb'} does not exist; {_LSUN_HINT}") from exc
    return os.path.realpath(path), stat.st_dev, stat.st_ino


def _shared_lmdb(path: Path) -> Any:
    """Return this process's cached environment for ``path``, opening it on first use.

    After a fork the inherited environment belongs to the parent: the child
    closes its copy (only its own mapping and descriptors) and opens a new one.
    """
    key = _lmdb_identity(path)
    pid = os.getpid()
    with _LMDB_LOCK:
        cached = _LMDB_ENVS.get(key)
        if cached is not None and cached[0] == pid:
            return cached[1]
        if cached is not None:
            _LMDB_ENVS.pop(key)
            cached[1].close()
        env = _open_lmdb(path)
        _LMDB_ENVS[key] = (pid, env)
        return env


@contextlib.contextmanager
def _lmdb_env(path: Path) -> Iterator[Any]:
    """Yield the shared environment if this process has one, else a temporary one closed on exit."""
    if _lmdb_identity(path) in _LMDB_ENVS:
        yield _shared_lmdb(path)
        return
    env = _open_lmdb(path)
    try:
        yield env
    finally:
        env.close()


def _lsun_dir(root: Path | None, split: str) -> Path:
    """Return the LMDB directory: ``root`` itself, or the one ``*_<split>_lmdb`` inside it."""
    path = _require_dir(root, _LSUN_HINT)
    if (path / "data.mdb").is_file():
        match = re.search(r"_(train|val|test)_lmdb$", path.name)
        if match and split not in (match.group(1), "all"):
            raise DatasetError(
                f"data.root: {path} is the {match.group(1)!r} LMDB; expected one for split {split!r}"
            )
        return path
    candidates = sorted(p for p in path.glob(f"*{split}_lmdb") if (p / "data.mdb").is_file())
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise DatasetError(
            f"data.root: {path} holds several {split} LMDBs ({names}); expected root to name one"
        )
    raise DatasetNotFoundError(
        f"data.root: {path} has no data.mdb nor a *_{split}_lmdb directory; {_LSUN_HINT}"
    )


def _lmdb_entries(path: Path) -> int:
    """Return the number of entries in the LMDB at ``path``."""
    with _lmdb_env(path) as env:
        return int(env.stat()["entries"])


def _read_lmdb_keys(path: Path, limit: int | None) -> list[bytes]:
    """Read up to ``limit`` keys (in LMDB's sorted order) without touching the values."""
    keys: list[bytes] = []
    with _lmdb_env(path) as env, env.begin(write=False) as txn:
        for key in txn.cursor().iternext(keys=True, values=False):
            if limit is not None and len(keys) >= limit:
                break
            keys.append(bytes(key))
    return keys


def _build_lsun(request: DatasetRequest) -> ImageDataset:
    """Build a lazy LSUN dataset over the first ``max_images`` keys."""
    path = _lsun_dir(request.root, request.split)
    keys = _read_lmdb_keys(path, request.max_images)
    if not keys:
        raise DatasetError(f"{path}: LMDB is empty; {_LSUN_HINT}")
    return LSUNDataset(path, keys, request.resolution, request.channels)


def _check_lsun(root: Path | None, split: str) -> None:
    """Check lmdb is installed and the LMDB opens and is non-empty (reads only its header)."""
    _import_lmdb()
    path = _lsun_dir(root, split)
    if _lmdb_entries(path) == 0:
        raise DatasetError(f"{path}: LMDB is empty; {_LSUN_HINT}")


def _fingerprint_lsun(request: DatasetRequest) -> str:
    """Fingerprint an LMDB by entry count and ``data.mdb`` size."""
    path = _lsun_dir(request.root, request.split)
    return _fingerprint([f"entries={_lmdb_entries(path)}", f"size={(path / 'data.mdb').stat().st_size}"])


# ---------------------------------------------------------------------------
# Registry and public entry points
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """How to build, check and fingerprint one registered dataset."""

    name: str
    description: str
    splits: tuple[str, ...]
    default_resolution: int | None
    default_channels: int
    needs_root: bool
    build: Callable[[DatasetRequest], ImageDataset]
    check: Callable[[Path | None, str], None]
    fingerprint: Callable[[DatasetRequest], str]


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "digits",
            "scikit-learn's 1797 8x8 handwritten digits (bundled, in memory)",
            ("train", "test", "all"),
            16,
            1,
            False,
            _build_digits,
            _check_digits,
            _fingerprint_digits,
        ),
        DatasetSpec(
            "image_folder",
            "a directory tree of PNG/JPEG images (shorter side resize + centre crop)",
            ("train", "test", "val", "valid", "all"),
            None,
            3,
            True,
            _build_image_folder,
            _check_image_folder,
            _fingerprint_image_folder,
        ),
        DatasetSpec(
            "celeba",
            "aligned CelebA JPEGs (centre crop 140, resize)",
            ("train", "valid", "test", "all"),
            64,
            3,
            True,
            _build_celeba,
            _check_celeba,
            _fingerprint_celeba,
        ),
        DatasetSpec(
            "cifar10",
            "CIFAR-10 python batches (cifar-10-batches-py)",
            ("train", "test", "all"),
            32,
            3,
            True,
            _build_cifar10,
            _check_cifar10,
            _fingerprint_cifar10,
        ),
        DatasetSpec(
            "lsun",
            "an LSUN LMDB export such as church_outdoor_train_lmdb (needs lmdb)",
            ("train", "val", "test", "all"),
            256,
            3,
            True,
            _build_lsun,
            _check_lsun,
            _fingerprint_lsun,
        ),
    )
}


def _get_spec(name: str) -> DatasetSpec:
    """Look up ``name`` in :data:`DATASETS` or raise listing the valid names."""
    if name not in DATASETS:
        raise DatasetError(f"data.name: unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name]


def _make_request(
    name: str,
    root: str | os.PathLike[str] | None,
    resolution: int,
    split: str,
    max_images: int | None,
    seed: int,
    channels: int | None,
) -> tuple[DatasetSpec, DatasetRequest]:
    """Validate the arguments shared by :func:`build_dataset` and :func:`dataset_id`."""
    spec = _get_spec(name)
    _check_split(spec, split)
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise DatasetError(f"data.resolution: {resolution!r}; expected a positive integer")
    if max_images is not None and (
        isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1
    ):
        raise DatasetError(f"data.max_images: {max_images!r}; expected a positive integer or None")
    if channels not in (None, 1, 3):
        raise DatasetError(f"data.channels: {channels!r}; expected 1, 3 or None")
    path = None if root is None else Path(root).expanduser()
    request = DatasetRequest(
        name,
        path,
        resolution,
        split,
        max_images,
        seed,
        spec.default_channels if channels is None else channels,
    )
    return spec, request


def build_dataset(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    resolution: int,
    split: str = "train",
    max_images: int | None = None,
    seed: int = 0,
    channels: int | None = None,
) -> ImageDataset:
    """Build the registered dataset ``name`` yielding ``(image, label)`` pairs.

    Args:
        name: a key of :data:`DATASETS`.
        root: data location (ignored by ``digits``); see the module docstring.
        resolution: output height and width in pixels.
        split: one of the dataset's splits (``DATASETS[name].splits``).
        max_images: keep only the first N items of the split (canonical order).
        seed: seed of the ``digits`` train/test permutation (unused elsewhere).
        channels: 1 or 3; ``None`` uses the dataset default (1 for digits, 3 otherwise).

    Raises:
        DatasetError: bad name, option, path or format (``DatasetNotFoundError`` if missing).
    """
    spec, request = _make_request(name, root, resolution, split, max_images, seed, channels)
    return spec.build(request)


def dataset_id(
    name: str,
    root: str | os.PathLike[str] | None,
    resolution: int,
    split: str = "train",
    max_images: int | None = None,
    *,
    seed: int = 0,
    channels: int | None = None,
) -> str:
    """Return a stable identifier of a dataset's preprocessed content, for cache keys.

    It combines the options with a hash of cheap facts about the data (file
    names and sizes, batch file sizes, LMDB entry count and size). The root
    path itself is not part of it, so moved data keeps its id. The result uses
    only ``[A-Za-z0-9_.-]`` and is safe as a file name.
    """
    spec, request = _make_request(name, root, resolution, split, max_images, seed, channels)
    count = "all" if max_images is None else f"n{max_images}"
    return f"{name}-{split}-r{resolution}-c{request.channels}-{count}-{spec.fingerprint(request)}"


def check_dataset(name: str, root: str | os.PathLike[str] | None, *, split: str = "train") -> None:
    """Validate the dataset name, root path and on-disk format cheaply, without loading images.

    Raises:
        DatasetError: with a one-line message naming the path and what was expected.
    """
    spec = _get_spec(name)
    _check_split(spec, split)
    spec.check(None if root is None else Path(root).expanduser(), split)


def load_tensor(dataset: Dataset[tuple[Tensor, int]], limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Stack the first ``limit`` items (all by default) into ``(N, C, H, W)`` images and ``(N,)`` labels."""
    if isinstance(dataset, InMemoryImageDataset):
        return dataset.images[:limit].clone(), dataset.labels[:limit].clone()
    if not isinstance(dataset, Sized):
        raise DatasetError(f"dataset: {type(dataset).__name__} has no length; expected a map-style dataset")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise DatasetError("dataset: no items to stack; expected at least one image")
    items = [dataset[index] for index in range(count)]
    images = torch.stack([image for image, _ in items])
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return images, labels
