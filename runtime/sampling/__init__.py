"""Sampling: the schedule math, the update formulas, the noise contract, the rules and the one loop.

Torch-free (NumPy only); `train` and `ddpm_export` reuse these formulas on tensors, the backends feed the loop.
"""

from runtime.sampling.chain import (DEFAULT_SAMPLER, DEFAULT_SOLVER_STEPS, RULES, SAMPLERS, SOLVERS, Chain,
                                    default_sampler, make_rule)
from runtime.sampling.loop import DEFAULT_BATCH, run_chain, sample, sample_batches
from runtime.sampling.noise import SeededNoise, chain_noise
from runtime.sampling.rules import EpsFn, Rule, Stepper
from runtime.sampling.schedule import DiffusionConfig, Schedule, sampling_schedule, space_timesteps

__all__ = ["Chain", "DEFAULT_BATCH", "DEFAULT_SAMPLER", "DEFAULT_SOLVER_STEPS", "DiffusionConfig", "EpsFn", "RULES",
           "Rule", "SAMPLERS", "SOLVERS", "Schedule", "SeededNoise", "Stepper", "chain_noise", "default_sampler",
           "make_rule", "run_chain", "sample", "sample_batches", "sampling_schedule", "space_timesteps"]
