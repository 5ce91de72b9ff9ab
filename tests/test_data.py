"""Tests for mmdsweep.assets.data: every dataset is loaded from tiny fixtures in its real on-disk format."""

from __future__ import annotations

import io
import os
import pickle
import re
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmdsweep.assets.data import (
    DATASETS,
    DatasetError,
    DatasetNotFoundError,
    ImageFileDataset,
    LSUNDataset,
    build_dataset,
    check_dataset,
    dataset_id,
    load_tensor,
)

# ---------------------------------------------------------------------------
# Fixture writers
# ---------------------------------------------------------------------------


def boxed_image(width: int, height: int, box: tuple[int, int, int, int], mode: str = "RGB") -> Image.Image:
    """Black ``width`` x ``height`` image with a white ``box`` (left, top, right, bottom)."""
    image = Image.new(mode, (width, height), 0)
    image.paste(
        Image.new(mode, (box[2] - box[0], box[3] - box[1]), 255 if mode == "L" else (255, 255, 255)), box
    )
    return image


def centre_boxed(width: int, height: int) -> Image.Image:
    """Black image whose centred square of the shorter side is white."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return boxed_image(width, height, (left, top, left + side, top + side))


def encode(image: Image.Image, fmt: str) -> bytes:
    """Encode ``image`` in ``fmt`` (PNG, JPEG or WEBP) at high quality."""
    buffer = io.BytesIO()
    options = {"quality": 98} if fmt in ("JPEG", "WEBP") else {}
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def write_cifar(root: Path, per_batch: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write a ``cifar-10-batches-py`` directory in the real pickle format.

    Returns all train+test images as (N, 32, 32, 3) uint8 HWC and labels, in file order.
    """
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        hwc = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)
        batch_labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        rows = hwc.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # R plane, G plane, B plane; row-major
        batch = {
            b"batch_label": name.encode(),
            b"labels": batch_labels,
            b"data": rows,
            b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)],
        }
        with (directory / name).open("wb") as handle:
            pickle.dump(batch, handle, protocol=2)
        images.append(hwc)
        labels.extend(batch_labels)
    (directory / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2))
    return np.concatenate(images), np.asarray(labels)


