"""Noise drawn on a worker thread during the previous step: the same samples, failures surface as one clean error."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from runtime.errors import DDPMError
from runtime.sampling.noise import MAX_NOISE_THREADS, PrefetchedNoise, SeededNoise, chain_noise, noise_threads
from runtime.sampling import Chain, run_chain, sample
from runtime.sampling.schedule import DiffusionConfig

SHAPE = (1, 8, 8)


def eps_fn(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.tanh(x) * (1.0 + t[:, None, None, None] / 1000.0)


@pytest.mark.parametrize("sampler,steps", [("ddpm", "20"), ("ddim", "ddim10")])
def test_overlap_gives_bit_identical_samples(sampler: str, steps: str) -> None:
    chain = Chain.build(DiffusionConfig(), sampler, steps, eta=0.5 if sampler == "ddim" else None)
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
    run_chain(chain.stepper(eps_fn), chain, Recording(0, 0, 2, SHAPE))
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
        run_chain(chain.stepper(eps_fn), chain, Failing(0, 0, 2, SHAPE))
    assert not [t for t in threading.enumerate() if t.name.startswith("ddpm-noise")]  # no thread left behind


def test_no_draw_beyond_the_announced_count() -> None:
    with PrefetchedNoise(SeededNoise(0, 0, 1, SHAPE), 2) as noise:
        noise.draw()
        noise.draw()
        with pytest.raises(DDPMError, match="more noise draws"):
            noise.draw()


def test_a_draw_split_over_threads_is_the_one_thread_draw() -> None:
    shape = (3, 16, 16)
    one, split = SeededNoise(4, 3, 7, shape, threads=1), SeededNoise(4, 3, 7, shape, threads=3)
    first = [np.random.default_rng([4, 3 + i]).standard_normal(shape, dtype=np.float32) for i in range(7)]
    draws = [(one.draw(), split.draw()) for _ in range(3)]
    assert np.array_equal(draws[0][0], np.stack(first))  # the documented order: image i's generator rng([seed, i])
    assert all(np.array_equal(a, b) for a, b in draws) and not np.array_equal(draws[0][0], draws[1][0])


def test_big_draws_use_several_threads_small_ones_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert noise_threads(64, (1, 8, 8)) == 1
    assert noise_threads(16, (3, 256, 256)) == MAX_NOISE_THREADS
    assert noise_threads(3, (3, 256, 256)) == 3  # never more threads than images
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert noise_threads(16, (3, 256, 256)) == 2


def test_a_failure_in_a_split_draw_is_a_clean_error() -> None:
    class Broken:
        def standard_normal(self, **kwargs: object) -> None:
            raise RuntimeError("generator state lost")

    source = SeededNoise(0, 0, 4, SHAPE, threads=2)
    source.rngs[3] = Broken()  # type: ignore[assignment]
    chain = Chain.build(DiffusionConfig(), "ddpm", "5")
    with pytest.raises(DDPMError, match=r"drawing noise failed \(RuntimeError: generator state lost\)"):
        run_chain(chain.stepper(eps_fn), chain, source)
