"""Large sampling runs on a bounded memory: batches go to disk as they are made, a killed run resumes.

Layout while a run is in progress, beside the output `samples.npz`: a folder `samples.npz.partial/` holding
`samples.npy` (float32 N x C x H x W, a valid .npy, filled in image order) and `progress.json` (what run it belongs
to and how many images are done). A batch is written and fsynced before `progress.json` moves past it, so after a
kill the run restarts at the first image not recorded as done; since image i's noise depends only on (seed, i),
the resumed run ends with exactly the samples of an uninterrupted one. The final `.npz` (arr_0: uint8 N x H x W x C,
samples: float32 N x C x H x W, the layout of `numpy.savez`) is streamed from that file into a temp file and renamed
into place; then the partial folder is removed.

A shard of a run (`ddpm-run --shard`, `runtime.run.shards`) stores images indices.start..indices.stop-1 of the
run the same way; its .npz also holds `indices` (int64, the run's image numbers) and `run_key` (JSON text: what the
shards of one run must share), which `ddpm-run merge` checks.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from runtime.errors import DDPMError
from runtime.fileio import atomic_write, atomic_write_bytes
from runtime.images import to_uint8
from runtime.resources import human

PARTIAL = ".partial"
_HELD: dict[tuple[int, int], int] = {}  # partial folders this process has locked: (st_dev, st_ino) -> open fd
HEADER_BYTES = 128  # .npy v1.0 headers of our shapes fit in 128 bytes; fixed so offsets are known in advance


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + PARTIAL)


def _npy_header(shape: tuple[int, ...], descr: str) -> bytes:
    """A .npy v1.0 header padded to exactly HEADER_BYTES."""
    text = repr({"descr": descr, "fortran_order": False, "shape": tuple(int(s) for s in shape)})
    body = text.encode("latin1")
    pad = HEADER_BYTES - 10 - len(body) - 1
    if pad < 0:
        raise DDPMError(f"array shape {shape} is too large for this format")
    return b"\x93NUMPY\x01\x00" + (HEADER_BYTES - 10).to_bytes(2, "little") + body + b" " * pad + b"\n"


def write_npz(out: Path, members: Iterable[tuple[str, tuple[int, ...], str, Iterable[np.ndarray]]],
              replace: bool) -> None:
    """Write an .npz in numpy.savez's layout (one stored `<name>.npy` per array) atomically, each array streamed
    from its parts: (name, shape, dtype descr, parts in order). Only one part is in memory at a time."""
    def write(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, shape, descr, parts in members:
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    member.write(_npy_header(shape, descr))
                    for part in parts:
                        member.write(np.ascontiguousarray(part).tobytes())

    atomic_write(out, write, replace=replace)


def final_bytes(n: int, shape: tuple[int, int, int]) -> int:
    """Size of the final .npz: float32 samples + uint8 pictures + headers and zip records."""
    return n * int(np.prod(shape)) * 5 + 4096


def check_disk(out: Path, n: int, shape: tuple[int, int, int], done: int = 0) -> None:
    """Refuse a run whose partial file and final .npz cannot fit the free space of out's folder."""
    image = int(np.prod(shape)) * 4
    partial = 0 if done else HEADER_BYTES + n * image  # an existing partial file already holds its space
    final = final_bytes(n, shape)
    free = shutil.disk_usage(out.parent if str(out.parent) else Path(".")).free
    if partial + final > free:
        raise DDPMError(f"not enough disk space for {n} images in {out.parent or '.'}: need {human(partial + final)} "
                        f"({human(partial)} partial file + {human(final)} final .npz), {human(free)} free; "
                        "lower {opt:n} or free some space")


def _mkdir(path: Path) -> bool:
    """mkdir; True if this call created the folder."""
    try:
        path.mkdir()
    except FileExistsError:
        return False
    return True


