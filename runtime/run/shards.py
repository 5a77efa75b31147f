"""One sampling run split over processes: which images a shard draws, which shard a launcher's process is, and the
checks and merge that turn the shards back into the output of one run.

Image i's noise depends only on (seed, i) (`runtime.sampling.noise`), so it does not matter where image i is drawn;
the batch it is drawn in can (GPU kernels and some CPU kernels pick their algorithm by batch shape). A shard
therefore takes whole batches of the single run: the run's ceil(n / batch) batches are split like numpy.array_split
over the W shards (contiguous, the first ones one batch longer), so every shard computes its batches exactly as a
single `ddpm-run --n N` with the same batch size does, and the merged file equals that run's bit for bit.

A shard's .npz (`runtime.run.store`) holds arr_0 and samples of its images, `indices` (their numbers in the run) and
`run_key`: the model's sha256, the chain and its timesteps, seed, n, batch size, image shape and noise file, which
all shards of one run share. `merge` refuses files that disagree, and missing or duplicated shards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, MutableMapping

import numpy as np

from runtime.errors import DDPMError
from runtime.fileio import file_sha256
from runtime.run.store import write_npz
from runtime.sampling import Chain

KEY_NAMES = {"model": "models (sha256)", "chain": "chains", "timesteps": "timesteps", "seed": "seeds",
             "n": "image counts ({opt:n})", "batch_size": "batch sizes", "shape": "image shapes",
             "noise": "noise files", "world": "shard counts (W)"}


@dataclass(frozen=True)
class Shard:
    """Shard `rank` of `world` (0 <= rank < world)."""

    rank: int
    world: int

    def __str__(self) -> str:
        return f"{self.rank}/{self.world}"

    def indices(self, n: int, batch_size: int) -> range:
        """The images this shard draws: whole batches of the run, split like numpy.array_split."""
        per, extra = divmod(-(-n // batch_size), self.world)
        first = self.rank * per + min(self.rank, extra)
        last = first + per + (self.rank < extra)
        return range(min(first * batch_size, n), min(last * batch_size, n))

    def path(self, out: Path) -> Path:
        """This shard's file for a run whose output is `out`: samples.npz -> samples.shard2-of-8.npz."""
        return out.with_name(f"{out.stem}.shard{self.rank}-of-{self.world}{out.suffix}")


def parse_shard(text: str, environ: Mapping[str, str] | None = None) -> Shard:
    """`R/W`, or `auto` for the launcher's rank and size (`launcher_shard`)."""
    if text.strip().lower() == "auto":
        return launcher_shard(os.environ if environ is None else environ)
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None:
        raise DDPMError(f"{{opt:shard}} {text!r} is neither R/W (shard R of W, counted from 0, e.g. 0/8) nor auto")
    rank, world = int(match[1]), int(match[2])
    if not 0 <= rank < world:
        raise DDPMError(f"{{opt:shard}} {text}: shard R of W needs 0 <= R < W (shards are counted from 0)")
    return Shard(rank, world)


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise DDPMError(f"environment variable {name}={environ[name]!r} is not a number; pass {{opt:shard}} R/W") \
            from None


def _both(environ: Mapping[str, str], rank: str, size: str) -> tuple[int, int]:
    if rank not in environ or size not in environ:
        have, lack = (rank, size) if rank in environ else (size, rank)
        raise DDPMError(f"{have} is set but {lack} is not, so the number of shards is unknown; pass {{opt:shard}} R/W")
    return _int(environ, rank), _int(environ, size)


def _pair(environ: Mapping[str, str], rank: str, size: str) -> tuple[int, int]:
    r, w = _both(environ, rank, size)
    if not 0 <= r < w:
        raise DDPMError(f"{rank}={r} does not lie in 0..{size}-1 = {w - 1}; pass {{opt:shard}} R/W")
    return r, w


