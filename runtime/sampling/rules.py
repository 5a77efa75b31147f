"""Sampling rules: how one sampler walks its timesteps and turns each model output into the next sample.

A rule is the runtime's counterpart of a diffusers scheduler: it picks its timesteps, precomputes its per-step
coefficient rows once (float64, from `runtime.sampling.schedule`), and makes the host stepper that applies the
formulas of `runtime.sampling.steps`. The loop, the backends and the server hold a rule object and ask it; none of
them compares sampler names. This module holds the protocol and the one-step rules (ancestral DDPM, DDIM); the
multistep solvers, which carry a history, are in `runtime.sampling.solvers`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Protocol, Sequence

import numpy as np

from runtime.errors import DDPMError
from runtime.sampling.schedule import DiffusionConfig, Schedule, is_learned, sampling_schedule, spaced_schedule
from runtime.sampling.steps import DDIMCoefficients, DDPMCoefficients, ddim_step, ddpm_step, split_output

# (x_t [B,C,H,W] float32, t [B] int64) -> eps [B,C,H,W], or eps and v [B,2C,H,W] for learned-variance models
EpsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Stepper(Protocol):
    """How one batch moves through the chain: a rule's host stepper, or a backend's device-resident one."""

    def start(self, x_T: np.ndarray) -> Any: ...

    def step(self, state: Any, k: int, t: np.ndarray, noise: np.ndarray) -> Any: ...

    def finish(self, state: Any) -> np.ndarray: ...


class ChainView(Protocol):
    """What a rule reads from the chain it serves (`runtime.sampling.chain.Chain`)."""

    schedule: Schedule
    rows: Sequence[Any]
    variance_type: str
    clip_denoised: bool

    @property
    def clip(self) -> float | None: ...


class Rule(ABC):
    """One sampler: its timesteps, its per-step rows and its host stepper."""

    name: ClassVar[str]
    default_steps: ClassVar[int | None] = None  # None: all T timesteps
    uses_eta: ClassVar[bool] = False

    def schedule(self, diffusion: DiffusionConfig, steps: int | str | None, spacing: str | None) -> Schedule:
        """The timesteps walked: Improved DDPM's respacing of `steps` (K, ddimK, section counts), or K timesteps
        spaced as diffusers does when `spacing` is given."""
        if spacing is None:
            return sampling_schedule(diffusion, steps)
        return spaced_schedule(diffusion, diffusion.num_timesteps if steps is None else steps, spacing)

    @abstractmethod
    def rows(self, schedule: Schedule, variance_type: str) -> list[Any]:
        """Per-step coefficients, index k = step from timestep k to k-1 (computed once per chain)."""

    @abstractmethod
    def stepper(self, eps: EpsFn, chain: ChainView) -> Stepper:
        """The host stepper: x_t in host memory, the model computes eps, the update runs in NumPy."""

    def fits_step_graph(self, chain: ChainView, baked: DiffusionConfig) -> bool:
        """Whether a device step graph baked for `baked` computes exactly this chain's updates."""
        return False

    def details(self, chain: ChainView) -> str:
        """What distinguishes this chain beyond rule name and step count (for summaries and run keys)."""
        return f"t={chain.schedule.timesteps[-1]}..{chain.schedule.timesteps[0]}"


class OneStepRule(Rule):
    """A rule whose update needs only x_t, the model output and the step's noise."""

    @abstractmethod
    def update(self, chain: ChainView, k: int, x_t: np.ndarray, out: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """x_{k-1} from x_k, the model's output (eps, or eps and v) and this step's noise."""

    def stepper(self, eps: EpsFn, chain: ChainView) -> Stepper:
        return UpdateStepper(eps, self, chain)


class UpdateStepper:
    """Host stepper of a one-step rule: the state is x_t itself."""

    def __init__(self, eps: EpsFn, rule: OneStepRule, chain: ChainView):
        self.eps, self.rule, self.chain = eps, rule, chain

    def start(self, x_T: np.ndarray) -> np.ndarray:
        return x_T

    def step(self, state: np.ndarray, k: int, t: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return self.rule.update(self.chain, k, state, self.eps(state, t), noise)

    def finish(self, state: np.ndarray) -> np.ndarray:
        return state


class Ancestral(OneStepRule):
    """Ho et al.'s ancestral step with the chain's variance (fixed small/large, or learned from v)."""

    name = "ddpm"

    def rows(self, schedule: Schedule, variance_type: str) -> list[Any]:
        tables = DDPMCoefficients.tables(schedule, variance_type)
        return [tables.row(k) for k in range(len(schedule))]

    def update(self, chain: ChainView, k: int, x_t: np.ndarray, out: np.ndarray, noise: np.ndarray) -> np.ndarray:
        eps, v = split_output(out, x_t.shape[1])
        if not is_learned(chain.variance_type):
            return ddpm_step(x_t, eps, noise, chain.rows[k], chain.clip)
        if v is None:
            raise DDPMError("learned_range variance needs the model's v output, but the model returned eps only")
        return ddpm_step(x_t, eps, noise, chain.rows[k], chain.clip, v)

    def fits_step_graph(self, chain: ChainView, baked: DiffusionConfig) -> bool:
        """A step graph bakes the full schedule, the ancestral update, the variance type and the clipping."""
        return (len(chain.schedule) == baked.num_timesteps and chain.variance_type == baked.variance_type
                and chain.clip_denoised == baked.clip_denoised)

    def details(self, chain: ChainView) -> str:
        return chain.variance_type


class DDIM(OneStepRule):
    """DDIM (Song et al.) with noise scale eta: 0 is deterministic, 1 matches the ancestral variance."""

    name = "ddim"
    uses_eta = True

    def __init__(self, eta: float = 0.0):
        if not (math.isfinite(eta) and 0.0 <= eta <= 1.0):
            raise DDPMError(f"eta must lie in [0, 1], got {eta}")
        self.eta = float(eta)

    def rows(self, schedule: Schedule, variance_type: str) -> list[Any]:
        return [DDIMCoefficients.at(schedule, self.eta, k) for k in range(len(schedule))]

    def update(self, chain: ChainView, k: int, x_t: np.ndarray, out: np.ndarray, noise: np.ndarray) -> np.ndarray:
        eps, _ = split_output(out, x_t.shape[1])
        return ddim_step(x_t, eps, noise, chain.rows[k], chain.clip)

    def details(self, chain: ChainView) -> str:
        return f"eta={self.eta:g}"
