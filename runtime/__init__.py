"""ddpm-deploy's lean runtime: NumPy schedule math, samplers and inference backends (no PyTorch)."""

from runtime.errors import DDPMError
from runtime.schedule import DiffusionConfig, Schedule, sampling_schedule, space_timesteps

__all__ = ["DDPMError", "DiffusionConfig", "Schedule", "sampling_schedule", "space_timesteps"]