def _array_task(environ: Mapping[str, str]) -> tuple[int, int]:
    """(index from 0, count) of a job array task; ids may start anywhere and step (--array=1-15:2)."""
    task, count = _both(environ, "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
    low = _int(environ, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in environ else 0
    step = _int(environ, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in environ else 1
    high = _int(environ, "SLURM_ARRAY_TASK_MAX") if "SLURM_ARRAY_TASK_MAX" in environ else low + (count - 1) * step
    index, off = divmod(task - low, max(step, 1))
    if off or not 0 <= index < count or high != low + (count - 1) * step:
        raise DDPMError(f"job array task {task} of {count} (ids {low}..{high} step {step}) is not one of an evenly "
                        f"spaced range; submit it with `sbatch --array={low}-{low + count - 1}` or pass "
                        "{opt:shard} R/W")
    return index, count


def launcher_shard(environ: Mapping[str, str]) -> Shard:
    """R and W from the launcher that started this process: torchrun's RANK/WORLD_SIZE; else a Slurm job array task
    (SLURM_ARRAY_TASK_ID counted from SLURM_ARRAY_TASK_MIN, of SLURM_ARRAY_TASK_COUNT), whose srun tasks
    (SLURM_PROCID of SLURM_NTASKS), if any, split it further; else srun's tasks alone."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return Shard(*_pair(environ, "RANK", "WORLD_SIZE"))
    array = "SLURM_ARRAY_TASK_ID" in environ
    if not array and "SLURM_PROCID" not in environ:
        raise DDPMError("{opt:shard} auto found no launcher: none of RANK/WORLD_SIZE (torchrun), SLURM_PROCID/"
                        "SLURM_NTASKS (srun) or SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT (job array) is set; "
                        "pass {opt:shard} R/W")
    rank, world = 0, 1
    if "SLURM_PROCID" in environ and (not array or "SLURM_NTASKS" in environ):
        rank, world = _pair(environ, "SLURM_PROCID", "SLURM_NTASKS")
    if array:
        index, count = _array_task(environ)
        rank, world = index * world + rank, count * world
    return Shard(rank, world)


def local_gpu(environ: Mapping[str, str]) -> str | None:
    """The GPU a launched process should see alone, so that the processes on one machine take one GPU each: entry
    LOCAL_RANK (torchrun) or SLURM_LOCALID (srun) of CUDA_VISIBLE_DEVICES, or that number when it is unset. None
    (leave it) where the launcher gave the process one GPU already (Slurm's --gpus-per-task) or names no local rank."""
    local = environ.get("LOCAL_RANK", environ.get("SLURM_LOCALID"))
    if local is None or not local.strip().isdigit():
        return None
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return local.strip()
    devices = [d.strip() for d in visible.split(",") if d.strip()]
    return devices[int(local) % len(devices)] if len(devices) > 1 else None


def claim_local_gpu(spec: str | None, provider: str, model: Path, environ: MutableMapping[str, str] | None = None) \
        -> None:
    """Under `{opt:shard} auto` on a GPU ({opt:provider} cuda, a TensorRT .plan), let this process see only its own
    GPU (`local_gpu`); call it before a backend starts CUDA."""
    environ = os.environ if environ is None else environ
    if spec is None or spec.strip().lower() != "auto" or not (provider == "cuda" or model.suffix == ".plan"):
        return
    device = local_gpu(environ)
    if device is not None:
        environ["CUDA_VISIBLE_DEVICES"] = device


def model_sha256(model: Path) -> str:
    """The model's identity across machines: sha256 of its file, of a folder's files (names and contents), or of
    a hub id's text when it is not a path here."""
    if model.is_file():
        return file_sha256(model)
    if not model.is_dir():
        return hashlib.sha256(str(model).encode()).hexdigest()
    h = hashlib.sha256()
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(model).as_posix()}\0{file_sha256(path)}\n".encode())
    return h.hexdigest()


def run_key(model: Path, chain: Chain, seed: int, n: int, batch_size: int, shape: tuple[int, int, int],
            noise_file: Path | None, shard: Shard) -> dict[str, Any]:
    """What the shards of one run share (all but `rank`), stored in each shard's .npz."""
    return {"model": model_sha256(model), "chain": chain.describe(), "timesteps": chain.schedule.timesteps.tolist(),
            "seed": seed, "n": n, "batch_size": batch_size, "shape": list(shape),
            "noise": file_sha256(noise_file) if noise_file is not None else None, "world": shard.world,
            "rank": shard.rank}


def _header(f: Any) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f".npy format {version} is not supported")
    shape, fortran, dtype = read(f)
    if fortran:
        raise ValueError("Fortran-ordered array")
    return shape, dtype


@dataclass
class SampleFile:
    """One samples .npz: a plain ddpm-run output (key None, images 0..n-1) or a shard (its key and indices)."""

    path: Path
    n: int
    image_shape: tuple[int, ...]  # of arr_0: H x W x C
    key: dict[str, Any] | None
    indices: np.ndarray

    @classmethod
    def open(cls, path: Path) -> "SampleFile":
        if not path.is_file():
            raise DDPMError(f"samples file {path} not found")
        try:
            with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
                shape, dtype = _header(f)
                if math.prod(shape) * dtype.itemsize > zf.getinfo("arr_0.npy").file_size - f.tell():
                    raise ValueError(f"arr_0 declares {shape[0]} images, more than the file holds; truncated?")
            with np.load(path, allow_pickle=False) as f:
                key = json.loads(str(f["run_key"])) if "run_key" in f.files else None
                indices = f["indices"] if "indices" in f.files else np.arange(shape[0] if shape else 0)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise DDPMError(f"{path} is not a readable samples .npz with arr_0 ({exc})") from None
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
            raise DDPMError(f"{path} needs arr_0 as uint8 N x H x W x C (C = 1 or 3), the layout ddpm-run writes")
        if indices.shape != (shape[0],) or (key is not None and not isinstance(key, dict)):
            raise DDPMError(f"{path} has {len(indices)} indices for {shape[0]} images; write the shard again")
        return cls(path, shape[0], tuple(shape[1:]), key, indices)

    def chunks(self, name: str, size: int) -> Iterator[np.ndarray]:
        """Array `name` of this file, `size` images at a time, read from the zip member as a stream."""
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{name}.npy") as f:
            shape, dtype = _header(f)
            for start in range(0, shape[0], size):
                part = np.empty((min(size, shape[0] - start), *shape[1:]), dtype)
                if f.readinto(memoryview(part).cast("B")) != part.nbytes:
                    raise DDPMError(f"{self.path} ends inside {name} (truncated?); write it again")
                yield part

    def member_shape(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{name}.npy") as f:
            return _header(f)


class SampleSet:
    """Samples files that hold images 0..n-1 of one run, each once: one plain ddpm-run output or all the shards of
    one run (`open_samples`). Arrays are read in image order, a chunk at a time."""

    def __init__(self, files: list[SampleFile]):
        self.files = files
        self.n = sum(f.n for f in files)
        self.image_shape = files[0].image_shape
        self.key = files[0].key

    def chunks(self, name: str, size: int) -> Iterator[np.ndarray]:
        for f in self.files:
            yield from f.chunks(name, size)


def _describe(key: dict[str, Any], field: str) -> str:
    value = key.get(field)
    return value[:12] if field in ("model", "noise") and isinstance(value, str) else json.dumps(value)[:60]


def check_shards(files: list[SampleFile]) -> list[SampleFile]:
    """The shards of one run in rank order, after checking they agree on model, chain, seed and the rest of the run
    key, and that every shard is there once and holds its own images."""
    first = files[0]
    for f in files:
        if f.key is None:
            raise DDPMError(f"{f.path} is not a shard (it has no run_key); pass the files ddpm-run {{opt:shard}} "
                            "wrote, or one merged file alone")
        for field in KEY_NAMES:
            if f.key.get(field) != first.key.get(field):
                raise DDPMError(f"{first.path} and {f.path} come from different {KEY_NAMES[field]}: "
                                f"{_describe(first.key, field)} vs {_describe(f.key, field)}; pass the shards of one "
                                "run")
    key = first.key
    world, n, batch = key["world"], key["n"], key["batch_size"]
    by_rank: dict[int, SampleFile] = {}
    for f in files:
        other = by_rank.setdefault(f.key["rank"], f)
        if other is not f:
            same = " (the same file twice)" if other.path.resolve() == f.path.resolve() else ""
            raise DDPMError(f"shard {f.key['rank']}/{world} is given twice{same}: {other.path} and {f.path}")
    missing = [r for r in range(world) if r not in by_rank]
    if missing:
        ranges = [Shard(r, world).indices(n, batch) for r in missing[:3]]
        where = ", ".join(f"{r}/{world} (images {s.start}..{s.stop - 1})" if s else f"{r}/{world}"
                          for r, s in zip(missing, ranges))
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DDPMError(f"{len(missing)} of {world} shards are missing: {where}{more}; pass all {world} shard files")
    ordered = [by_rank[r] for r in range(world)]
    for rank, f in enumerate(ordered):
        want = Shard(rank, world).indices(n, batch)
        if not np.array_equal(f.indices, np.arange(want.start, want.stop)):
            raise DDPMError(f"{f.path} does not hold the images of shard {rank}/{world} ({want.start}..{want.stop - 1} "
                            f"of {n}); it is damaged or was unfinished: run that shard again")
    return ordered


def open_samples(paths: list[Path]) -> SampleSet:
    """One plain samples file, or the complete, consistent shards of one run (any order), as one image stream."""
    if not paths:
        raise DDPMError("no samples files given")
    files = [SampleFile.open(Path(p)) for p in paths]
    if len(files) == 1 and files[0].key is None:
        return SampleSet(files)
    return SampleSet(check_shards(files))


def merge(paths: list[Path], out: Path, replace: bool, chunk: int = 256) -> SampleSet:
    """Join the shards of one run into `out`, the arrays a single ddpm-run of the whole run writes (arr_0 and
    samples), streamed a chunk at a time and written atomically; nothing is written if a check fails."""
    samples = SampleSet(check_shards([SampleFile.open(Path(p)) for p in paths]))
    if any(out.resolve() == f.path.resolve() for f in samples.files):
        raise DDPMError(f"{{opt:out}} {out} is one of the shards; choose another file")
    n = samples.n
    members = []
    for name in ("arr_0", "samples"):
        shape, dtype = samples.files[0].member_shape(name)
        members.append((name, (n, *shape[1:]), dtype.str, samples.chunks(name, chunk)))
    write_npz(out, members, replace)
    return samples
