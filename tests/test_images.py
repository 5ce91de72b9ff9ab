"""Image decoding: every mode PNG/JPEG can hold becomes the right L/RGB values, EXIF orientation applied.

Files are written by PIL in each mode; the expected values are computed here independently
(palette lookup, alpha compositing over white, 16-bit scaling, ITU-R 601-2 luma).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmdsweep.assets import data as data_mod

BG = getattr(data_mod, "ALPHA_BACKGROUND", 255)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """PIL's RGB -> L: L = R * 299/1000 + G * 587/1000 + B * 114/1000 (rounded)."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    return np.round(r * 299 / 1000 + g * 587 / 1000 + b * 114 / 1000)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + BG * (1.0 - a)


def _decode(path: Path, channels: int) -> np.ndarray:
    image = data_mod._decode_image(path, str(path), "L" if channels == 1 else "RGB")
    return np.asarray(image, dtype=np.float64)


def _check(got: np.ndarray, want_rgb: np.ndarray, channels: int, tol: float) -> None:
    want = _luma(want_rgb) if channels == 1 else want_rgb.astype(np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=tol)


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, size=(6, 5), dtype=np.uint8)
GREY = RNG.integers(0, 256, size=(6, 5), dtype=np.uint8)


def _case(kind: str, tmp: Path) -> tuple[Path, np.ndarray, float]:
    """Write a file in one mode; return it with the RGB values it must decode to, and a tolerance."""
    if kind == "rgb_png":
        Image.fromarray(RGB, "RGB").save(p := tmp / "rgb.png")
        return p, RGB, 0.0
    if kind == "l_png":
        Image.fromarray(GREY, "L").save(p := tmp / "l.png")
        return p, np.repeat(GREY[..., None], 3, axis=2), 0.0
    if kind == "rgba_png":
        Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA").save(p := tmp / "rgba.png")
        return p, _over_white(RGB, ALPHA), 1.0
    if kind == "la_png":
        Image.fromarray(np.dstack([GREY, ALPHA]), "LA").save(p := tmp / "la.png")
        return p, np.repeat(_over_white(GREY[..., None], ALPHA), 3, axis=2), 1.0
    if kind in ("p_png", "p_transparent_png"):
        palette = RNG.integers(0, 256, size=(256, 3), dtype=np.uint8)
        index = (np.arange(30).reshape(6, 5) % 7).astype(np.uint8)
        im = Image.fromarray(index, "P")
        im.putpalette(palette.flatten().tolist())
        want = palette[index].astype(np.float64)
        if kind == "p_transparent_png":
            im.save(p := tmp / "pt.png", transparency=3)
            want[index == 3] = BG
            return p, want, 0.0
        im.save(p := tmp / "p.png")
        return p, want, 0.0
    if kind == "i16_png":
        g16 = (RNG.integers(0, 65536, size=(6, 5))).astype(np.uint16)
        Image.fromarray(g16).save(p := tmp / "i16.png")
        assert Image.open(p).mode.startswith("I")
        want = np.round(g16.astype(np.float64) * 255 / 65535)
        return p, np.repeat(want[..., None], 3, axis=2), 0.0
    if kind == "bilevel_png":
        bits = GREY > 127
        Image.fromarray(bits).convert("1").save(p := tmp / "b.png")
        assert Image.open(p).mode == "1"
        return p, np.repeat(np.where(bits, 255.0, 0.0)[..., None], 3, axis=2), 0.0
    if kind == "cmyk_jpeg":
        # flat blocks of one colour each, so JPEG's loss stays small; C, M, Y -> R, G, B = 255 - C ...
        cmyk = np.zeros((16, 16, 4), np.uint8)
        cmyk[:8, :, :] = (0, 255, 255, 0)  # red
        cmyk[8:, :, :] = (255, 0, 0, 0)  # cyan
        Image.fromarray(cmyk, "CMYK").save(p := tmp / "cmyk.jpg", quality=100)
        assert Image.open(p).mode == "CMYK"
        want = np.zeros((16, 16, 3))
        want[:8] = (255, 0, 0)
        want[8:] = (0, 255, 255)
        return p, want, 12.0
    if kind == "rgb_jpeg":
        block = np.zeros((16, 16, 3), np.uint8)
        block[:, :8] = (200, 40, 10)
        block[:, 8:] = (20, 90, 220)
        Image.fromarray(block, "RGB").save(p := tmp / "rgb.jpg", quality=100, subsampling=0)
        return p, block, 12.0
    raise AssertionError(kind)


KINDS = [
    "rgb_png",
    "l_png",
    "rgba_png",
    "la_png",
    "p_png",
    "p_transparent_png",
    "i16_png",
    "bilevel_png",
    "cmyk_jpeg",
    "rgb_jpeg",
]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_every_mode_decodes_to_the_displayed_values(kind: str, channels: int, tmp_path: Path) -> None:
    path, want_rgb, tol = _case(kind, tmp_path)
    # tolerance 1 for alpha: compositing rounds once; JPEG cases: quality-100 loss on flat blocks
    _check(_decode(path, channels), np.asarray(want_rgb, dtype=np.float64), channels, tol + (channels == 1))


def _exif_with_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value  # Orientation
    return exif


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_jpeg_exif_orientation_is_applied(orientation: int, tmp_path: Path) -> None:
    """A camera JPEG stored sideways with Orientation=6 (rotate 90 deg clockwise to view) is used as viewed."""
    stored = np.zeros((16, 32, 3), np.uint8)  # 32 wide, 16 high: four flat colour blocks
    stored[:8, :16] = (250, 0, 0)
    stored[:8, 16:] = (0, 250, 0)
    stored[8:, :16] = (0, 0, 250)
    stored[8:, 16:] = (250, 250, 250)
    p = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(p, quality=100, subsampling=0, exif=_exif_with_orientation(orientation))
    # EXIF 3: rotate 180; 6: rotate 90 clockwise; 8: rotate 90 counter-clockwise (np.rot90 k>0 is CCW)
    k = {3: 2, 6: -1, 8: 1}[orientation]
    want = np.rot90(stored, k=k)
    got = _decode(p, 3)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=12)


def test_image_folder_dataset_uses_the_displayed_orientation(tmp_path: Path) -> None:
    """End to end through the dataset: a square JPEG with Orientation=6 arrives rotated."""
    stored = np.zeros((16, 16, 3), np.uint8)
    stored[:8] = (250, 250, 250)  # top half white as stored -> right half white as displayed
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(stored).save(folder / "a.jpg", quality=100, subsampling=0, exif=_exif_with_orientation(6))
    ds = data_mod.build_dataset("image_folder", root=folder, resolution=16, channels=1)
    x, _ = ds[0]
    right, left = float(x[0, :, 10:].mean()), float(x[0, :, :6].mean())
    assert right > 0.8 and left < -0.8, (left, right)
