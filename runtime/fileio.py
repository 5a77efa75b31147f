"""Atomic file writes: a reader never sees a half-written checkpoint, engine, array or picture.

Temp files and staging folders are named `.<target name>.ddpm-tmp-<pid>-<random>` beside their target: they can
never collide with a user's file, and any later write into the same folder removes the ones whose process is gone
(a run killed with -9 leaves nothing that piles up). The final rename can refuse to replace a file that appeared
while the run was writing (another run writing the same output), so "exists, pass --force" holds under races too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from runtime.errors import DDPMError


def check_writable(path: str | os.PathLike, force: bool = False) -> Path:
    """Fail early (before hours of work) if `path` cannot be written or would clobber a file unasked."""
    path = Path(path)
    if path.is_dir():
        raise DDPMError(f"{path} is a directory; give a file path")
    if path.exists() and not force:
        raise DDPMError(f"{path} already exists; pass {{opt:force}} to overwrite it or choose another path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        blocker = blocking_file(parent)
        if blocker is not None:
            raise DDPMError(f"cannot write {path}: {blocker} is a file, not a folder; choose another path")
        raise DDPMError(f"cannot write {path}: folder {parent} does not exist; create it first")
    try:  # a real probe: os.access says yes to root where no one can write (/sys, a read-only mount)
        tempfile.TemporaryFile(dir=parent).close()
    except OSError:
        raise DDPMError(f"cannot write {path}: folder {parent} is not writable; choose another path") from None
    return path


def blocking_file(folder: Path) -> Path | None:
    """The file standing where `folder` or one of its parents should be a folder, if any (so that a message can
    name it rather than call a folder missing)."""
    found = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return found if found is not None and not found.is_dir() else None


TEMP_TAG = ".ddpm-tmp-"


def temp_prefix(path: str | os.PathLike) -> str:
    """Name prefix of this process's temp files (and staging folders) for `path`."""
    return f".{Path(path).name}{TEMP_TAG}{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clear_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files and staging folders in `folder` whose writing process no longer exists."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith(".") or TEMP_TAG not in name:
            continue
        pid_text = name.rsplit(TEMP_TAG, 1)[1].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        try:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
        except OSError:
            pass  # e.g. removed by another run at the same moment
    return removed


def publish(tmp: str | os.PathLike, path: Path, replace: bool) -> None:
    """Rename tmp to path; without `replace`, refuse (keeping both) if path exists by now."""
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic "create if absent": fails if path appeared meanwhile
    except FileExistsError:
        raise DDPMError(f"{path} appeared while this run was writing it (another run writing the same file?); "
                        "it was kept: pass {opt:force} to overwrite or choose another path") from None
    except OSError:  # no hard links on this file system: check, then rename
        if path.exists():
            raise DDPMError(f"{path} appeared while this run was writing it; it was kept: pass {{opt:force}} to "
                            "overwrite or choose another path") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, replace: bool = True) -> Path:
    """Call `write(fileobj)` on a temp file next to `path`, fsync it, then rename it to `path`.

    replace=False refuses (DDPMError) when `path` exists at the moment of the rename: give it the CLI's --force."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    clear_stale_temps(folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=folder)
    except OSError as exc:
        raise DDPMError(f"cannot write {path}: {exc.strerror}; choose a writable path") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        publish(tmp, path, replace)
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, replace: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(data), replace=replace)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks (records which checkpoint or ONNX an artifact came from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A staging folder beside `out` to fill; on success it replaces `out` (removed first if it exists), on any
    failure it is removed and `out` is left as it was."""
    out = Path(out)
    clear_stale_temps(out.parent)
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

