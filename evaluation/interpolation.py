"""Interpolation in the diffusion latent space (Ho et al. Fig. 8) through any backend, for `ddpm-eval interpolate`.

Two data images are encoded to x_t with the forward process, their latents mixed linearly, and each mix decoded by
the reverse chain cut at t (`Chain.cut`) with the same noise for every mix, on the one sampling loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.errors import DDPMError
from runtime.sampling import Chain, run_chain
from runtime.sampling.noise import SeededNoise
from runtime.sampling.steps import q_sample


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
        raise DDPMError(f"{{opt:t}} must lie in 0..{int(chain.schedule.timesteps[-1])}, got {t}")
    k = int(kept[-1])
    s = chain.schedule
    shape = tuple(x0_a.shape)
    z = SeededNoise(seed, 0, 2, shape).draw().astype(np.float64)
    x_t = q_sample(np.stack([x0_a, x0_b]).astype(np.float64), z, s.sqrt_alphas_cumprod[k],
                   s.sqrt_one_minus_alphas_cumprod[k])
    lam = np.asarray(lambdas, dtype=np.float64)[:, None, None, None]
    mixed = ((1.0 - lam) * x_t[0] + lam * x_t[1]).astype(np.float32)
    cut = chain.cut(k)
    stepper = model.stepper(cut) if hasattr(model, "stepper") else cut.stepper(model)
    return run_chain(stepper, cut, _StartFrom(mixed, SeededNoise(seed, 2, 1, shape)))
