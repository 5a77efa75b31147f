"""The paper's two figures through any backend, on the one sampling loop (`runtime.samplers.run_chain`).

Progressive generation (Ho et al. Fig. 6): the model's x_0 prediction as the chain runs, taken by wrapping the eps
function (a hook that sees every call) rather than by a second loop. Interpolation (Fig. 8): two data images are
encoded to x_t with the forward process, their latents mixed linearly, and each mix decoded by the reverse chain
cut at t with the same noise for every mix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.errors import DDPMError
from runtime.images import make_grid, to_uint8
from runtime.noise import InjectedNoise, NoiseSource, SeededNoise
from runtime.samplers import Chain, EpsFn, HostStepper, run_chain
from runtime.steps import predict_x0, q_sample, split_output


def _eps_of(model: Any) -> EpsFn:
    return model.eps if hasattr(model, "eps") else model


def progressive(model: Any, chain: Chain, noise: NoiseSource, every: int) -> np.ndarray:
    """Predicted x_0 of one batch as the chain runs, every `every` steps from the first (k = K-1) and at the last
    (k = 0): float32 [B, snapshots, C, H, W]. The chain and its samples are exactly those of `sample(...)`."""
    if every < 1:
        raise DDPMError(f"--progressive must be >= 1 steps, got {every}")
    eps_fn, K = _eps_of(model), len(chain)
    index = {int(t): k for k, t in enumerate(chain.schedule.timesteps)}
    schedule = chain.schedule
    snapshots: list[np.ndarray] = []

    def watched(x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        out = eps_fn(x_t, t)
        k = index[int(t[0])]
        if (K - 1 - k) % every == 0 or k == 0:
            eps, _ = split_output(out, x_t.shape[1])
            snapshots.append(np.asarray(predict_x0(x_t, eps, schedule.sqrt_recip_alphas_cumprod[k],
                                                   schedule.sqrt_recipm1_alphas_cumprod[k], chain.clip),
                                        dtype=np.float32))
        return out

    run_chain(HostStepper(watched, chain), chain, noise)
    return np.stack(snapshots, axis=1)


def progressive_grid(model: Any, chain: Chain, n: int, seed: int, every: int, noise: np.ndarray | None = None) \
        -> np.ndarray:
    """Fig. 6 as a picture: one row per image 0..n-1 of the run (seeded, or its injected noise), one column per
    snapshot of `progressive`."""
    shape = tuple(model.info.image_shape)
    source = InjectedNoise(noise, 0, n) if noise is not None else SeededNoise(seed, 0, n, shape)
    frames = progressive(model, chain, source, every)
    return make_grid(to_uint8(frames.reshape(-1, *shape), model.info.data_range), ncols=frames.shape[1])


class _StartFrom:
    """Noise source of a cut chain: the given x_t first, then the same per-step noise for every image."""

    def __init__(self, x_start: np.ndarray, shared: SeededNoise):
        self.first: np.ndarray | None = x_start
        self.shared = shared
        self.n = len(x_start)

    def draw(self) -> np.ndarray:
        if self.first is not None:
            x, self.first = self.first, None
            return x
        return np.repeat(self.shared.draw(), self.n, axis=0)


def interpolate(model: Any, chain: Chain, x0_a: np.ndarray, x0_b: np.ndarray, t: int, lambdas: np.ndarray,
                seed: int) -> np.ndarray:
    """Decoded mixes of two images ([C, H, W] in model space): float32 [len(lambdas), C, H, W].

    Both are encoded to the kept step at or below original timestep t (noise of rng([seed, 0]) and rng([seed, 1]));
    the mix (1 - lambda) x_t + lambda x'_t is decoded by the chain's steps at and below it (noise rng([seed, 2]),
    shared by all mixes).
    """
    kept = np.nonzero(chain.schedule.timesteps <= t)[0]
    if not 0 <= t <= int(chain.schedule.timesteps[-1]) or not len(kept):
        raise DDPMError(f"--t must lie in 0..{int(chain.schedule.timesteps[-1])}, got {t}")
    k = int(kept[-1])
    s = chain.schedule
    shape = tuple(x0_a.shape)
    z = SeededNoise(seed, 0, 2, shape).draw().astype(np.float64)
    x_t = q_sample(np.stack([x0_a, x0_b]).astype(np.float64), z, s.sqrt_alphas_cumprod[k],
                   s.sqrt_one_minus_alphas_cumprod[k])
    lam = np.asarray(lambdas, dtype=np.float64)[:, None, None, None]
    mixed = ((1.0 - lam) * x_t[0] + lam * x_t[1]).astype(np.float32)
    cut = Chain(s.respace(range(k + 1)), sampler=chain.sampler, variance_type=chain.variance_type,
                clip_denoised=chain.clip_denoised, eta=chain.eta, clip_range=chain.clip_range)
    stepper = model.stepper(cut) if hasattr(model, "stepper") else HostStepper(model, cut)
    return run_chain(stepper, cut, _StartFrom(mixed, SeededNoise(seed, 2, 1, shape)))
