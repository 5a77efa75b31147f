"""The reverse-step formulas, written once.

They use only arithmetic operators, `.clip` and `.exp` (through `_exp`), so the same function runs on NumPy arrays (the runtime), on torch
tensors (train's eager sampler) and inside a traced torch module (export's step graph). Coefficients come from
`Schedule` tables: Python floats when the whole batch shares one step, or arrays broadcastable to the batch
([B, 1, 1, 1]) when it does not.

Noise convention (the same on every backend): a noise array is drawn for every step, the last one (t = 0) too, and
multiplied by a zero scale there, as in the original TF code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence, TypeVar, Union

import numpy as np

from runtime.errors import DDPMError
from runtime.sampling.schedule import Schedule, is_learned

Array = TypeVar("Array")  # np.ndarray or torch.Tensor
Clip = Union[bool, float, None]  # x_0 clip: a bound r (clip to [-r, r]), True for r = 1, False/None for none


@dataclass(frozen=True)
class DDPMCoefficients:
    """Per-step scalars (or broadcastable arrays) of the ancestral step."""

    sqrt_recip_ac: Any
    sqrt_recipm1_ac: Any
    mean_coef1: Any
    mean_coef2: Any
    noise_scale: Any  # exp(0.5 * logvar) of a fixed variance, zero at the last step (unused for learned_range)
    min_log: Any  # learned_range: log-variance at v = -1 (the clipped posterior log-variance)
    max_log: Any  # learned_range: log-variance at v = +1 (log beta)
    nonzero: Any  # 0 at the last step, else 1: no noise is added at t = 0

    @classmethod
    def tables(cls, schedule: Schedule, variance_type: str) -> "DDPMCoefficients":
        """Whole float64 tables, one entry per sampling step (for baking into a graph)."""
        nonzero = (np.arange(len(schedule)) > 0).astype(np.float64)
        fixed = not is_learned(variance_type)
        noise_scale = nonzero * np.exp(0.5 * schedule.log_variance(variance_type)) if fixed else nonzero * 0.0
        return cls(
            schedule.sqrt_recip_alphas_cumprod,
            schedule.sqrt_recipm1_alphas_cumprod,
            schedule.posterior_mean_coef1,
            schedule.posterior_mean_coef2,
            noise_scale,
            schedule.posterior_log_variance_clipped,
            schedule.log_betas,
            nonzero,
        )

    def row(self, k: int) -> "DDPMCoefficients":
        """Python floats of step k of whole tables (build the tables once, then take a row per step)."""
        return DDPMCoefficients(*(float(np.asarray(getattr(self, f.name))[k]) for f in fields(self)))


def split_output(out: Array, channels: int) -> tuple[Array, Optional[Array]]:
    """A model's output [B, C, H, W] (eps) or [B, 2C, H, W] (eps, then v of a learned-variance model)."""
    width = out.shape[1]
    if width == channels:
        return out, None
    if width == 2 * channels:
        return out[:, :channels], out[:, channels:]
    raise DDPMError(f"the model returned {width} channels for {channels}-channel images; expected {channels} (eps) "
                    f"or {2 * channels} (eps and v)")


def _exp(x: Any) -> Any:
    return x.exp() if hasattr(x, "exp") else np.exp(x)  # torch tensors (eager, traced) have .exp, NumPy has np.exp


def learned_log_variance(v: Array, min_log: Any, max_log: Any) -> Array:
    """Improved DDPM's learned range: frac * log(beta) + (1 - frac) * clipped posterior log-variance, frac = (v+1)/2."""
    frac = (v + 1.0) * 0.5
    return frac * max_log + (1.0 - frac) * min_log


def _clip_bound(clip: Clip) -> Optional[float]:
    if clip is True:
        return 1.0
    return float(clip) if clip else None


