"""Where a model comes from: one small interface on the torch side.

Every source (our `ddpm-train` checkpoint, a diffusers folder, an improved-diffusion state dict) has its own module
with one `load(...)` that returns a `SourceModel`. Export, validation, the eager backend and evaluation take a
`SourceModel` and never ask where it came from.

The module's contract: `module(x_t, t)` with x_t float32 [B, C, H, W] in the data range and t int64 [B] holding
ORIGINAL timestep indices 0..T-1 returns float32 [B, C, H, W] (eps) or, for learned-variance models
(`diffusion.variance_type == "learned_range"`), [B, 2C, H, W]: eps then v, concatenated on channels. Whatever a
source needs to meet that (diffusers' `.sample`, improved-diffusion's timestep rescaling) lives inside its module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime.errors import DDPMError
from runtime.metadata import ModelInfo, eps_outputs
from runtime.sampling.schedule import DiffusionConfig

SOURCES = ("ddpm-deploy", "diffusers", "improved-diffusion")


@dataclass(frozen=True, eq=False)
class SourceModel:
    """A model ready to run, export or evaluate: the eps(+v) module, how it diffuses, and where it came from."""

    module: torch.nn.Module  # eval mode, float32, on the CPU unless moved
    diffusion: DiffusionConfig
    image_shape: tuple[int, int, int]  # C, H, W
    source: str  # one of SOURCES
    sha256: str  # of the weights file, for the metadata's provenance
    data_range: tuple[float, float] = (-1.0, 1.0)
    provenance: dict[str, str] = field(default_factory=dict)  # further facts for the metadata (e.g. config names)

    def info(self) -> ModelInfo:
        """The runtime's description of this model's eps graph (export adds max_batch, opset, ...)."""
        return ModelInfo(diffusion=self.diffusion, image_shape=self.image_shape, outputs=eps_outputs(self.diffusion),
                         data_range=self.data_range, source_sha256=self.sha256,
                         extra={"source": self.source, **self.provenance})


def load_source(path: str | os.PathLike, *, scheduler_config: str | os.PathLike | None = None,
                flags: str | os.PathLike | dict[str, Any] | None = None) -> SourceModel:
    """Open any supported model: a folder is diffusers (pipeline or bare UNet2DModel, `scheduler_config` for the
    latter); a file with `flags` is an improved-diffusion state dict; any other file is a ddpm-train checkpoint; a
    hub id (owner/name) is a diffusers folder found in the local Hugging Face cache (`train.sources.hub`)."""
    from train.sources import hub

    if hub.is_hub_id(path):
        path = hub.resolve(str(path))
    path = Path(path)
    if not path.exists():
        raise DDPMError(f"model {path} not found; pass a ddpm-train .pt, a diffusers folder or hub id, or an "
                        "improved-diffusion .pt with {opt:flags}")
    if path.is_dir():
        if flags is not None:
            raise DDPMError(f"{path} is a folder (diffusers); {{opt:flags}} is for improved-diffusion .pt files")
        from train.sources import diffusers_source

        return diffusers_source.load(path, scheduler_config=scheduler_config)
    if scheduler_config is not None:
        raise DDPMError("{opt:scheduler_config} is for bare diffusers UNet2DModel folders, not for .pt files")
    if flags is not None:
        from train.sources import improved_diffusion_source

        return improved_diffusion_source.load(path, flags)
    from train.sources import checkpoint_source

    return checkpoint_source.load(path)
