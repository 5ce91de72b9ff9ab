"""The one atomic write (standard library only; the bottom layer, importable from everywhere).

Every file or directory the package writes for others to read (caches, checkpoints, exports,
results tables, reports) goes through these helpers, so every writer gives the same guarantee:
readers see the old content or the new one, never a torn file, and once a helper returns the
new content and its directory entry are on disk (the file is fsynced before the rename, the
directory after it).

- :func:`atomic_path`: a temporary path next to the target; on success it replaces the target.
- :func:`atomic_write_bytes` / :func:`atomic_write_text`: the same for an in-memory payload.
- :func:`atomic_dir`: a temporary directory, filled by the caller, that replaces a directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_dir", "atomic_path", "atomic_write_bytes", "atomic_write_text", "fsync_dir", "replace_dir"]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Persist renames in ``directory`` (best effort: not every system allows opening a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _plain_mode(*, directory: bool = False, executable: bool = False) -> int:
    """The permissions a plain ``mkdir``/``open()`` gives under the current umask (``0o777``/``0o666`` less it)."""
    return (0o777 if directory or executable else 0o666) & ~_umask()


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "rb+") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success fsync it and ``os.replace`` it onto ``final``.

    If the body raises, the temporary file is removed and ``final`` keeps its previous content.
    The body may write the temporary path by name (``torch.save``, ``np.savez``, safetensors).
    The file gets the permissions a plain ``open()`` would give it (``0o666`` less the umask).
    """
    target = Path(final)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, _plain_mode())  # permissions of a plain open(): mkstemp's are 0o600
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Move directory ``src`` onto ``dst``, replacing ``dst`` with as small a window as possible.

    POSIX cannot rename a directory over a non-empty one, so an existing ``dst`` is first renamed
    aside, then removed once ``src`` is in place.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    fsync_dir(dst.parent)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; on success it replaces ``final``.

    Every regular file in it is fsynced before the rename. If the body raises, the temporary
    directory is removed and ``final`` is left untouched. The directory and everything in it get the
    permissions a plain ``mkdir``/``open()`` would give them (``0o777`` / ``0o666`` less the umask; ``0o777``
    for an executable file): ``mkdtemp`` makes the directory ``0o700`` and some writers (safetensors) make files ``0o600``,
    which would hide an exported model from the other users of a shared machine.
    """
    target = Path(final)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, _plain_mode(directory=True))
        for root, dirs, files in os.walk(tmp):
            for name in dirs:
                if not (Path(root) / name).is_symlink():  # never change what a link points to
                    os.chmod(Path(root) / name, _plain_mode(directory=True))
            for name in files:
                path = Path(root) / name
                if not path.is_symlink():
                    os.chmod(path, _plain_mode(executable=bool(path.stat().st_mode & 0o111)))
                _fsync_file(path)
            fsync_dir(root)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
