"""Progressive generation (Ho et al. Fig. 6) through any backend, for `ddpm-run --progressive`.

The model's x_0 prediction as the chain runs, taken by wrapping the eps function (a hook that sees every call) on
the one sampling loop (`runtime.sampling.loop.run_chain`) rather than by a second loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.errors import DDPMError
from runtime.images import make_grid, to_uint8
from runtime.sampling import Chain, EpsFn, run_chain
from runtime.sampling.noise import InjectedNoise, NoiseSource, SeededNoise
from runtime.sampling.steps import predict_x0, split_output


def _eps_of(model: Any) -> EpsFn:
    return model.eps if hasattr(model, "eps") else model


def progressive(model: Any, chain: Chain, noise: NoiseSource, every: int) -> np.ndarray:
    """Predicted x_0 of one batch as the chain runs, every `every` steps from the first (k = K-1) and at the last
    (k = 0): float32 [B, snapshots, C, H, W]. The chain and its samples are exactly those of `sample(...)`."""
    if every < 1:
        raise DDPMError(f"{{opt:progressive}} must be >= 1 steps, got {every}")
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

    run_chain(chain.stepper(watched), chain, noise)
    return np.stack(snapshots, axis=1)


def progressive_grid(model: Any, chain: Chain, n: int, seed: int, every: int, noise: np.ndarray | None = None) \
        -> np.ndarray:
    """Fig. 6 as a picture: one row per image 0..n-1 of the run (seeded, or its injected noise), one column per
    snapshot of `progressive`."""
    shape = tuple(model.info.image_shape)
    source = InjectedNoise(noise, 0, n) if noise is not None else SeededNoise(seed, 0, n, shape)
    frames = progressive(model, chain, source, every)
    return make_grid(to_uint8(frames.reshape(-1, *shape), model.info.data_range), ncols=frames.shape[1])
