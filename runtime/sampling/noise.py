"""Host-side noise in one documented order, so a seed gives the same samples on every backend and batch size.

Order: image i (counted over the whole run, not the batch) has its own generator `numpy.random.default_rng([seed,
i])`. It first draws x_T, then one noise array per sampling step taken, the last step (t = 0) included (it is scaled
by zero there, see `runtime.sampling.steps`), each as `standard_normal((C, H, W), dtype=float32)`.

Noise file (written by `ddpm-run --save-noise`, read by `--noise` and by the C++ host): a float32 `.npy` of shape
[K+1, N, C, H, W]; index 0 is x_T, index 1+j the noise of the j-th step taken (j = 0 is the first step, t = T-1).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np

from runtime.errors import DDPMError
from runtime.fileio import atomic_write
from runtime.resources import require_memory
from runtime.finite import all_finite
from runtime.errors import NonFiniteError


class NoiseSource(Protocol):
    """Gives the chain's noise for one batch, one [B, C, H, W] float32 array per call: x_T first, then per step."""

    def draw(self) -> np.ndarray: ...


# A draw is split over threads by images, each image's generator filling its own slice (so the result does not
# depend on the split); a thread gets at least this many values, below which dispatch costs more than it saves.
MIN_VALUES_PER_THREAD = 1 << 16
MAX_NOISE_THREADS = 8


@functools.lru_cache(maxsize=1)
def _draw_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=MAX_NOISE_THREADS, thread_name_prefix="ddpm-draw")


def noise_threads(n: int, image_shape: tuple[int, ...]) -> int:
    """Threads for one draw of n images: 1 for small draws, up to the cores (at most MAX_NOISE_THREADS) for big
    ones, which would take one core longer than the GPU takes for the step they feed."""
    values = n * int(np.prod(image_shape))
    return max(1, min(os.cpu_count() or 1, MAX_NOISE_THREADS, n, values // MIN_VALUES_PER_THREAD))


class SeededNoise:
    """Noise for images start..start+n-1 of a run seeded with `seed`, drawn lazily (memory: one batch)."""

    def __init__(self, seed: int, start: int, n: int, image_shape: tuple[int, int, int], threads: int | None = None):
        if seed < 0:
            raise DDPMError(f"seed must be >= 0, got {seed}")
        self.rngs = [np.random.default_rng([seed, i]) for i in range(start, start + n)]
        self.image_shape = tuple(image_shape)
        self.threads = threads or noise_threads(n, self.image_shape)

    def draw(self) -> np.ndarray:
        out = np.empty((len(self.rngs), *self.image_shape), np.float32)

        def fill(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                self.rngs[i].standard_normal(dtype=np.float32, out=out[i])

        if self.threads == 1:
            fill(0, len(out))
        else:
            bounds = np.linspace(0, len(out), self.threads + 1).astype(int)
            for job in [_draw_pool().submit(fill, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]:
                job.result()
        return out


class InjectedNoise:
    """Noise read from a [K+1, N, C, H, W] array (or memory-mapped file), images start..start+n-1."""

    def __init__(self, noise: np.ndarray, start: int, n: int):
        self.noise, self.start, self.n, self.next = noise, start, n, 0

    def draw(self) -> np.ndarray:
        if self.next >= len(self.noise):
            raise DDPMError(f"injected noise has {len(self.noise)} entries but the chain asked for more")
        out = np.array(self.noise[self.next, self.start:self.start + self.n], dtype=np.float32)  # writable copy
        self.next += 1
        return out


class PrefetchedNoise:
    """Draws the next array on a worker thread while the caller's device step runs, so host-side noise is off the
    critical path (NumPy's generators release the GIL while they fill arrays). The same draws in the same order as
    `source`, so samples are bit-identical; at most `count` draws are made, none beyond what the chain asks for.
    Use as a context manager: leaving it waits for the worker, so no thread outlives the chain."""

    def __init__(self, source: NoiseSource, count: int):
        self.source, self.left = source, count
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddpm-noise")
        self.pending: Future[np.ndarray] | None = self._next()

    def _next(self) -> Future[np.ndarray] | None:
        if self.left <= 0:
            return None
        self.left -= 1
        return self.pool.submit(self.source.draw)

    def draw(self) -> np.ndarray:
        if self.pending is None:
            raise DDPMError("the chain asked for more noise draws than it announced")
        try:
            out = self.pending.result()
        except DDPMError:
            raise
        except Exception as exc:  # a failure in the worker surfaces here, in the caller's thread, as one line
            raise DDPMError(f"drawing noise failed ({type(exc).__name__}: {exc})") from None
        self.pending = self._next()
        return out

    def __enter__(self) -> "PrefetchedNoise":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pending is not None:
            self.pending.cancel()
        self.pool.shutdown(wait=True)


def chain_noise(seed: int, n: int, image_shape: tuple[int, int, int], num_steps: int, start: int = 0) -> np.ndarray:
    """The [K+1, n, C, H, W] noise a seeded run uses for images start..start+n-1 and K = `num_steps` steps."""
    source = SeededNoise(seed, start, n, image_shape)
    return np.stack([source.draw() for _ in range(num_steps + 1)])


def check_save_noise(n: int, image_shape: tuple[int, int, int]) -> None:
    """save_noise holds one step of all n images (and its bytes): refuse before sampling what cannot fit."""
    require_memory(2 * n * int(np.prod(image_shape)) * 4, f"{{opt:noise_out}} for {n} images", "lower {opt:n}")


def save_noise(path: str | os.PathLike, seed: int, n: int, image_shape: tuple[int, int, int], num_steps: int, *,
               replace: bool = True) -> Path:
    """Write the noise file of a seeded run, streaming one step at a time (memory: one step of all N images)."""
    shape = (num_steps + 1, n, *image_shape)
    check_save_noise(n, image_shape)

    def write(f) -> None:  # type: ignore[no-untyped-def]
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        source = SeededNoise(seed, 0, n, image_shape)
        for _ in range(num_steps + 1):
            f.write(source.draw().astype("<f4", copy=False).tobytes())

    return atomic_write(path, write, replace=replace)


def load_noise(path: str | os.PathLike, n: int, image_shape: tuple[int, int, int], num_steps: int) -> np.ndarray:
    """Memory-map a noise file and check it fits the run; a wrong file gives a one-line DDPMError."""
    path = Path(path)
    if not path.is_file():
        raise DDPMError(f"noise file {path} not found")
    try:
        noise = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DDPMError(f"{path} is not a readable .npy noise file ({exc})") from None
    want = (num_steps + 1, n, *image_shape)
    if noise.dtype != np.float32 or noise.shape != want:
        raise DDPMError(f"noise file {path} holds {noise.dtype} {list(noise.shape)}, this run needs float32 "
                        f"{list(want)} ([steps+1, n, C, H, W])")
    for j in range(len(noise)):  # one step at a time: the memory map never becomes resident as a whole
        if not all_finite(noise[j]):
            raise NonFiniteError(f"noise file {path} holds NaN or inf in entry {j} of {len(noise)} "
                                 f"({'x_T' if j == 0 else f'the noise of step {j}'}); write it again with {{opt:noise_out}}")
    return noise
