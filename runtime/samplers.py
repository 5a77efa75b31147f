"""The sampling loop, written once for every backend: ancestral DDPM and DDIM(eta), full or respaced.

A backend only supplies eps(x_t, t) on a batch (or, for a device-resident step graph, the whole update); the
formulas come from `runtime.steps`, the tables from `runtime.schedule`, the noise from `runtime.noise`. The model is
always called with the ORIGINAL timestep index `schedule.timesteps[k]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import numpy as np
from tqdm import tqdm

from runtime.errors import DDPMError
from runtime.noise import InjectedNoise, NoiseSource, PrefetchedNoise, SeededNoise
from runtime.resources import require_memory
from runtime.schedule import VARIANCE_TYPES, DiffusionConfig, Schedule, sampling_schedule, spaced_schedule
from runtime.solvers import SOLVERS, SolverStepper, solver_rows
from runtime.steps import DDIMCoefficients, DDPMCoefficients, ddim_step, ddpm_step, split_output
from runtime.validation import NonFiniteError, all_finite

SAMPLERS = ("ddpm", "ddim") + SOLVERS
DEFAULT_BATCH = 64
# The default chain of ddpm-run and ddpm-serve, from the sampler sweep (docs/sweep.md): SDE-DPM-Solver++(2M) matched
# 1,000-step ancestral DDPM from 10 calls on; 20 leaves a margin for models where the solver error weighs more.
DEFAULT_SAMPLER = "sde-dpm++2m"
DEFAULT_SOLVER_STEPS = 20


def default_sampler(model_kind: str) -> str:
    """The sampler a model runs when none is named: a step graph holds the ancestral DDPM update, so it runs that."""
    return "ddpm" if model_kind == "step" else DEFAULT_SAMPLER

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
        elif self.sampler in SOLVERS:
            coeffs = solver_rows(self.schedule, self.sampler)
        else:
            coeffs = [DDIMCoefficients.at(self.schedule, self.eta, k) for k in range(n)]
        object.__setattr__(self, "coeffs", coeffs)

    @classmethod
    def build(cls, diffusion: DiffusionConfig, sampler: str = "ddpm", steps: int | str | None = None,
              eta: float | None = None, variance_type: str | None = None, clip_denoised: bool | None = None,
              spacing: str | None = None) -> "Chain":
        """The chain for a model's diffusion config; None options take the model's own settings. `spacing`
        (linspace, leading, trailing; the solvers' default linspace) picks K = `steps` timesteps as diffusers does.
        Steps default to all T for ddpm and ddim, DEFAULT_SOLVER_STEPS for the solvers."""
        if sampler not in SAMPLERS:
            raise DDPMError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
        if sampler in SOLVERS and eta is not None:
            raise DDPMError(f"--eta is DDIM's noise scale; {sampler} takes none (use --sampler ddim, or sde-dpm++2m "
                            "for a stochastic solver)")
        if sampler in SOLVERS and steps is None:
            steps = DEFAULT_SOLVER_STEPS
        if variance_type == "learned_range" and not diffusion.learned_variance:
            raise DDPMError(f"this model has {diffusion.variance_type} variance and no v output; learned_range needs "
                            "a learned-variance model (use fixed_small or fixed_large)")
        schedule = (sampling_schedule(diffusion, steps) if spacing is None and sampler not in SOLVERS
                    else spaced_schedule(diffusion, diffusion.num_timesteps if steps is None else steps,
                                         spacing or "linspace"))
        return cls(schedule, sampler, variance_type or diffusion.variance_type,
                   diffusion.clip_denoised if clip_denoised is None else clip_denoised, eta or 0.0,
                   diffusion.clip_range)

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
        extra = f"eta={self.eta:g}" if self.sampler == "ddim" else self.variance_type if self.sampler == "ddpm" \
            else f"t={self.schedule.timesteps[-1]}..{self.schedule.timesteps[0]}"
        return f"{self.sampler} {len(self)} steps ({extra}, clip={'on' if self.clip_denoised else 'off'})"


class Stepper(Protocol):
    """How one batch moves through the chain; the host stepper below, or a backend's device-resident one."""

    def start(self, x_T: np.ndarray) -> Any: ...

    def step(self, state: Any, k: int, t: np.ndarray, noise: np.ndarray) -> Any: ...

    def finish(self, state: Any) -> np.ndarray: ...


class HostStepper:
    """x_t lives in host memory; the model only computes eps, the update runs in NumPy. The multistep solvers
    carry their history in the state (`runtime.solvers.SolverStepper`)."""

    def __init__(self, eps: EpsFn, chain: Chain):
        self.eps, self.chain = eps, chain
        self.solver = SolverStepper(eps, chain) if chain.sampler in SOLVERS else None

    def start(self, x_T: np.ndarray) -> Any:
        return self.solver.start(x_T) if self.solver else x_T

    def step(self, state: Any, k: int, t: np.ndarray, noise: np.ndarray) -> Any:
        if self.solver:
            return self.solver.step(state, k, t, noise)
        return self.chain.update(k, state, self.eps(state, t), noise)

    def finish(self, state: Any) -> np.ndarray:
        return self.solver.finish(state) if self.solver else state


def run_chain(stepper: Stepper, chain: Chain, noise: NoiseSource, on_step: Callable[[], None] | None = None,
              overlap_noise: bool = True) -> np.ndarray:
    """The loop: x_T = first noise draw; then for k = K-1..0, x = step(x, original t, next noise draw).

    overlap_noise: draw each step's noise on a worker thread during the previous step (same draws, same samples)."""
    if overlap_noise:
        with PrefetchedNoise(noise, len(chain) + 1) as prefetched:
            return run_chain(stepper, chain, prefetched, on_step, overlap_noise=False)
    x_T = noise.draw()
    state = stepper.start(x_T)
    for k in reversed(range(len(chain))):
        t = np.full(len(x_T), chain.schedule.timesteps[k], dtype=np.int64)
        state = stepper.step(state, k, t, noise.draw())
        if isinstance(state, np.ndarray) and not all_finite(state):  # device-resident states: checked at the end
            _non_finite(chain, f"at step {len(chain) - k} of {len(chain)} (t={chain.schedule.timesteps[k]})")
        if on_step:
            on_step()
    out = stepper.finish(state)
    if not all_finite(out):
        _non_finite(chain, "by the end of the chain")
    return out


def _non_finite(chain: Chain, where: str) -> None:
    raise NonFiniteError(f"sampling produced NaN or inf {where} of {chain.describe()}: the model (NaN weights?) or "
                         "its noise is broken")


def sample_batches(model: Any, chain: Chain, n: int, *, image_shape: tuple[int, int, int] | None = None,
                   seed: int = 0, noise: np.ndarray | None = None, batch_size: int | None = None,
                   progress: bool = False, first: int = 0, overlap_noise: bool = True) \
        -> Iterator[tuple[int, np.ndarray]]:
    """Draw images first..n-1 of a run batch by batch: yields (index of the batch's first image, float32
    [b, C, H, W] in model space), holding one batch at a time (streaming writers and resumed runs use `first`).

    `model` is a backend from `runtime.backends.open_model` or any eps-callable (then give `image_shape`). Noise is
    seeded per image (`runtime.noise`) or injected as a [K+1, N, C, H, W] array; either way image i does not depend
    on `batch_size` or `first`. Arguments are checked here, before the first batch is drawn.
    """
    is_backend = hasattr(model, "stepper")
    shape = tuple(model.info.image_shape) if is_backend else image_shape
    if shape is None:
        raise DDPMError("give image_shape when sampling from a bare eps function")
    lo, hi = model.batch_range if is_backend else (1, n)
    if n < 1:
        raise DDPMError(f"--n must be >= 1, got {n}")
    if not 0 <= first <= n:
        raise DDPMError(f"first image {first} lies outside 0..{n}")
    if batch_size is None:
        batch_size = max(lo, min(n, hi, DEFAULT_BATCH))
    if not 1 <= batch_size <= hi:
        raise DDPMError(f"batch size must lie in 1..{hi} for this model, got {batch_size}")
    # x_t, its successor, the model output (up to 2C channels) and two noise draws, at the least
    require_memory(6 * batch_size * int(np.prod(shape)) * 4, f"a batch of {batch_size} images", "lower --batch-size")
    if noise is not None and (noise.ndim != 5 or noise.shape[:2] != (len(chain) + 1, n) or noise.shape[2:] != shape):
        raise DDPMError(f"injected noise has shape {list(noise.shape)}, need {[len(chain) + 1, n, *shape]}")
    stepper = model.stepper(chain) if is_backend else HostStepper(model, chain)
    return _batches(stepper, chain, range(first, n, batch_size), n, shape, seed, noise, progress, overlap_noise)


def _batches(stepper: Stepper, chain: Chain, starts: range, n: int, shape: tuple[int, ...], seed: int,
             noise: np.ndarray | None, progress: bool, overlap_noise: bool) -> Iterator[tuple[int, np.ndarray]]:
    with tqdm(total=len(chain) * len(starts), desc="sampling", unit="step", disable=not progress) as bar:
        for start in starts:
            b = min(starts.step, n - start)
            source = InjectedNoise(noise, start, b) if noise is not None else SeededNoise(seed, start, b, shape)
            yield start, run_chain(stepper, chain, source, bar.update, overlap_noise)


def sample(model: Any, chain: Chain, n: int, *, image_shape: tuple[int, int, int] | None = None, seed: int = 0,
           noise: np.ndarray | None = None, batch_size: int | None = None, progress: bool = False,
           overlap_noise: bool = True) -> np.ndarray:
    """Draw n samples (float32 N x C x H x W, model space): `sample_batches` gathered into one array."""
    batches = sample_batches(model, chain, n, image_shape=image_shape, seed=seed, noise=noise,
                             batch_size=batch_size, progress=progress, overlap_noise=overlap_noise)
    out: np.ndarray | None = None
    for start, batch in batches:
        if out is None:
            out = np.empty((n, *batch.shape[1:]), dtype=np.float32)
        out[start:start + len(batch)] = batch
    assert out is not None
    return out