def predict_x0(x_t: Array, eps: Array, sqrt_recip_ac: Any, sqrt_recipm1_ac: Any, clip: Clip) -> Array:
    """x_0 = sqrt(1/ac) x_t - sqrt(1/ac - 1) eps, optionally clipped to the data range [-r, r]."""
    x0 = sqrt_recip_ac * x_t - sqrt_recipm1_ac * eps
    bound = _clip_bound(clip)
    return x0.clip(-bound, bound) if bound is not None else x0


def posterior_mean(x0: Array, x_t: Array, c: DDPMCoefficients) -> Array:
    """Mean of q(x_{t-1} | x_t, x_0)."""
    return c.mean_coef1 * x0 + c.mean_coef2 * x_t


def ddpm_step(x_t: Array, eps: Array, noise: Array, c: DDPMCoefficients, clip: Clip,
              v: Optional[Array] = None) -> Array:
    """One ancestral step: posterior mean from the (clipped) x_0 estimate plus scaled noise; with `v` (learned_range
    models) the noise scale is exp(0.5 * learned log-variance), else the fixed table's."""
    mean = posterior_mean(predict_x0(x_t, eps, c.sqrt_recip_ac, c.sqrt_recipm1_ac, clip), x_t, c)
    if v is None:
        return mean + c.noise_scale * noise
    return mean + c.nonzero * _exp(0.5 * learned_log_variance(v, c.min_log, c.max_log)) * noise


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


def ddim_step(x_t: Array, eps: Array, noise: Array, c: DDIMCoefficients, clip: Clip) -> Array:
    """One DDIM(eta) step; eps is re-derived from the clipped x_0 so that clipping stays consistent."""
    x0 = predict_x0(x_t, eps, c.sqrt_recip_ac, c.sqrt_recipm1_ac, clip)
    eps = (c.sqrt_recip_ac * x_t - x0) / c.sqrt_recipm1_ac
    return c.sqrt_ac_prev * x0 + c.eps_coef * eps + c.sigma * noise


def q_sample(x0: Array, noise: Array, sqrt_ac: Any, sqrt_one_minus_ac: Any) -> Array:
    """Forward process: x_t = sqrt(ac) x_0 + sqrt(1 - ac) eps."""
    return sqrt_ac * x0 + sqrt_one_minus_ac * noise


# Multistep solvers (DPM-Solver++, UniPC) in data-prediction form. Each step is a linear combination of the current
# sample, the newest x_0 predictions and the step's noise; the coefficients are float64 numbers computed once per
# chain from the half-log-SNR lambda = log(alpha / sigma) (`runtime.sampling.schedule.half_log_snr`), h = lambda_t - lambda_s.


@dataclass(frozen=True)
class MultistepCoefficients:
    """x_next = x_coef * x + sum_j weights[j] * x0s[j] + noise_coef * noise, with x0s the newest x_0 first."""

    x_coef: float
    weights: tuple[float, ...]
    noise_coef: float = 0.0


def multistep_step(x: Array, x0s: Sequence[Array], noise: Array, c: MultistepCoefficients) -> Array:
    """One solver step (predictor or corrector) from its expanded coefficients."""
    out = c.x_coef * x
    for weight, x0 in zip(c.weights, x0s):
        out = out + weight * x0
    return out + c.noise_coef * noise if c.noise_coef else out


def _to_zero_noise(alpha_t: float) -> MultistepCoefficients:
    """A step onto sigma = 0 (lambda = inf): every first-order update returns alpha_t * x_0."""
    return MultistepCoefficients(0.0, (alpha_t,))


