"""The reverse-step formulas, written once.

They use only arithmetic operators and `.clip`, so the same function runs on NumPy arrays (the runtime), on torch
tensors (train's eager sampler) and inside a traced torch module (export's step graph). Coefficients come from
`Schedule` tables: Python floats when the whole batch shares one step, or arrays broadcastable to the batch
([B, 1, 1, 1]) when it does not.

Noise convention (the same on every backend): a noise array is drawn for every step, the last one (t = 0) too, and
multiplied by a zero scale there, as in the original TF code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from runtime.schedule import Schedule

Array = TypeVar("Array")  # np.ndarray or torch.Tensor


@dataclass(frozen=True)
class DDPMCoefficients:
    """Per-step scalars (or broadcastable arrays) of the ancestral step."""

    sqrt_recip_ac: Any
    sqrt_recipm1_ac: Any
    mean_coef1: Any
    mean_coef2: Any
    noise_scale: Any  # exp(0.5 * logvar), zero at the last step

    @classmethod
    def tables(cls, schedule: Schedule, variance_type: str) -> "DDPMCoefficients":
        """Whole float64 tables, one entry per sampling step (for baking into a graph)."""
        noise_scale = np.exp(0.5 * schedule.log_variance(variance_type))
        noise_scale = np.where(np.arange(len(schedule)) == 0, 0.0, noise_scale)
        return cls(
            schedule.sqrt_recip_alphas_cumprod,
            schedule.sqrt_recipm1_alphas_cumprod,
            schedule.posterior_mean_coef1,
            schedule.posterior_mean_coef2,
            noise_scale,
        )

    def row(self, k: int) -> "DDPMCoefficients":
        """Python floats of step k of whole tables (build the tables once, then take a row per step)."""
        return DDPMCoefficients(*(float(np.asarray(v)[k]) for v in (
            self.sqrt_recip_ac, self.sqrt_recipm1_ac, self.mean_coef1, self.mean_coef2, self.noise_scale)))


def predict_x0(x_t: Array, eps: Array, sqrt_recip_ac: Any, sqrt_recipm1_ac: Any, clip: bool) -> Array:
    """x_0 = sqrt(1/ac) x_t - sqrt(1/ac - 1) eps, optionally clipped to the data range [-1, 1]."""
    x0 = sqrt_recip_ac * x_t - sqrt_recipm1_ac * eps
    return x0.clip(-1.0, 1.0) if clip else x0


def ddpm_step(x_t: Array, eps: Array, noise: Array, c: DDPMCoefficients, clip: bool) -> Array:
    """One ancestral step: posterior mean from the (clipped) x_0 estimate plus scaled noise."""
    x0 = predict_x0(x_t, eps, c.sqrt_recip_ac, c.sqrt_recipm1_ac, clip)
    return c.mean_coef1 * x0 + c.mean_coef2 * x_t + c.noise_scale * noise


@dataclass(frozen=True)
class DDIMCoefficients:
    sqrt_recip_ac: float
    sqrt_recipm1_ac: float
    sqrt_ac_prev: float
    eps_coef: float  # sqrt(1 - ac_prev - sigma^2)
    sigma: float

    @classmethod
    def at(cls, schedule: Schedule, eta: float, k: int) -> "DDIMCoefficients":
        ac = float(schedule.alphas_cumprod[k])
        ac_prev = float(schedule.alphas_cumprod_prev[k])  # 1 at the last step
        sigma = eta * math.sqrt((1.0 - ac_prev) / (1.0 - ac)) * math.sqrt(1.0 - ac / ac_prev)
        return cls(
            float(schedule.sqrt_recip_alphas_cumprod[k]),
            float(schedule.sqrt_recipm1_alphas_cumprod[k]),
            math.sqrt(ac_prev),
            math.sqrt(max(1.0 - ac_prev - sigma * sigma, 0.0)),
            sigma,
        )


def ddim_step(x_t: Array, eps: Array, noise: Array, c: DDIMCoefficients, clip: bool) -> Array:
    """One DDIM(eta) step; eps is re-derived from the clipped x_0 so that clipping stays consistent."""
    x0 = predict_x0(x_t, eps, c.sqrt_recip_ac, c.sqrt_recipm1_ac, clip)
    eps = (c.sqrt_recip_ac * x_t - x0) / c.sqrt_recipm1_ac
    return c.sqrt_ac_prev * x0 + c.eps_coef * eps + c.sigma * noise


def q_sample(x0: Array, noise: Array, sqrt_ac: Any, sqrt_one_minus_ac: Any) -> Array:
    """Forward process: x_t = sqrt(ac) x_0 + sqrt(1 - ac) eps."""
    return sqrt_ac * x0 + sqrt_one_minus_ac * noise
