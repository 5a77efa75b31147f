"""Fast samplers: multistep exponential-integrator solvers that carry their own history of x_0 predictions.

DPM-Solver++(2M) (deterministic, the probability-flow ODE), SDE-DPM-Solver++(2M) (stochastic) and UniPC-2 (bh2,
predictor-corrector, deterministic), in data-prediction form with the x_0 clip of the chain. They take their first
step at first order (no history yet) and their last step, onto sigma = 0, at first order too, exactly as diffusers'
`DPMSolverMultistepScheduler` / `UniPCMultistepScheduler` with `lower_order_final=True, final_sigmas_type="zero"`.
The coefficients come from `runtime.steps` (one formula, one place), computed once per chain in float64; the loop
is `runtime.samplers.run_chain`, so the noise follows the runtime's contract (x_T first, one draw per step; only the
stochastic solver uses the per-step draws).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import numpy as np

from runtime.errors import DDPMError
from runtime.schedule import Schedule, half_log_snr
from runtime.steps import (MultistepCoefficients, dpm_solver_pp_coefficients, multistep_step, predict_x0,
                           split_output, unipc_coefficients)

if TYPE_CHECKING:
    from runtime.samplers import Chain

SOLVERS = ("dpm++2m", "sde-dpm++2m", "unipc")
STOCHASTIC = ("sde-dpm++2m",)
ORDER = 2  # every solver here is second order
MIN_STEPS = ORDER + 1  # first and last steps are first order: below this no step reaches the solver's order


@dataclass(frozen=True)
class SolverRow:
    """Step k of a solver chain: the x_0 prediction's coefficients, an optional corrector and the predictor."""

    sqrt_recip_ac: float
    sqrt_recipm1_ac: float
    corrector: Optional[MultistepCoefficients]  # UniC: corrects x_k with the model output at x_k (UniPC only)
    predictor: MultistepCoefficients
    keep: int  # x_0 predictions the predictor uses, which are also all the next step's corrector needs


def solver_rows(schedule: Schedule, solver: str) -> list[SolverRow]:
    """Per-step coefficients of a solver on a (respaced) schedule, indexed like `Chain.coeffs`: step k goes from
    timestep k to k-1, and step 0 ends at sigma = 0."""
    if solver not in SOLVERS:
        raise DDPMError(f"unknown solver {solver!r}; use one of {', '.join(SOLVERS)}")
    K = len(schedule)
    if K < MIN_STEPS:
        raise DDPMError(f"{solver} is a second-order multistep solver and needs at least {MIN_STEPS} steps, got {K}; "
                        "use more steps or --sampler ddim")
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
        lam_t, alpha_t, sigma_t = target(k)
        corrector = None
        if solver == "unipc":
            predictor = unipc_coefficients(history, lam_t, alpha_t, sigma_t, float(sigmas[k]), corrector=False)
            if k < K - 1:  # UniC-p' at x_k, p' the order of the previous predictor, from s0 = timestep k+1
                q = order(k + 1)
                corrector = unipc_coefficients([float(lambdas[k + 1 + j]) for j in range(q)], float(lambdas[k]),
                                               float(alphas[k]), float(sigmas[k]), float(sigmas[k + 1]),
                                               corrector=True)
        else:
            predictor = dpm_solver_pp_coefficients(history, lam_t, alpha_t, sigma_t, float(sigmas[k]),
                                                   stochastic=solver in STOCHASTIC)
        rows.append(SolverRow(float(schedule.sqrt_recip_alphas_cumprod[k]),
                              float(schedule.sqrt_recipm1_alphas_cumprod[k]), corrector, predictor, p))
    return rows[::-1]


class SolverState(NamedTuple):
    """One batch mid-chain: x at the current timestep, the sample the corrector starts from, x_0 predictions."""

    x: np.ndarray
    x_last: Optional[np.ndarray]  # x at the previous timestep (after its correction): the corrector's base
    x0s: tuple[np.ndarray, ...]  # newest first


class SolverStepper:
    """A `runtime.samplers.Stepper` for the multistep solvers: x_t and its history live in host memory."""

    def __init__(self, eps: Callable[[np.ndarray, np.ndarray], np.ndarray], chain: "Chain") -> None:
        self.eps, self.chain = eps, chain

    def start(self, x_T: np.ndarray) -> SolverState:
        return SolverState(x_T, None, ())

    def step(self, state: SolverState, k: int, t: np.ndarray, noise: np.ndarray) -> SolverState:
        row: SolverRow = self.chain.coeffs[k]
        eps, _ = split_output(self.eps(state.x, t), state.x.shape[1])  # a learned variance's v is not used
        x0 = predict_x0(state.x, eps, row.sqrt_recip_ac, row.sqrt_recipm1_ac, self.chain.clip)
        x = state.x
        if row.corrector is not None:
            x = multistep_step(state.x_last, (x0, *state.x0s), noise, row.corrector)
        x0s = (x0, *state.x0s)[:row.keep]
        return SolverState(multistep_step(x, x0s, noise, row.predictor), x, x0s)

    def finish(self, state: SolverState) -> np.ndarray:
        return state.x
