"""Small shared helpers: progress bars, image grids, devices, threads, atomic files."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from mmdsweep.fsio import atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported)

T = TypeVar("T")


def progress(it: Iterable[T], *, desc: str, enabled: bool = True, total: int | None = None) -> Any:
    """A tqdm progress bar on stderr when enabled (and a plain iterator otherwise)."""
    if not enabled:
        return _Plain(it)
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


class _Plain:
    def __init__(self, it: Iterable[Any]) -> None:
        self._it = it

    def __iter__(self) -> Iterator[Any]:
        return iter(self._it)

    def set_postfix(self, **_: Any) -> None:
        pass

    def close(self) -> None:
        pass


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (N, C, H, W) -> uint8 (N, H, W, C)."""
    y = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return y.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(x: torch.Tensor, nrow: int = 8, pad: int = 1) -> np.ndarray:
    """Images in [-1, 1] ``(N, C, H, W)`` -> one uint8 ``(H', W', C')`` grid with white padding.

    torchvision's ``make_grid`` lays the images out (``min(nrow, N)`` per row, ``pad`` pixels
    around every image); one-channel images come back with one channel.
    """
    from torchvision.utils import make_grid

    levels = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()  # the values of to_uint8
    grid = make_grid(levels, nrow=max(1, nrow), padding=pad, pad_value=255.0)
    out = grid.to(torch.uint8).permute(1, 2, 0).numpy()
    return out[..., :1] if x.shape[1] == 1 else out


def save_grid(
    x: torch.Tensor, path: str | os.PathLike[str], nrow: int = 8, pad: int = 1, scale: int = 1
) -> Path:
    """Save images in [-1, 1] as one PNG grid (optionally upscaled by nearest neighbour)."""
    from PIL import Image

    grid = image_grid(x, nrow=nrow, pad=pad)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, _png_bytes(img))
    return out


def _png_bytes(img: Any) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"finetune.device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def set_threads(n: int | None) -> None:
    if n is not None:
        torch.set_num_threads(n)


def markdown_table(rows: list[dict[str, Any]], floatfmt: str = ".4g") -> str:
    """A GitHub-flavoured Markdown table of dict rows (columns in first-seen order)."""
    cols: list[str] = []
    for r in rows:
        cols.extend(c for c in r if c not in cols)

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return "nan" if v != v else format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
