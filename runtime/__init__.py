"""ddpm-deploy's lean runtime: NumPy schedule math, samplers and inference backends (no PyTorch)."""

from runtime.backends import open_model
from runtime.errors import DDPMError
from runtime.sampling.noise import chain_noise
from runtime.sampling import Chain, sample
from runtime.sampling.schedule import DiffusionConfig, Schedule, sampling_schedule, space_timesteps

__all__ = ["Chain", "DDPMError", "DiffusionConfig", "Schedule", "chain_noise", "open_model", "sample",
           "sampling_schedule", "space_timesteps"]
