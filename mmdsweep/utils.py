"""Small shared helpers: progress bars, image grids, devices, threads, atomic files."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

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


def save_grid(
    x: torch.Tensor, path: str | os.PathLike[str], nrow: int = 8, pad: int = 1, scale: int = 1
) -> Path:
    """Save images in [-1, 1] as one PNG grid (optionally upscaled by nearest neighbour)."""
    from PIL import Image

    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w
        ] = imgs[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
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


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode())


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
