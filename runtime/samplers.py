"""The sampling loop, written once for every backend: ancestral DDPM and DDIM(eta), full or respaced.

A backend only supplies eps(x_t, t) on a batch (or, for a device-resident step graph, the whole update); the
formulas come from `runtime.steps`, the tables from `runtime.schedule`, the noise from `runtime.noise`. The model is
always called with the ORIGINAL timestep index `schedule.timesteps[k]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
from tqdm import tqdm

from runtime.errors import DDPMError
from runtime.noise import InjectedNoise, NoiseSource, SeededNoise
from runtime.schedule import VARIANCE_TYPES, DiffusionConfig, Schedule, sampling_schedule
from runtime.steps import DDIMCoefficients, DDPMCoefficients, ddim_step, ddpm_step, split_output

SAMPLERS = ("ddpm", "ddim")
DEFAULT_BATCH = 64

# (x_t [B,C,H,W] float32, t [B] int64) -> eps [B,C,H,W], or eps and v [B,2C,H,W] for learned-variance models
EpsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True, eq=False)
class Chain:
    """One reverse process: the schedule walked, the update rule and its per-step coefficients."""

    schedule: Schedule
    sampler: str = "ddpm"
    variance_type: str = "fixed_large"
    clip_denoised: bool = True
    eta: float = 0.0
    clip_range: float = 1.0
    coeffs: list[Any] = field(init=False, repr=False)  # per step k: DDPMCoefficients or DDIMCoefficients

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise DDPMError(f"unknown sampler {self.sampler!r}; use one of {', '.join(SAMPLERS)}")
        if self.variance_type not in VARIANCE_TYPES:
            raise DDPMError(f"unknown variance type {self.variance_type!r}; use one of {', '.join(VARIANCE_TYPES)}")
        if not 0.0 <= self.eta <= 1.0:
            raise DDPMError(f"eta must lie in [0, 1], got {self.eta}")
        n = len(self.schedule)
        if self.sampler == "ddpm":
            tables = DDPMCoefficients.tables(self.schedule, self.variance_type)
            coeffs: list[Any] = [tables.row(k) for k in range(n)]
        else:
            coeffs = [DDIMCoefficients.at(self.schedule, self.eta, k) for k in range(n)]
        object.__setattr__(self, "coeffs", coeffs)

    @classmethod
    def build(cls, diffusion: DiffusionConfig, sampler: str = "ddpm", steps: int | str | None = None,
              eta: float = 0.0, variance_type: str | None = None, clip_denoised: bool | None = None) -> "Chain":
        """The chain for a model's diffusion config; None options take the model's own settings."""
        if sampler not in SAMPLERS:
            raise DDPMError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
        if variance_type == "learned_range" and not diffusion.learned_variance:
            raise DDPMError(f"this model has {diffusion.variance_type} variance and no v output; learned_range needs "
                            "a learned-variance model (use fixed_small or fixed_large)")
        return cls(sampling_schedule(diffusion, steps), sampler,
                   variance_type or diffusion.variance_type,
                   diffusion.clip_denoised if clip_denoised is None else clip_denoised, eta, diffusion.clip_range)

    @property
    def clip(self) -> float | None:
        """The x_0 clip bound of this chain, None when it does not clip."""
        return self.clip_range if self.clip_denoised else None

    def __len__(self) -> int:
        return len(self.schedule)

    def update(self, k: int, x_t: np.ndarray, out: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """x_{k-1} from x_k, the model's output (eps, or eps and v) and this step's noise."""
        eps, v = split_output(out, x_t.shape[1])
        if self.sampler == "ddim":
            return ddim_step(x_t, eps, noise, self.coeffs[k], self.clip)
        if self.variance_type == "learned_range":
            if v is None:
                raise DDPMError("learned_range variance needs the model's v output, but the model returned eps only")
            return ddpm_step(x_t, eps, noise, self.coeffs[k], self.clip, v)
        return ddpm_step(x_t, eps, noise, self.coeffs[k], self.clip)

    def describe(self) -> str:
        extra = f"eta={self.eta:g}" if self.sampler == "ddim" else self.variance_type
        return f"{self.sampler} {len(self)} steps ({extra}, clip={'on' if self.clip_denoised else 'off'})"


class Stepper(Protocol):
    """How one batch moves through the chain; the host stepper below, or a backend's device-resident one."""

    def start(self, x_T: np.ndarray) -> Any: ...

    def step(self, state: Any, k: int, t: np.ndarray, noise: np.ndarray) -> Any: ...

    def finish(self, state: Any) -> np.ndarray: ...


class HostStepper:
    """x_t lives in host memory; the model only computes eps, the update runs in NumPy."""

    def __init__(self, eps: EpsFn, chain: Chain):
        self.eps, self.chain = eps, chain

    def start(self, x_T: np.ndarray) -> np.ndarray:
        return x_T

    def step(self, state: np.ndarray, k: int, t: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return self.chain.update(k, state, self.eps(state, t), noise)

    def finish(self, state: np.ndarray) -> np.ndarray:
        return state


def run_chain(stepper: Stepper, chain: Chain, noise: NoiseSource, on_step: Callable[[], None] | None = None) \
        -> np.ndarray:
    """The loop: x_T = first noise draw; then for k = K-1..0, x = step(x, original t, next noise draw)."""
    x_T = noise.draw()
    state = stepper.start(x_T)
    for k in reversed(range(len(chain))):
        t = np.full(len(x_T), chain.schedule.timesteps[k], dtype=np.int64)
        state = stepper.step(state, k, t, noise.draw())
        if on_step:
            on_step()
    return stepper.finish(state)


def sample(model: Any, chain: Chain, n: int, *, image_shape: tuple[int, int, int] | None = None, seed: int = 0,
           noise: np.ndarray | None = None, batch_size: int | None = None, progress: bool = False) -> np.ndarray:
    """Draw n samples (float32 N x C x H x W, model space).

    `model` is a backend from `runtime.backends.open_model` or any eps-callable (then give `image_shape`). Noise is
    seeded per image (`runtime.noise`) or injected as a [K+1, N, C, H, W] array; either way the result does not
    depend on `batch_size`. Only one batch of state is held at a time.
    """
    is_backend = hasattr(model, "stepper")
    shape = tuple(model.info.image_shape) if is_backend else image_shape
    if shape is None:
        raise DDPMError("give image_shape when sampling from a bare eps function")
    lo, hi = model.batch_range if is_backend else (1, n)
    if n < 1:
        raise DDPMError(f"--n must be >= 1, got {n}")
    if batch_size is None:
        batch_size = max(lo, min(n, hi, DEFAULT_BATCH))
    if not 1 <= batch_size <= hi:
        raise DDPMError(f"batch size must lie in 1..{hi} for this model, got {batch_size}")
    if noise is not None and (noise.ndim != 5 or noise.shape[:2] != (len(chain) + 1, n) or noise.shape[2:] != shape):
        raise DDPMError(f"injected noise has shape {list(noise.shape)}, need {[len(chain) + 1, n, *shape]}")
    stepper = model.stepper(chain) if is_backend else HostStepper(model, chain)
    out = np.empty((n, *shape), dtype=np.float32)
    with tqdm(total=len(chain) * -(-n // batch_size), desc="sampling", unit="step", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            source = InjectedNoise(noise, start, b) if noise is not None else SeededNoise(seed, start, b, shape)
            out[start:start + b] = run_chain(stepper, chain, source, bar.update)
    return out
