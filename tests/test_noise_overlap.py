"""Noise drawn on a worker thread during the previous step: the same samples, failures surface as one clean error."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from runtime.errors import DDPMError
from runtime.noise import PrefetchedNoise, SeededNoise, chain_noise
from runtime.samplers import Chain, HostStepper, run_chain, sample
from runtime.schedule import DiffusionConfig

SHAPE = (1, 8, 8)


def eps_fn(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.tanh(x) * (1.0 + t[:, None, None, None] / 1000.0)


@pytest.mark.parametrize("sampler,steps", [("ddpm", "20"), ("ddim", "ddim10")])
def test_overlap_gives_bit_identical_samples(sampler: str, steps: str) -> None:
    chain = Chain.build(DiffusionConfig(), sampler, steps, eta=0.5 if sampler == "ddim" else 0.0)
    serial = sample(eps_fn, chain, 5, image_shape=SHAPE, seed=3, batch_size=2, overlap_noise=False)
    overlapped = sample(eps_fn, chain, 5, image_shape=SHAPE, seed=3, batch_size=2, overlap_noise=True)
    assert serial.std() > 0.1
    assert np.array_equal(serial, overlapped)
    injected = chain_noise(3, 5, SHAPE, len(chain))  # exactly K+1 draws: the prefetch must not ask for one more
    assert np.array_equal(sample(eps_fn, chain, 5, image_shape=SHAPE, noise=injected, batch_size=3), serial)


def test_draws_run_on_a_worker_thread() -> None:
    seen: list[str] = []

    class Recording(SeededNoise):
        def draw(self) -> np.ndarray:
            seen.append(threading.current_thread().name)
            return super().draw()

    chain = Chain.build(DiffusionConfig(), "ddpm", "5")
    run_chain(HostStepper(eps_fn, chain), chain, Recording(0, 0, 2, SHAPE))
    assert len(seen) == len(chain) + 1 and all(name.startswith("ddpm-noise") for name in seen)


def test_worker_failure_is_a_clean_error_not_a_hang() -> None:
    class Failing(SeededNoise):
        calls = 0

        def draw(self) -> np.ndarray:
            Failing.calls += 1
            if Failing.calls == 4:
                raise MemoryError("no room for the noise")
            return super().draw()

    chain = Chain.build(DiffusionConfig(), "ddpm", "10")
    with pytest.raises(DDPMError, match=r"drawing noise failed \(MemoryError: no room for the noise\)"):
        run_chain(HostStepper(eps_fn, chain), chain, Failing(0, 0, 2, SHAPE))
    assert not [t for t in threading.enumerate() if t.name.startswith("ddpm-noise")]  # no thread left behind


def test_no_draw_beyond_the_announced_count() -> None:
    with PrefetchedNoise(SeededNoise(0, 0, 1, SHAPE), 2) as noise:
        noise.draw()
        noise.draw()
        with pytest.raises(DDPMError, match="more noise draws"):
            noise.draw()