def write_lmdb(path: Path, items: dict[bytes, bytes]) -> None:
    """Write ``items`` into an LMDB directory like the LSUN export (data.mdb + lock.mdb)."""
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in items.items():
            txn.put(key, value)
    env.close()


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """A nested folder of PNG/JPEG files with mixed sizes, case and noise files."""
    root = tmp_path / "images"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    (root / ".hidden").mkdir()
    centre_boxed(60, 20).save(root / "a" / "wide.PNG")
    centre_boxed(20, 50).save(root / "b" / "deep" / "tall.png")
    centre_boxed(40, 40).save(root / "b" / "square.JPG", quality=98)
    centre_boxed(33, 21).save(root / "c.jpeg", quality=98)
    centre_boxed(30, 30).save(root / ".hidden" / "skip.png")
    centre_boxed(30, 30).save(root / ".dotfile.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def lsun_root(tmp_path: Path) -> Path:
    """A parent folder holding church_outdoor_train_lmdb with webp and jpeg values."""
    items = {
        b"0003": encode(centre_boxed(64, 48), "WEBP"),
        b"0001": encode(centre_boxed(48, 64), "JPEG"),
        b"0002": encode(centre_boxed(40, 40), "WEBP"),
        b"0005": encode(centre_boxed(80, 60), "JPEG"),
        b"0004": encode(centre_boxed(50, 70), "WEBP"),
    }
    write_lmdb(tmp_path / "church_outdoor_train_lmdb", items)
    return tmp_path


# ---------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------


def test_digits_shapes_range_labels_and_exact_values() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    full = build_dataset("digits", resolution=8, split="all")
    images, labels = load_tensor(full)
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    expected = torch.from_numpy(bunch.images.astype(np.float32)) / 8.0 - 1.0
    torch.testing.assert_close(images[:, 0], expected)
    assert labels.tolist() == bunch.target.tolist()

    train = build_dataset("digits", resolution=16)
    image, label = train[0]
    assert image.shape == (1, 16, 16) and isinstance(label, int)
    stacked, train_labels = load_tensor(train)
    assert stacked.min() >= -1.0 and stacked.max() <= 1.0
    assert stacked.min() < -0.99 and stacked.max() > 0.9  # uses the full range
    assert set(train_labels.tolist()) == set(range(10))
    assert build_dataset("digits", resolution=4, channels=3)[0][0].shape == (3, 4, 4)
    rgb = build_dataset("digits", resolution=16, channels=3)[5][0]
    assert torch.equal(rgb[0], rgb[2]) and torch.equal(rgb[0], train[5][0][0])


def test_digits_split_is_deterministic_disjoint_and_seeded() -> None:
    train, train_labels = load_tensor(build_dataset("digits", resolution=8, split="train"))
    test, test_labels = load_tensor(build_dataset("digits", resolution=8, split="test"))
    assert len(train) == 1438 and len(test) == 359
    again, _ = load_tensor(build_dataset("digits", resolution=8, split="train"))
    assert torch.equal(train, again)

    def sorted_rows(x: torch.Tensor) -> list[tuple[float, ...]]:
        return sorted(tuple(row) for row in x.reshape(len(x), -1).tolist())

    everything, _ = load_tensor(build_dataset("digits", resolution=8, split="all"))
    # train + test is exactly the full multiset of images, so the two splits are disjoint
    assert sorted_rows(torch.cat([train, test])) == sorted_rows(everything)
    other, _ = load_tensor(build_dataset("digits", resolution=8, split="train", seed=1))
    assert not torch.equal(train, other)
    first, _ = load_tensor(build_dataset("digits", resolution=8, split="train", max_images=10))
    assert torch.equal(first, train[:10])
    assert torch.bincount(test_labels, minlength=10).min() > 10 and len(train_labels) == 1438


# ---------------------------------------------------------------------------
# image_folder
# ---------------------------------------------------------------------------


def test_image_folder_lists_sorted_images_and_centre_crops(image_tree: Path) -> None:
    dataset = build_dataset("image_folder", root=image_tree, resolution=10)
    assert len(dataset) == 4
    assert isinstance(dataset, ImageFileDataset)
    names = [Path(p).name for p in dataset.files]
    assert names == ["wide.PNG", "tall.png", "square.JPG", "c.jpeg"]  # sorted by relative path
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.shape == (3, 10, 10) and image.dtype == torch.float32 and label == -1
        assert image.min() >= -1.0 and image.max() <= 1.0
        # the white centre square survives the crop; black borders were cut away
        assert image[:, 3:7, 3:7].min() > 0.9, names[index]
        assert image.mean() > 0.5, names[index]
    wide = dataset[0][0]
    assert wide[:, :, 2:8].min() > 0.9  # a left- or right-aligned crop would be black here


def test_image_folder_grayscale_max_images_and_split_subdir(image_tree: Path, tmp_path: Path) -> None:
    gray = build_dataset("image_folder", root=image_tree, resolution=8, channels=1, max_images=2)
    assert len(gray) == 2 and gray[1][0].shape == (1, 8, 8)
    split_root = tmp_path / "split"
    for split, size in (("train", 12), ("test", 24)):
        (split_root / split).mkdir(parents=True)
        centre_boxed(size, size).save(split_root / split / "x.png")
    assert len(build_dataset("image_folder", root=split_root, resolution=4, split="test")) == 1
    assert len(build_dataset("image_folder", root=split_root, resolution=4, split="all")) == 2
    with pytest.raises(DatasetNotFoundError, match="valid"):
        build_dataset("image_folder", root=split_root, resolution=4, split="valid")


def test_image_folder_corrupt_file_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not really a png")
    with pytest.raises(DatasetError, match=r"broken\.png: cannot read image header"):
        check_dataset("image_folder", tmp_path)
    dataset = build_dataset("image_folder", root=tmp_path, resolution=8)
    with pytest.raises(DatasetError, match=r"broken\.png: cannot decode image"):
        dataset[0]


# ---------------------------------------------------------------------------
# celeba
# ---------------------------------------------------------------------------


def test_celeba_crops_the_centre_140_and_accepts_parent(tmp_path: Path) -> None:
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    # white exactly inside the 140x140 centre window of a 178x218 image (left 19, top 39)
    boxed_image(178, 218, (19, 39, 159, 179)).save(folder / "000001.jpg", quality=98)
    shifted = boxed_image(178, 218, (0, 0, 140, 140))  # white in the top-left corner instead
    shifted.save(folder / "000002.jpg", quality=98)
    for root in (tmp_path, folder):
        check_dataset("celeba", root)
        dataset = build_dataset("celeba", root=root, resolution=14)
        assert len(dataset) == 2
        centred, label = dataset[0]
        assert centred.shape == (3, 14, 14) and label == -1
        assert centred[:, 1:13, 1:13].min() > 0.9 and centred.mean() > 0.85
        corner = dataset[1][0]
        assert corner[:, -1, -1].max() < -0.9  # bottom-right of the crop lies outside the white corner box


def test_celeba_partition_file_and_small_images(tmp_path: Path) -> None:
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    for index in range(1, 5):
        centre_boxed(178, 218).save(folder / f"{index:06d}.jpg")
    (tmp_path / "list_eval_partition.txt").write_text(
        "000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n000004.jpg 2\n"
    )
    assert len(build_dataset("celeba", root=tmp_path, resolution=8)) == 2
    assert len(build_dataset("celeba", root=tmp_path, resolution=8, split="valid")) == 1
    assert len(build_dataset("celeba", root=tmp_path, resolution=8, split="all")) == 4
    small = tmp_path / "other" / "small"  # no list_eval_partition.txt next to it
    small.mkdir(parents=True)
    Image.new("RGB", (100, 120)).save(small / "000001.jpg")
    with pytest.raises(DatasetError, match=r"000001\.jpg: image is 100x120; expected .*178x218"):
        check_dataset("celeba", small)
    with pytest.raises(DatasetNotFoundError, match="list_eval_partition.txt"):
        check_dataset("celeba", small, split="test")


# ---------------------------------------------------------------------------
# cifar10
# ---------------------------------------------------------------------------


def test_cifar10_decodes_planar_rows_and_labels(tmp_path: Path) -> None:
    images, labels = write_cifar(tmp_path, per_batch=3)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        check_dataset("cifar10", root)
        train = build_dataset("cifar10", root=root, resolution=32)
        assert len(train) == 15
        got, got_labels = load_tensor(train)
        expected = torch.from_numpy(images[:15].astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1.0
        torch.testing.assert_close(got, expected)
        assert got_labels.tolist() == labels[:15].tolist()

    # row layout: first 1024 bytes are R row-major, then G, then B
    with (tmp_path / "cifar-10-batches-py" / "data_batch_1").open("rb") as handle:
        row = pickle.load(handle, encoding="bytes")[b"data"][0]
    first = build_dataset("cifar10", root=tmp_path, resolution=32)[0][0]
    pixel = ((first + 1.0) * 127.5).round().to(torch.uint8)
    assert pixel[0, 0, 1] == row[1] and pixel[0, 1, 0] == row[32]
    assert pixel[1, 0, 0] == row[1024] and pixel[2, 31, 31] == row[3071]

    test = build_dataset("cifar10", root=tmp_path, resolution=32, split="test")
    assert len(test) == 3 and test[2][1] == int(labels[17])
    assert len(build_dataset("cifar10", root=tmp_path, resolution=32, split="all")) == 18
    subset = build_dataset("cifar10", root=tmp_path, resolution=32, max_images=4)
    assert len(subset) == 4 and subset[3][1] == int(labels[3])  # crosses into data_batch_2
    big = build_dataset("cifar10", root=tmp_path, resolution=64, channels=1)[0][0]
    assert big.shape == (1, 64, 64) and big.min() >= -1.0 and big.max() <= 1.0


def test_cifar10_format_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(
        DatasetNotFoundError,
        match=rf"data.root: {re.escape(str(missing))} does not exist; .*cifar-10-batches-py",
    ):
        check_dataset("cifar10", missing)
    with pytest.raises(FileNotFoundError):  # also catchable as FileNotFoundError
        check_dataset("cifar10", missing)
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    with pytest.raises(DatasetError, match="is a file, not a directory; .*extract it"):
        check_dataset("cifar10", archive)
    binary = tmp_path / "cifar-10-batches-bin"
    binary.mkdir()
    (binary / "data_batch_1.bin").write_bytes(bytes(3073))
    with pytest.raises(DatasetNotFoundError, match="has no cifar-10-batches-py or data_batch_1"):
        check_dataset("cifar10", binary)
    wrong = tmp_path / "wrong" / "cifar-10-batches-py"
    wrong.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (wrong / name).write_bytes(bytes(3073))
    with pytest.raises(
        DatasetError, match=r"data_batch_1: not a Python pickle; expected the CIFAR-10 python version"
    ):
        check_dataset("cifar10", wrong)


def test_cifar10_refuses_pickles_with_foreign_globals(tmp_path: Path) -> None:
    write_cifar(tmp_path, per_batch=1)
    directory = tmp_path / "cifar-10-batches-py"
    (directory / "data_batch_1").write_bytes(pickle.dumps({b"data": os.getcwd, b"labels": []}, protocol=2))
    with pytest.raises(DatasetError, match="data_batch_1: cannot unpickle .*not allowed"):
        build_dataset("cifar10", root=tmp_path, resolution=32)
    (directory / "data_batch_1").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8)}, protocol=2)
    )
    with pytest.raises(
        DatasetError, match=r"b'data' is uint8 \(2, 100\); expected a uint8 array of shape \(N, 3072\)"
    ):
        build_dataset("cifar10", root=tmp_path, resolution=32)


