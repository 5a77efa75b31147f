"""Atomic file writes: a reader never sees a half-written checkpoint, engine, array or picture."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from runtime.errors import DDPMError


def check_writable(path: str | os.PathLike, force: bool = False) -> Path:
    """Fail early (before hours of work) if `path` cannot be written or would clobber a file unasked."""
    path = Path(path)
    if path.exists() and not force:
        raise DDPMError(f"{path} already exists; pass --force to overwrite it or choose another path")
    if path.is_dir():
        raise DDPMError(f"{path} is a directory; give a file path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise DDPMError(f"cannot write {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise DDPMError(f"cannot write {path}: folder {parent} is not writable; choose another path")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(fileobj)` on a temp file next to `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as exc:
        raise DDPMError(f"cannot write {path}: {exc.strerror}; choose a writable path") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks (records which checkpoint or ONNX an artifact came from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
