"""The runtime's sampling loop, noise order and respacing, checked against independent implementations."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import DDPMError
from runtime.sampling.noise import chain_noise, load_noise, save_noise
from runtime.sampling import Chain, sample
from runtime.sampling.schedule import DiffusionConfig, space_timesteps

CONFIG = DiffusionConfig()
SHAPE = (1, 4, 4)


def toy_eps(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """A deterministic, per-image eps model: depends on x_t and t, so batching or order mistakes show."""
    return np.tanh(0.7 * x + (t.astype(np.float32) / 1000.0)[:, None, None, None]).astype(np.float32)


# --- noise ------------------------------------------------------------------------------------------------------


def test_chain_noise_layout_follows_the_documented_order():
    noise = chain_noise(seed=7, n=3, image_shape=SHAPE, num_steps=4)
    assert noise.shape == (5, 3, *SHAPE) and noise.dtype == np.float32
    for i in range(3):  # image i: its own stream, x_T first, then one draw per step
        rng = np.random.default_rng([7, i])
        expected = np.stack([rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(5)])
        np.testing.assert_array_equal(noise[:, i], expected)
    np.testing.assert_array_equal(chain_noise(7, 2, SHAPE, 4, start=1), noise[:, 1:3])
    assert not np.array_equal(chain_noise(8, 3, SHAPE, 4), noise)


def test_noise_file_round_trip_and_shape_check(tmp_path):
    path = save_noise(tmp_path / "noise.npy", seed=3, n=4, image_shape=SHAPE, num_steps=6)
    loaded = load_noise(path, n=4, image_shape=SHAPE, num_steps=6)
    np.testing.assert_array_equal(np.load(path), chain_noise(3, 4, SHAPE, 6))
    assert loaded.shape == (7, 4, *SHAPE)
    with pytest.raises(DDPMError, match=r"needs float32 \[8, 4, 1, 4, 4\]"):
        load_noise(path, n=4, image_shape=SHAPE, num_steps=7)
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(DDPMError, match="not a readable"):
        load_noise(tmp_path / "junk.npy", n=4, image_shape=SHAPE, num_steps=6)


# --- the loop ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", "20", None), ("ddim", "ddim10", 0.0), ("ddim", "8", 0.6)])
def test_samples_do_not_depend_on_batch_size(sampler, steps, eta):
    chain = Chain.build(CONFIG, sampler, steps, eta)
    ref = sample(toy_eps, chain, 7, image_shape=SHAPE, seed=11, batch_size=7)
    for b in (1, 3, 4):
        np.testing.assert_array_equal(sample(toy_eps, chain, 7, image_shape=SHAPE, seed=11, batch_size=b), ref)
    assert np.isfinite(ref).all() and ref.std() > 0.1


def test_injected_noise_reproduces_the_seeded_run_and_drives_the_result():
    chain = Chain.build(CONFIG, "ddpm", "25")
    noise = chain_noise(5, 6, SHAPE, len(chain))
    seeded = sample(toy_eps, chain, 6, image_shape=SHAPE, seed=5, batch_size=4)
    np.testing.assert_array_equal(sample(toy_eps, chain, 6, image_shape=SHAPE, noise=noise, batch_size=4), seeded)
    noise[3] += 1.0  # change one step's noise: every image moves
    moved = sample(toy_eps, chain, 6, image_shape=SHAPE, noise=noise, batch_size=4)
    assert (np.abs(moved - seeded).reshape(6, -1).max(axis=1) > 1e-3).all()


def test_model_is_called_with_original_timesteps_from_x_T_down():
    seen = []

    def eps(x, t):
        seen.append(t.copy())
        return toy_eps(x, t)

    chain = Chain.build(CONFIG, "ddim", "ddim10")
    sample(eps, chain, 3, image_shape=SHAPE, seed=0, batch_size=2)
    per_batch = [int(t[0]) for t in seen[:10]]
    assert per_batch == list(range(900, -1, -100))
    assert [len(t) for t in seen] == [2] * 10 + [1] * 10
    assert all(t.dtype == np.int64 and (t == t[0]).all() for t in seen)


def test_loop_equals_the_train_eager_sampler(tiny_checkpoint):
    """Same injected noise through the runtime loop (eager backend) and train.sampler: the same samples."""
    torch = pytest.importorskip("torch")
    from runtime.backends import open_model
    from train.checkpoint import load_checkpoint
    from train.sampler import sample as eager_sample

    backend = open_model(tiny_checkpoint, threads=1)
    for variance, steps in (("fixed_large", "30"), ("fixed_small", "10,5")):
        chain = Chain.build(backend.info.diffusion, "ddpm", steps, variance_type=variance)
        noise = chain_noise(2, 3, backend.info.image_shape, len(chain))
        ours = sample(backend, chain, 3, noise=noise, batch_size=2)
        ref = eager_sample(load_checkpoint(tiny_checkpoint).ema_model(), chain.schedule, (3, *backend.info.image_shape),
                           variance, True, noise)
        np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)
    assert torch.is_tensor(ref)


# --- respacing --------------------------------------------------------------------------------------------------


def improved_diffusion_rule(T: int, counts: list[int]) -> list[int]:
    """Section rule, written from its description: equal sections (the first T % len(counts) one longer); c steps
    in a section of L at fractional stride (L-1)/(c-1), positions accumulated and rounded half to even."""
    base, extra = divmod(T, len(counts))
    out, offset = [], 0
    for i, c in enumerate(counts):
        L = base + (i < extra)
        frac = (L - 1) / (c - 1) if c > 1 else 1
        pos = 0.0
        for _ in range(c):
            out.append(offset + round(pos))
            pos += frac
        offset += L
    return out


@pytest.mark.parametrize("T,counts", [(1000, [50]), (1000, [250]), (1000, [10, 15, 20]), (4000, [100]),
                                      (1000, [7]), (999, [3, 3, 3, 3]), (1000, [1000]), (1000, [1, 1])])
def test_respacing_equals_the_improved_diffusion_rule(T, counts):
    kept = space_timesteps(T, ",".join(map(str, counts)))
    assert kept == improved_diffusion_rule(T, counts)
    assert len(kept) == sum(counts) and kept[0] == 0 and kept == sorted(set(kept))
    chain = Chain.build(DiffusionConfig(num_timesteps=T), "ddpm", ",".join(map(str, counts)))
    assert chain.schedule.timesteps.tolist() == kept


@pytest.mark.parametrize("n", [10, 25, 50, 100, 250, 500, 7])
def test_ddim_spacing_is_the_first_exact_stride(n):
    stride = next(s for s in range(1, 1000) if len(range(0, 1000, s)) == n)
    assert space_timesteps(1000, f"ddim{n}") == list(range(0, 1000, stride))


@pytest.mark.parametrize("steps", ["0", "1001", "ddim999", "ddimx", "2,0", "abc", "-5"])
def test_step_counts_the_rule_cannot_produce_are_refused(steps):
    with pytest.raises(DDPMError):
        Chain.build(CONFIG, "ddpm", steps)


def test_bad_sampler_options_are_refused():
    with pytest.raises(DDPMError, match="unknown sampler"):
        Chain.build(CONFIG, "euler")
    with pytest.raises(DDPMError, match="eta"):
        Chain.build(CONFIG, "ddim", "10", eta=1.5)
    with pytest.raises(DDPMError, match="must be >= 1"):
        sample(toy_eps, Chain.build(CONFIG, "ddpm", "5"), 0, image_shape=SHAPE)