# ---------------------------------------------------------------------------
# lsun
# ---------------------------------------------------------------------------


def test_lsun_reads_webp_and_jpeg_lazily_in_key_order(lsun_root: Path) -> None:
    lmdb_dir = lsun_root / "church_outdoor_train_lmdb"
    assert (lmdb_dir / "data.mdb").is_file()
    for root in (lsun_root, lmdb_dir):
        check_dataset("lsun", root)
        dataset = build_dataset("lsun", root=root, resolution=16)
        assert len(dataset) == 5
        assert isinstance(dataset, LSUNDataset)
        assert dataset.keys == [b"0001", b"0002", b"0003", b"0004", b"0005"]
        for index in range(5):
            image, label = dataset[index]
            assert image.shape == (3, 16, 16) and label == -1
            assert image[:, 4:12, 4:12].min() > 0.85 and image.mean() > 0.6
    subset = build_dataset("lsun", root=lmdb_dir, resolution=8, max_images=2, channels=1)
    assert len(subset) == 2 and subset[1][0].shape == (1, 8, 8)


def test_lsun_errors(lsun_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lmdb_dir = lsun_root / "church_outdoor_train_lmdb"
    with pytest.raises(DatasetError, match="is the 'train' LMDB; expected one for split 'val'"):
        check_dataset("lsun", lmdb_dir, split="val")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(
        DatasetNotFoundError, match=r"has no data.mdb nor a \*_train_lmdb directory; .*church_outdoor"
    ):
        check_dataset("lsun", empty)
    bad = tmp_path / "bad_train_lmdb"
    bad.mkdir()
    (bad / "data.mdb").write_bytes(b"garbage" * 100)
    with pytest.raises(DatasetError, match="bad_train_lmdb: cannot open LMDB"):
        check_dataset("lsun", bad)
    write_lmdb(lsun_root / "bedroom_train_lmdb", {b"1": encode(centre_boxed(8, 8), "WEBP")})
    with pytest.raises(DatasetError, match="several train LMDBs"):
        build_dataset("lsun", root=lsun_root, resolution=8)
    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(DatasetError, match=r"pip install 'mmdsweep\[lsun\]'"):
        check_dataset("lsun", lmdb_dir)


# ---------------------------------------------------------------------------
# dataset_id, check_dataset, argument validation
# ---------------------------------------------------------------------------


def test_dataset_id_is_stable_and_tracks_data_and_options(
    image_tree: Path, lsun_root: Path, tmp_path: Path
) -> None:
    first = dataset_id("image_folder", image_tree, 32, "train", None)
    assert first == dataset_id("image_folder", str(image_tree), 32, "train", None)
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", first)
    assert first != dataset_id("image_folder", image_tree, 64, "train", None)
    assert first != dataset_id("image_folder", image_tree, 32, "train", 2)
    assert first != dataset_id("image_folder", image_tree, 32, "train", None, channels=1)
    centre_boxed(25, 25).save(image_tree / "zz_new.png")
    assert first != dataset_id("image_folder", image_tree, 32, "train", None)

    lmdb_dir = lsun_root / "church_outdoor_train_lmdb"
    before = dataset_id("lsun", lmdb_dir, 16, "train", None)
    env = lmdb.open(str(lmdb_dir), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"0006", encode(centre_boxed(30, 30), "JPEG"))
    env.close()
    assert before != dataset_id("lsun", lmdb_dir, 16, "train", None)

    write_cifar(tmp_path / "c", per_batch=1)
    cifar = dataset_id("cifar10", tmp_path / "c", 32, "train", None)
    assert cifar == dataset_id("cifar10", tmp_path / "c" / "cifar-10-batches-py", 32, "train", None)
    assert cifar != dataset_id("cifar10", tmp_path / "c", 32, "test", None)
    assert dataset_id("digits", None, 16, "train", None) != dataset_id(
        "digits", None, 16, "train", None, seed=1
    )
    assert dataset_id("digits", None, 16, "all", None) == dataset_id("digits", None, 16, "all", None, seed=1)


def test_check_dataset_and_argument_errors(tmp_path: Path) -> None:
    assert set(DATASETS) == {"digits", "image_folder", "celeba", "cifar10", "lsun"}
    check_dataset("digits", None)
    with pytest.raises(DatasetError, match="data.name: unknown dataset 'mnist'; expected one of"):
        check_dataset("mnist", tmp_path)
    with pytest.raises(DatasetError, match="data.root: not set; expected the CIFAR-10"):
        check_dataset("cifar10", None)
    with pytest.raises(DatasetNotFoundError, match=r"does not exist; expected the aligned CelebA"):
        check_dataset("celeba", tmp_path / "missing")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"contains no \.png/\.jpg/\.jpeg files"):
        check_dataset("image_folder", tmp_path)
    with pytest.raises(DatasetError, match="data.split: 'val' is not a split of 'digits'"):
        build_dataset("digits", resolution=8, split="val")
    with pytest.raises(DatasetError, match="data.resolution: 0; expected a positive integer"):
        build_dataset("digits", resolution=0)
    with pytest.raises(DatasetError, match="data.channels: 2; expected 1, 3 or None"):
        build_dataset("digits", resolution=8, channels=2)
    with pytest.raises(DatasetError, match="data.max_images: 0"):
        build_dataset("digits", resolution=8, max_images=0)


# ---------------------------------------------------------------------------
# Pickling and DataLoader workers
# ---------------------------------------------------------------------------


def test_file_backed_datasets_pickle_and_work_in_dataloader_workers(
    image_tree: Path, lsun_root: Path
) -> None:
    folder = build_dataset("image_folder", root=image_tree, resolution=8)
    lsun = build_dataset("lsun", root=lsun_root, resolution=8)
    lsun_first = lsun[0][0]  # opens the LMDB environment in this process
    for dataset in (folder, lsun):
        clone = pickle.loads(pickle.dumps(dataset))
        assert torch.equal(clone[1][0], dataset[1][0])
    assert torch.equal(pickle.loads(pickle.dumps(lsun))[0][0], lsun_first)

    # the LMDB was opened above, so the forked worker must replace its inherited environment
    for dataset in (folder, lsun):
        loader = DataLoader(dataset, batch_size=2, num_workers=1)
        batches = list(loader)
        images = torch.cat([images for images, _ in batches])
        labels = torch.cat([labels for _, labels in batches])
        assert images.shape == (len(dataset), 3, 8, 8)
        assert labels.tolist() == [-1] * len(dataset)
        torch.testing.assert_close(images, load_tensor(dataset)[0])
