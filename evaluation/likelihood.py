"""The variational bound of Ho et al. (2020) in bits per dimension, computed around any eps-callable.

Small pure NumPy functions (float64) composed by one per-step term and one loop, after improved-diffusion's
`calc_bpd_loop`: for every step k = K-1..0 of the schedule, x_t = q_sample(x_0, fresh noise), the model predicts
eps (and v for learned-range models), and the term is KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for k > 0 or the
discretized Gaussian decoder NLL for k = 0 (x_0 clipped as the sampler clips it). The prior term KL(q(x_T | x_0) ||
N(0, I)) completes the bound. Everything is a mean over dimensions in bits (divided by ln 2), per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from runtime.errors import DDPMError, NonFiniteError
from runtime.finite import all_finite
from runtime.progress import progress as progress_bar
from runtime.sampling import EpsFn
from runtime.sampling.noise import NoiseSource, SeededNoise
from runtime.sampling.schedule import Schedule, is_learned
from runtime.sampling.steps import DDPMCoefficients, learned_log_variance, posterior_mean, predict_x0, q_sample, split_output

LN2 = math.log(2.0)
BIN = 1.0 / 255.0  # half the width of one of the 256 pixel levels in [-1, 1]


def normal_kl(mean1: np.ndarray | float, logvar1: np.ndarray | float, mean2: np.ndarray | float,
              logvar2: np.ndarray | float) -> np.ndarray:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + np.exp(np.subtract(logvar1, logvar2))
                  + np.square(np.subtract(mean1, mean2)) * np.exp(np.negative(logvar2)))


def approx_standard_normal_cdf(x: np.ndarray) -> np.ndarray:
    """The tanh approximation of the standard normal CDF the paper's decoder uses."""
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: np.ndarray, means: np.ndarray, log_scales: np.ndarray) -> np.ndarray:
    """log P(x) in nats of data x (uint8 levels scaled to [-1, 1]) under N(means, exp(log_scales)^2) integrated over
    each pixel's bin; the edge bins take the open tails, probabilities are floored at 1e-12."""
    centered = x - means
    inv_std = np.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + BIN))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - BIN))
    log_cdf_plus = np.log(np.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = np.log(np.maximum(1.0 - cdf_min, 1e-12))
    log_delta = np.log(np.maximum(cdf_plus - cdf_min, 1e-12))
    return np.where(x < -0.999, log_cdf_plus, np.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(a: np.ndarray) -> np.ndarray:
    """Mean over every axis but the batch axis."""
    return a.reshape(len(a), -1).mean(axis=1)


def prior_bpd(x0: np.ndarray, schedule: Schedule) -> np.ndarray:
    """KL(q(x_T | x_0) || N(0, I)) per image in bits/dim: what the last step leaves of the data."""
    ac = schedule.alphas_cumprod[-1]
    return mean_flat(normal_kl(math.sqrt(ac) * x0, math.log(1.0 - ac), 0.0, 0.0)) / LN2


def model_log_variance(schedule: Schedule, variance_type: str, k: int, v: np.ndarray | None) -> np.ndarray | float:
    """The reverse step's log-variance at step k: the fixed table's entry, or the learned range's from v."""
    if not is_learned(variance_type):
        return float(schedule.log_variance(variance_type)[k])
    if v is None:
        raise DDPMError("learned_range variance needs the model's v output, but the model returned eps only")
    return learned_log_variance(v, schedule.posterior_log_variance_clipped[k], schedule.log_betas[k])


def vb_term(x0: np.ndarray, x_t: np.ndarray, out: np.ndarray, k: int, schedule: Schedule, variance_type: str,
            clip: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Step k's term of the bound per image in bits/dim, and the (clipped) x_0 prediction.

    `out` is the model output at step k (eps, or eps then v on channels for learned-range models).
    """
    c = DDPMCoefficients.tables(schedule, "fixed_small").row(k)  # mean coefficients; the variance comes below
    eps, v = split_output(out, x0.shape[1])
    x0_pred = predict_x0(x_t, eps, c.sqrt_recip_ac, c.sqrt_recipm1_ac, clip)
    mean = posterior_mean(x0_pred, x_t, c)
    logvar = model_log_variance(schedule, variance_type, k, v)
    if k == 0:
        nll = -discretized_gaussian_log_likelihood(x0, mean, np.broadcast_to(0.5 * np.asarray(logvar), x0.shape))
        return mean_flat(nll) / LN2, x0_pred
    kl = normal_kl(posterior_mean(x0, x_t, c), schedule.posterior_log_variance_clipped[k], mean, logvar)
    return mean_flat(kl) / LN2, x0_pred


@dataclass(frozen=True)
class BitsPerDim:
    """The bound's parts per image; column k of the [N, K] arrays is step k (k = 0 is the decoder term)."""

    total: np.ndarray  # [N] = vb.sum(1) + prior
    prior: np.ndarray  # [N] KL(q(x_T | x_0) || N(0, I))
    vb: np.ndarray  # [N, K] decoder NLL at k = 0, KL terms for k > 0
    xstart_mse: np.ndarray  # [N, K] mean squared error of the (clipped) x_0 prediction
    mse: np.ndarray  # [N, K] mean squared error of eps re-derived from that x_0 against the true noise

    @property
    def decoder(self) -> np.ndarray:
        return self.vb[:, 0]

    @property
    def kl_sum(self) -> np.ndarray:
        return self.vb[:, 1:].sum(axis=1)

    def summary(self) -> dict[str, float]:
        """Means over the images, the figures a report shows."""
        return {"bits_per_dim": float(self.total.mean()), "prior": float(self.prior.mean()),
                "kl_sum": float(self.kl_sum.mean()), "decoder": float(self.decoder.mean()),
                "n": int(len(self.total)), "steps": int(self.vb.shape[1])}

    @classmethod
    def concat(cls, parts: list["BitsPerDim"]) -> "BitsPerDim":
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                     ("total", "prior", "vb", "xstart_mse", "mse")))


def bits_per_dim(eps_fn: EpsFn, x0: np.ndarray, schedule: Schedule, variance_type: str, clip: float | None,
                 noise: NoiseSource, on_step: Callable[[], None] | None = None) -> BitsPerDim:
    """The whole bound for a batch x0 (float [N, C, H, W] in [-1, 1], on the 256-level grid).

    `clip`: the x_0 clip bound (the sampler's, e.g. 1.0) or None. One model call per step, k = K-1 down to 0, each with a fresh `noise.draw()` for q_sample (the order
    improved-diffusion's calc_bpd_loop draws in). The model is called with the original timestep index.
    """
    x0 = np.asarray(x0, dtype=np.float64)
    if x0.ndim != 4:
        raise DDPMError(f"data must be N x C x H x W, got shape {list(x0.shape)}")
    n, steps = len(x0), len(schedule)
    vb, xstart_mse, mse = (np.empty((n, steps)) for _ in range(3))
    for k in reversed(range(steps)):
        z = np.asarray(noise.draw(), dtype=np.float64)
        x_t = q_sample(x0, z, schedule.sqrt_alphas_cumprod[k], schedule.sqrt_one_minus_alphas_cumprod[k])
        x_t32 = x_t.astype(np.float32)  # what the model sees; the bound uses the same values
        x_t = x_t32.astype(np.float64)
        out = np.asarray(eps_fn(x_t32, np.full(n, schedule.timesteps[k], dtype=np.int64)), dtype=np.float64)
        if not all_finite(out):  # a bound of NaN would be reported as a number
            raise NonFiniteError(f"the model's output holds NaN or inf at t={schedule.timesteps[k]}: the model (NaN "
                                 "weights?) is broken; nothing was written")
        vb[:, k], x0_pred = vb_term(x0, x_t, out, k, schedule, variance_type, clip)
        xstart_mse[:, k] = mean_flat((x0_pred - x0) ** 2)
        eps_back = (schedule.sqrt_recip_alphas_cumprod[k] * x_t - x0_pred) / schedule.sqrt_recipm1_alphas_cumprod[k]
        mse[:, k] = mean_flat((eps_back - z) ** 2)
        if on_step:
            on_step()
    prior = prior_bpd(x0, schedule)
    return BitsPerDim(vb.sum(axis=1) + prior, prior, vb, xstart_mse, mse)


def dataset_bits_per_dim(eps_fn: EpsFn, x0: np.ndarray, schedule: Schedule, variance_type: str, clip: float | None,
                         seed: int, batch_size: int, progress: bool = False, first: int = 0) -> BitsPerDim:
    """`bits_per_dim` over many images in batches; image i draws its q_sample noise from rng([seed, first + i])
    (`runtime.sampling.noise.SeededNoise`), so the result depends neither on the batch size nor on how a data set is split
    into runs (`first`: the index of x0[0] in the whole data)."""
    parts = []
    batches = range(0, len(x0), batch_size)
    with progress_bar(total=len(schedule) * len(batches), desc="nll", unit="step", show=progress) as bar:
        for start in batches:
            b = min(batch_size, len(x0) - start)
            noise = SeededNoise(seed, first + start, b, tuple(x0.shape[1:]))
            parts.append(bits_per_dim(eps_fn, x0[start:start + b], schedule, variance_type, clip, noise, bar.update))
    return BitsPerDim.concat(parts)
