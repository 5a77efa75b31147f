"""One ancestral DDPM step as a module: x_prev = ddpm_step(x_t, eps_theta(x_t, t), noise) with baked tables.

The formula is `runtime.steps.ddpm_step` itself, traced with torch tensors, and the tables are the ones
`DDPMCoefficients.tables` builds from the checkpoint's schedule: export adds no math of its own.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from runtime.schedule import DiffusionConfig, Schedule
from runtime.steps import DDPMCoefficients, ddpm_step

TABLES = tuple(f.name for f in dataclasses.fields(DDPMCoefficients))


class StepModule(nn.Module):
    """Inputs x_t [B,C,H,W], t int64 [B] (original timestep indices), noise [B,C,H,W]; output x_prev."""

    def __init__(self, unet: nn.Module, diffusion: DiffusionConfig):
        super().__init__()
        self.unet = unet
        self.clip = diffusion.clip_denoised
        tables = DDPMCoefficients.tables(Schedule.from_config(diffusion), diffusion.variance_type)
        for name in TABLES:  # float64 tables, cast to float32 at use (they become ONNX initializers)
            self.register_buffer(name, torch.tensor(getattr(tables, name), dtype=torch.float32))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        eps = self.unet(x_t, t)
        coeffs = DDPMCoefficients(*(torch.index_select(getattr(self, n), 0, t).reshape(-1, 1, 1, 1)
                                    for n in TABLES))
        return ddpm_step(x_t, eps, noise, coeffs, self.clip)
