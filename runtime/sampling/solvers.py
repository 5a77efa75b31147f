"""Fast samplers: multistep exponential-integrator solvers that carry their own history of x_0 predictions.

DPM-Solver++(2M) (deterministic, the probability-flow ODE), SDE-DPM-Solver++(2M) (stochastic) and UniPC-2 (bh2,
predictor-corrector, deterministic), in data-prediction form with the x_0 clip of the chain. They take their first
step at first order (no history yet) and their last step, onto sigma = 0, at first order too, exactly as diffusers'
`DPMSolverMultistepScheduler` / `UniPCMultistepScheduler` with `lower_order_final=True, final_sigmas_type="zero"`.
The coefficients come from `runtime.sampling.steps` (one formula, one place), computed once per chain in float64; the loop
is `runtime.sampling.loop.run_chain`, so the noise follows the runtime's contract (x_T first, one draw per step; only the
stochastic solver uses the per-step draws).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple, Optional

import numpy as np

from runtime.errors import DDPMError
from runtime.sampling.rules import ChainView, EpsFn, Rule, Stepper
from runtime.sampling.schedule import DiffusionConfig, Schedule, half_log_snr, spaced_schedule
from runtime.sampling.steps import (MultistepCoefficients, dpm_solver_pp_coefficients, multistep_step, predict_x0,
                                    split_output, unipc_coefficients)

ORDER = 2  # every solver here is second order
MIN_STEPS = ORDER + 1  # first and last steps are first order: below this no step reaches the solver's order
# The default step count of the solvers: above the count where the sampler sweep (docs/sweep.md) finds
# SDE-DPM-Solver++(2M) as good as the full ancestral DDPM chain, with a margin for models where the solver error
# weighs more.
DEFAULT_SOLVER_STEPS = 20

# (history lambdas, newest first; lambda_t, alpha_t, sigma_t where the step lands; sigma_s at its start)
Predictor = Callable[[list[float], float, float, float, float], MultistepCoefficients]


@dataclass(frozen=True)
class SolverRow:
    """Step k of a solver chain: the x_0 prediction's coefficients, an optional corrector and the predictor."""

    sqrt_recip_ac: float
    sqrt_recipm1_ac: float
    corrector: Optional[MultistepCoefficients]  # UniC: corrects x_k with the model output at x_k (UniPC only)
    predictor: MultistepCoefficients
    keep: int  # x_0 predictions the predictor uses, which are also all the next step's corrector needs


def solver_rows(schedule: Schedule, name: str, predictor: Predictor, corrector: Optional[Predictor] = None) \
        -> list[SolverRow]:
    """Per-step coefficients of a multistep solver on a (respaced) schedule: step k goes from timestep k to k-1,
    and step 0 ends at sigma = 0. `corrector`, when given, corrects x_k with the model output at x_k (UniC)."""
    K = len(schedule)
    if K < MIN_STEPS:
        raise DDPMError(f"{name} is a second-order multistep solver and needs at least {MIN_STEPS} steps, got {K}; "
                        "use more {opt:steps} or the ddim sampler")
    ac = schedule.alphas_cumprod
    alphas, sigmas, lambdas = np.sqrt(ac), np.sqrt(1.0 - ac), half_log_snr(ac)

    def target(k: int) -> tuple[float, float, float]:  # (lambda, alpha, sigma) where step k lands
        if k == 0:
            return float("inf"), 1.0, 0.0
        return float(lambdas[k - 1]), float(alphas[k - 1]), float(sigmas[k - 1])

    def order(k: int) -> int:  # lower order at the first step (no history) and the last (onto sigma = 0)
        first = K - 1 - k
        return 1 if first == 0 or k == 0 else min(ORDER, first + 1)

    rows = []
    for k in reversed(range(K)):
        p = order(k)
        history = [float(lambdas[k + j]) for j in range(p)]  # lambda of the newest prediction first
        correct = None
        if corrector is not None and k < K - 1:  # order of the previous predictor, from s0 = timestep k+1
            correct = corrector([float(lambdas[k + 1 + j]) for j in range(order(k + 1))], float(lambdas[k]),
                                float(alphas[k]), float(sigmas[k]), float(sigmas[k + 1]))
        rows.append(SolverRow(float(schedule.sqrt_recip_alphas_cumprod[k]),
                              float(schedule.sqrt_recipm1_alphas_cumprod[k]), correct,
                              predictor(history, *target(k), float(sigmas[k])), p))
    return rows[::-1]


