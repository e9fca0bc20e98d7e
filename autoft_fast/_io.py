"""File writes that a kill can never leave half-done (shared by the data cache and the trainer)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["save_atomic", "write_text_atomic"]


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """Write `obj` with torch.save so that `path` holds either the old or the new file,
    never a truncated one: write a temporary file in the same directory, fsync it, then
    os.replace it over `path` (atomic on POSIX) and fsync the directory entry.

    Example:
        >>> save_atomic({"epoch": 3}, "/tmp/ckpt.pt")  # doctest: +ELLIPSIS
        PosixPath('/tmp/ckpt.pt')
    """
    return _write_atomic(path, "wb", lambda f: torch.save(obj, f))


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write `text` (UTF-8) to `path` as atomically as :func:`save_atomic` writes a tensor
    file: a reader sees the old or the new content, never part of it.

    Example:
        >>> write_text_atomic('{"auc": 0.7}', "/tmp/result.json")  # doctest: +ELLIPSIS
        PosixPath('/tmp/result.json')
    """
    return _write_atomic(path, "w", lambda f: f.write(text))


def _write_atomic(path, mode: str, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A failed or interrupted write must not leave temp files behind either.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some filesystems refuse fsync on directories; the data is safe anyway
        pass
    return path