class SampleStore:
    """The partial run of one output file: a float32 .npy filled batch by batch, and its progress record."""

    def __init__(self, out: Path, n: int, shape: tuple[int, int, int], key: dict[str, Any],
                 indices: range | None = None, run_key: dict[str, Any] | None = None):
        """n images; a shard passes the run's image numbers it holds (`indices`, len n) and its `run_key`."""
        self.out, self.n, self.shape, self.key = out, n, tuple(shape), key
        self.indices, self.run_key = indices, run_key
        self.offset = indices.start if indices is not None else 0
        self.dir = partial_dir(out)
        self.data = self.dir / "samples.npy"
        self.progress = self.dir / "progress.json"
        self.image_bytes = int(np.prod(shape)) * 4
        self.created = False
        self.lock_key: tuple[int, int] | None = None

    def lock(self, force: bool) -> None:
        """Hold the partial folder (created if missing) with flock until `finish`: a second ddpm-run writing the
        same --out at the same time stops here, and one that starts after this run finished finds the output.
        The lock dies with its process, so a run killed with -9 leaves nothing that blocks the rerun."""
        for _ in range(3):  # a run finishing right now may remove the folder between mkdir and flock: retry
            try:
                self.created = _mkdir(self.dir) or self.created
                fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            except OSError as exc:
                raise DDPMError(f"cannot create {self.dir}: {exc.strerror}; choose a writable {{opt:out}}") from None
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if key in _HELD:  # an earlier run in this process (tests call main() repeatedly)
                os.close(fd)
                self.lock_key = key
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DDPMError(f"another ddpm-run is writing {self.out} right now; wait for it to finish or "
                                "choose another {opt:out}") from None
            if self.dir.exists() and os.path.samestat(st, os.stat(self.dir)):
                _HELD[key], self.lock_key = fd, key
                break
            os.close(fd)
        else:
            raise DDPMError(f"{self.dir} keeps being replaced (other runs writing {self.out}?); try again")
        if self.out.exists() and not force:
            self.discard_if_new()
            raise DDPMError(f"{self.out} was written by another run meanwhile; pass {{opt:force}} to overwrite it or "
                            "choose another {opt:out}")

    def discard_if_new(self) -> None:
        """Remove the partial folder if this run created it and stored nothing: a refused run leaves no trace."""
        record = self._read_progress()
        if self.created and (record is None or not record.get("done")):
            self.discard()

    def discard(self) -> None:
        """Remove the partial folder and release its lock."""
        shutil.rmtree(self.dir, ignore_errors=True)
        fd = _HELD.pop(self.lock_key, None) if self.lock_key else None
        if fd is not None:
            os.close(fd)

    def resume_point(self, force: bool) -> int:
        """How many images a matching partial run has done (0 if there is none). A partial run of other settings
        is refused unless `force`, which discards it."""
        if not self.dir.exists():
            return 0
        record = self._read_progress()
        if record is not None and record.get("key") == self.key and self.data.is_file():
            return int(record["done"])
        if record is not None and not force:  # without a record nothing was finished: safe to discard
            raise DDPMError(f"{self.dir} holds an unfinished run with other settings; rerun that command to finish "
                            "it, or pass {opt:force} to discard it")
        for entry in self.dir.iterdir():  # empty the folder but keep it: it is what the lock holds
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return 0

    def prepare(self, done: int) -> None:
        """Check the disk space the rest of the run needs, and create the partial files of a new run."""
        check_disk(self.out, self.n, self.shape, done)
        if done:
            return
        try:
            self.dir.mkdir(exist_ok=True)
            with open(self.data, "wb") as f:
                f.write(_npy_header((self.n, *self.shape), "<f4"))
                f.truncate(HEADER_BYTES + self.n * self.image_bytes)
        except OSError as exc:
            raise DDPMError(f"cannot create {self.dir}: {exc.strerror}; choose a writable {{opt:out}}") from None
        self._write_progress(0)

    def _read_progress(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.progress.read_text())
        except (OSError, ValueError):
            return None

    def _write_progress(self, done: int) -> None:
        atomic_write_bytes(self.progress, json.dumps({"done": done, "n": self.n, "key": self.key}).encode())

    def write(self, start: int, batch: np.ndarray) -> None:
        """Store images start..start+len(batch)-1 (numbered over the whole run) durably, then record them as
        done."""
        local = start - self.offset
        with open(self.data, "r+b") as f:
            f.seek(HEADER_BYTES + local * self.image_bytes)
            f.write(np.ascontiguousarray(batch, dtype="<f4").tobytes())
            f.flush()
            os.fsync(f.fileno())
        self._write_progress(local + len(batch))

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """The stored samples, `size` images at a time, read with plain file reads (no memory map, so the
        process's resident memory stays one chunk)."""
        with open(self.data, "rb") as f:
            f.seek(HEADER_BYTES)
            for start in range(0, self.n, size):
                count = min(size, self.n - start)
                buf = f.read(count * self.image_bytes)
                yield np.frombuffer(buf, dtype="<f4").reshape(count, *self.shape)

    def head(self, k: int) -> np.ndarray:
        """The first k stored images (for a preview grid)."""
        return next(self.chunks(min(k, self.n))).copy()

    def finish(self, data_range: tuple[float, float], chunk: int, replace: bool = True) -> None:
        """Write the final .npz atomically from the stored samples (replace=False: refuse if it exists by now),
        then remove the partial folder."""
        c, h, w = self.shape
        members = [("arr_0", (self.n, h, w, c), "|u1", (to_uint8(part, data_range) for part in self.chunks(chunk))),
                   ("samples", (self.n, c, h, w), "<f4", self.chunks(chunk))]
        if self.indices is not None:
            key = np.array(json.dumps(self.run_key, sort_keys=True))
            members += [("indices", (self.n,), "<i8", [np.arange(self.indices.start, self.indices.stop)]),
                        ("run_key", (), key.dtype.str, [key])]
        write_npz(self.out, members, replace)
        self.discard()