def dpm_solver_pp_coefficients(lambdas: Sequence[float], lambda_t: float, alpha_t: float, sigma_t: float,
                               sigma_s: float, stochastic: bool = False) -> MultistepCoefficients:
    """DPM-Solver++ (Lu et al. 2022, midpoint form) of order len(lambdas) (1 or 2) from lambdas = (lambda_s0,
    lambda_s1) of the newest predictions. ODE: x_t = sigma_t/sigma_s x + alpha_t (1 - e^-h) (D0 + D1/2);
    SDE-DPM-Solver++: x_t = sigma_t/sigma_s e^-h x + alpha_t (1 - e^-2h) (D0 + D1/2) + sigma_t sqrt(1 - e^-2h) z,
    with D0 = x0_s0, D1 = (x0_s0 - x0_s1) / r, r = (lambda_s0 - lambda_s1) / h."""
    if sigma_t == 0.0:
        return _to_zero_noise(alpha_t)
    h = lambda_t - lambdas[0]
    if stochastic:
        x_coef, d0, noise = sigma_t / sigma_s * math.exp(-h), -alpha_t * math.expm1(-2.0 * h), \
            sigma_t * math.sqrt(-math.expm1(-2.0 * h))
    else:
        x_coef, d0, noise = sigma_t / sigma_s, -alpha_t * math.expm1(-h), 0.0
    if len(lambdas) == 1:
        return MultistepCoefficients(x_coef, (d0,), noise)
    half_over_r = 0.5 * h / (lambdas[0] - lambdas[1])
    return MultistepCoefficients(x_coef, (d0 * (1.0 + half_over_r), -d0 * half_over_r), noise)


def unipc_coefficients(lambdas: Sequence[float], lambda_t: float, alpha_t: float, sigma_t: float, sigma_s: float,
                       corrector: bool, variant: str = "bh2") -> MultistepCoefficients:
    """UniPC (Zhao et al. 2023) in data-prediction form, B(h) = e^h - 1 (bh2) or h (bh1).

    Predictor UniP-p, p = len(lambdas): weights on (x0_s0, x0_s1, ...), the predictions at lambdas.
    Corrector UniC-p, p = len(lambdas): weights on (x0_t, x0_s0, x0_s1, ...), x0_t being the prediction at the
    uncorrected x_t; x is the sample at s0. Both: x_t = sigma_t/sigma_s x - alpha_t (e^-h - 1) x0_s0
    - alpha_t B(h) sum_k rho_k D_k, D_k = (x0_k - x0_s0) / r_k, rho from the order conditions (rho = 1/2 for UniP-2
    and UniC-1, as the reference implementation)."""
    if sigma_t == 0.0:
        if len(lambdas) != 1 or corrector:
            raise DDPMError("a solver step onto sigma = 0 must be a first-order predictor")
        return _to_zero_noise(alpha_t)
    h = lambda_t - lambdas[0]
    hh = -h  # data prediction integrates in -lambda
    h_phi_1 = math.expm1(hh)
    b_h = {"bh1": hh, "bh2": h_phi_1}[variant]
    # r_k of the older predictions, then 1 for the newest point (x_t itself for the corrector, unused otherwise)
    rks = [(lam - lambdas[0]) / h for lam in lambdas[1:]] + [1.0]
    p = len(lambdas)
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1.0, 1.0
    for i in range(1, p + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R = np.array([[r ** (i - 1) for r in rks] for i in range(1, p + 1)])
    if corrector:
        rhos = [0.5] if p == 1 else [float(r) for r in np.linalg.solve(R, np.array(b))]
    else:
        rhos = [] if p == 1 else [0.5] if p == 2 else [float(r) for r in np.linalg.solve(R[:-1, :-1],
                                                                                       np.array(b[:-1]))]
    scale = -alpha_t * b_h
    history = [scale * rho / r for rho, r in zip(rhos, rks[:-1])]  # weights of x0_s1, x0_s2, ...
    newest = -alpha_t * h_phi_1 - sum(history)
    x_coef = sigma_t / sigma_s
    if not corrector:
        return MultistepCoefficients(x_coef, (newest, *history))
    # the corrector's extra term rho_last * (x0_t - x0_s0) with r = 1
    return MultistepCoefficients(x_coef, (scale * rhos[-1], newest - scale * rhos[-1], *history))
