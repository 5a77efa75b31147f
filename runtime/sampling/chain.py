"""A chain: one reverse process (the timesteps walked, the rule and its per-step rows), and the rules by name.

`RULES` is the one place where a sampler's name maps to its rule; everything downstream holds the rule object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import DDPMError
from runtime.sampling.rules import DDIM, Ancestral, EpsFn, Rule, Stepper
from runtime.sampling.schedule import VARIANCE_TYPES, DiffusionConfig, Schedule, is_learned
from runtime.sampling.solvers import DEFAULT_SOLVER_STEPS, DPMSolverPP, MultistepRule, SDEDPMSolverPP, UniPC

RULES: dict[str, type[Rule]] = {rule.name: rule for rule in (Ancestral, DDIM, DPMSolverPP, SDEDPMSolverPP, UniPC)}
SAMPLERS = tuple(RULES)
SOLVERS = tuple(name for name, rule in RULES.items() if issubclass(rule, MultistepRule))  # multistep
# The default chain of ddpm-run and ddpm-serve (DEFAULT_SOLVER_STEPS says why).
DEFAULT_SAMPLER = SDEDPMSolverPP.name
__all__ = ["Chain", "DEFAULT_SAMPLER", "DEFAULT_SOLVER_STEPS", "RULES", "SAMPLERS", "SOLVERS", "default_sampler", "make_rule"]


def make_rule(name: str, eta: float | None = None) -> Rule:
    """The rule called `name` (case-insensitive); eta only for rules that use it."""
    rule = RULES.get(name.lower()) if isinstance(name, str) else None
    if rule is None:
        raise DDPMError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
    if not rule.uses_eta:
        if eta is not None:
            raise DDPMError(f"{{opt:eta}} is DDIM's noise scale; {rule.name} takes none (use {{opt:sampler}} ddim, or "
                            "sde-dpm++2m for a stochastic solver)")
        return rule()
    return rule(0.0 if eta is None else eta)  # type: ignore[call-arg]


def default_sampler(model_kind: str) -> str:
    """The sampler a model runs when none is named: a step graph holds the ancestral DDPM update, so it runs that."""
    return Ancestral.name if model_kind == "step" else DEFAULT_SAMPLER


@dataclass(frozen=True, eq=False)
class Chain:
    """One reverse process: the schedule walked, the update rule, and the rule's per-step rows."""

    schedule: Schedule
    rule: Rule = field(default_factory=Ancestral)
    variance_type: str = "fixed_large"
    clip_denoised: bool = True
    clip_range: float = 1.0
    rows: list[Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.variance_type not in VARIANCE_TYPES:
            raise DDPMError(f"unknown variance type {self.variance_type!r}; use one of {', '.join(VARIANCE_TYPES)}")
        object.__setattr__(self, "rows", self.rule.rows(self.schedule, self.variance_type))

    @classmethod
    def build(cls, diffusion: DiffusionConfig, sampler: str | Rule = Ancestral.name, steps: int | str | None = None,
              eta: float | None = None, variance_type: str | None = None, clip_denoised: bool | None = None,
              spacing: str | None = None) -> "Chain":
        """The chain for a model's diffusion config; None options take the model's own settings and the rule's
        defaults (all T steps for ddpm and ddim, DEFAULT_SOLVER_STEPS for the solvers). `spacing` (linspace,
        leading, trailing) picks K = `steps` timesteps as diffusers does."""
        rule = sampler if isinstance(sampler, Rule) else make_rule(sampler, eta)
        if variance_type is not None and is_learned(variance_type) and not diffusion.learned_variance:
            raise DDPMError(f"this model has {diffusion.variance_type} variance and no v output; learned_range needs "
                            "a learned-variance model (use fixed_small or fixed_large)")
        return cls(rule.schedule(diffusion, steps, spacing), rule, variance_type or diffusion.variance_type,
                   diffusion.clip_denoised if clip_denoised is None else clip_denoised, diffusion.clip_range)

    @property
    def sampler(self) -> str:
        return self.rule.name

    @property
    def clip(self) -> float | None:
        """The x_0 clip bound of this chain, None when it does not clip."""
        return self.clip_range if self.clip_denoised else None

    def __len__(self) -> int:
        return len(self.schedule)

    def stepper(self, eps: EpsFn) -> Stepper:
        """The host stepper of this chain's rule around an eps function."""
        return self.rule.stepper(eps, self)

    def fits_step_graph(self, baked: DiffusionConfig) -> bool:
        """Whether a device step graph baked for `baked` computes exactly this chain."""
        return self.rule.fits_step_graph(self, baked)

    def cut(self, k: int) -> "Chain":
        """The same chain started at step k (timestep `schedule.timesteps[k]`) instead of the top."""
        return dataclasses.replace(self, schedule=self.schedule.respace(range(k + 1)))

    def describe(self) -> str:
        return (f"{self.rule.name} {len(self)} steps ({self.rule.details(self)}, "
                f"clip={'on' if self.clip_denoised else 'off'})")


