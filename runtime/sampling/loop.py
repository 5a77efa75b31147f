"""The sampling loop, written once for every backend: ancestral DDPM and DDIM(eta), full or respaced.

A backend only supplies eps(x_t, t) on a batch (or, for a device-resident step graph, the whole update); the
formulas come from `runtime.sampling.steps`, the tables from `runtime.sampling.schedule`, the noise from `runtime.sampling.noise`. The model is
always called with the ORIGINAL timestep index `schedule.timesteps[k]`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from runtime.errors import DDPMError, NonFiniteError
from runtime.finite import all_finite
from runtime.progress import progress as progress_bar
from runtime.resources import require_memory
from runtime.sampling.chain import Chain
from runtime.sampling.noise import InjectedNoise, NoiseSource, PrefetchedNoise, SeededNoise
from runtime.sampling.rules import Stepper

DEFAULT_BATCH = 64


def run_chain(stepper: Stepper, chain: Chain, noise: NoiseSource, on_step: Callable[[], None] | None = None,
              overlap_noise: bool = True) -> np.ndarray:
    """The loop: x_T = first noise draw; then for k = K-1..0, x = step(x, original t, next noise draw).

    overlap_noise: draw each step's noise on a worker thread during the previous step (same draws, same samples)."""
    if overlap_noise:
        with PrefetchedNoise(noise, len(chain) + 1) as prefetched:
            return run_chain(stepper, chain, prefetched, on_step, overlap_noise=False)
    x_T = noise.draw()
    state = stepper.start(x_T)
    for k in reversed(range(len(chain))):
        t = np.full(len(x_T), chain.schedule.timesteps[k], dtype=np.int64)
        state = stepper.step(state, k, t, noise.draw())
        if isinstance(state, np.ndarray) and not all_finite(state):  # device-resident states: checked at the end
            _non_finite(chain, f"at step {len(chain) - k} of {len(chain)} (t={chain.schedule.timesteps[k]})")
        if on_step:
            on_step()
    out = stepper.finish(state)
    if not all_finite(out):
        _non_finite(chain, "by the end of the chain")
    return out


def _non_finite(chain: Chain, where: str) -> None:
    raise NonFiniteError(f"sampling produced NaN or inf {where} of {chain.describe()}: the model (NaN weights?) or "
                         "its noise is broken")


def batch_size_for(n: int, batch_range: tuple[int, int], requested: int | None = None) -> int:
    """The batch size of a run of n images: `requested`, else min(n, DEFAULT_BATCH) within the model's range. Image
    i's batch is then [i // size * size, ...), which sharded runs (`runtime.run.shards`) keep."""
    lo, hi = batch_range
    size = requested if requested is not None else max(lo, min(n, hi, DEFAULT_BATCH))
    if not 1 <= size <= hi:
        raise DDPMError(f"{{opt:batch_size}} must lie in 1..{hi} for this model, got {size}")
    return size


def sample_batches(model: Any, chain: Chain, n: int, *, image_shape: tuple[int, int, int] | None = None,
                   seed: int = 0, noise: np.ndarray | None = None, batch_size: int | None = None,
                   progress: bool = False, first: int = 0, overlap_noise: bool = True) \
        -> Iterator[tuple[int, np.ndarray]]:
    """Draw images first..n-1 of a run batch by batch: yields (index of the batch's first image, float32
    [b, C, H, W] in model space), holding one batch at a time (streaming writers and resumed runs use `first`).

    `model` is a backend from `runtime.backends.open_model` or any eps-callable (then give `image_shape`). Noise is
    seeded per image (`runtime.sampling.noise`) or injected as a [K+1, N, C, H, W] array; either way image i does not depend
    on `batch_size` or `first`. Arguments are checked here, before the first batch is drawn.
    """
    is_backend = hasattr(model, "stepper")
    shape = tuple(model.info.image_shape) if is_backend else image_shape
    if shape is None:
        raise DDPMError("give image_shape when sampling from a bare eps function")
    if n < 1:
        raise DDPMError(f"{{opt:n}} must be >= 1, got {n}")
    if not 0 <= first <= n:
        raise DDPMError(f"first image {first} lies outside 0..{n}")
    batch_size = batch_size_for(n, model.batch_range if is_backend else (1, n), batch_size)
    # x_t, its successor, the model output (up to 2C channels) and two noise draws, at the least
    require_memory(6 * batch_size * int(np.prod(shape)) * 4, f"a batch of {batch_size} images", "lower {opt:batch_size}")
    if noise is not None and (noise.ndim != 5 or noise.shape[:2] != (len(chain) + 1, n) or noise.shape[2:] != shape):
        raise DDPMError(f"injected noise has shape {list(noise.shape)}, need {[len(chain) + 1, n, *shape]}")
    stepper = model.stepper(chain) if is_backend else chain.stepper(model)
    return _batches(stepper, chain, range(first, n, batch_size), n, shape, seed, noise, progress, overlap_noise)


def _batches(stepper: Stepper, chain: Chain, starts: range, n: int, shape: tuple[int, ...], seed: int,
             noise: np.ndarray | None, progress: bool, overlap_noise: bool) -> Iterator[tuple[int, np.ndarray]]:
    with progress_bar(total=len(chain) * len(starts), desc="sampling", unit="step", show=progress) as bar:
        for start in starts:
            b = min(starts.step, n - start)
            source = InjectedNoise(noise, start, b) if noise is not None else SeededNoise(seed, start, b, shape)
            yield start, run_chain(stepper, chain, source, bar.update, overlap_noise)


def sample(model: Any, chain: Chain, n: int, *, image_shape: tuple[int, int, int] | None = None, seed: int = 0,
           noise: np.ndarray | None = None, batch_size: int | None = None, progress: bool = False,
           overlap_noise: bool = True) -> np.ndarray:
    """Draw n samples (float32 N x C x H x W, model space): `sample_batches` gathered into one array."""
    batches = sample_batches(model, chain, n, image_shape=image_shape, seed=seed, noise=noise,
                             batch_size=batch_size, progress=progress, overlap_noise=overlap_noise)
    out: np.ndarray | None = None
    for start, batch in batches:
        if out is None:
            out = np.empty((n, *batch.shape[1:]), dtype=np.float32)
        out[start:start + len(batch)] = batch
    assert out is not None
    return out