class SolverState(NamedTuple):
    """One batch mid-chain: x at the current timestep, the sample the corrector starts from, x_0 predictions."""

    x: np.ndarray
    x_last: Optional[np.ndarray]  # x at the previous timestep (after its correction): the corrector's base
    x0s: tuple[np.ndarray, ...]  # newest first


class SolverStepper:
    """Host stepper of the multistep solvers: x_t and its history of x_0 predictions live in host memory."""

    def __init__(self, eps: EpsFn, chain: ChainView) -> None:
        self.eps, self.chain = eps, chain

    def start(self, x_T: np.ndarray) -> SolverState:
        return SolverState(x_T, None, ())

    def step(self, state: SolverState, k: int, t: np.ndarray, noise: np.ndarray) -> SolverState:
        row: SolverRow = self.chain.rows[k]
        eps, _ = split_output(self.eps(state.x, t), state.x.shape[1])  # a learned variance's v is not used
        x0 = predict_x0(state.x, eps, row.sqrt_recip_ac, row.sqrt_recipm1_ac, self.chain.clip)
        x = state.x
        if row.corrector is not None:
            x = multistep_step(state.x_last, (x0, *state.x0s), noise, row.corrector)
        x0s = (x0, *state.x0s)[:row.keep]
        return SolverState(multistep_step(x, x0s, noise, row.predictor), x, x0s)

    def finish(self, state: SolverState) -> np.ndarray:
        return state.x


class MultistepRule(Rule):
    """A second-order multistep solver on K timesteps spaced as diffusers spaces them (linspace by default)."""

    default_steps: ClassVar[int | None] = DEFAULT_SOLVER_STEPS

    def schedule(self, diffusion: DiffusionConfig, steps: int | str | None, spacing: str | None) -> Schedule:
        return spaced_schedule(diffusion, self.default_steps if steps is None else steps, spacing or "linspace")

    def rows(self, schedule: Schedule, variance_type: str) -> list[Any]:
        return solver_rows(schedule, self.name, self.predictor)

    @abstractmethod
    def predictor(self, lambdas: list[float], lambda_t: float, alpha_t: float, sigma_t: float,
                  sigma_s: float) -> MultistepCoefficients:
        """The update's coefficients from the history's lambdas to lambda_t."""

    def stepper(self, eps: EpsFn, chain: ChainView) -> Stepper:
        return SolverStepper(eps, chain)


class DPMSolverPP(MultistepRule):
    """DPM-Solver++(2M): the probability-flow ODE, deterministic."""

    name = "dpm++2m"
    stochastic = False

    def predictor(self, lambdas: list[float], lambda_t: float, alpha_t: float, sigma_t: float,
                  sigma_s: float) -> MultistepCoefficients:
        return dpm_solver_pp_coefficients(lambdas, lambda_t, alpha_t, sigma_t, sigma_s, stochastic=self.stochastic)


class SDEDPMSolverPP(DPMSolverPP):
    """SDE-DPM-Solver++(2M): the stochastic variant; uses each step's noise draw."""

    name = "sde-dpm++2m"
    stochastic = True


class UniPC(MultistepRule):
    """UniPC-2 (bh2): a predictor and the UniC corrector, deterministic."""

    name = "unipc"

    def predictor(self, lambdas: list[float], lambda_t: float, alpha_t: float, sigma_t: float,
                  sigma_s: float) -> MultistepCoefficients:
        return unipc_coefficients(lambdas, lambda_t, alpha_t, sigma_t, sigma_s, corrector=False)

    def rows(self, schedule: Schedule, variance_type: str) -> list[Any]:
        return solver_rows(schedule, self.name, self.predictor, self.corrector)

    def corrector(self, lambdas: list[float], lambda_t: float, alpha_t: float, sigma_t: float,
                  sigma_s: float) -> MultistepCoefficients:
        return unipc_coefficients(lambdas, lambda_t, alpha_t, sigma_t, sigma_s, corrector=True)
