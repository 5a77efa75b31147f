"""Our own `ddpm-train` checkpoint as a model source: its EMA weights, schedule and data range."""

from __future__ import annotations

from pathlib import Path

from runtime.errors import DDPMError
from runtime.fileio import file_sha256
from train.checkpoint import load_checkpoint
from train.sources import SourceModel


def load(path: Path) -> SourceModel:
    ckpt = load_checkpoint(path)
    module = ckpt.ema_model()
    cfg = ckpt.model_config
    if ckpt.diffusion_config.learned_variance != (cfg.out_channels == 2 * cfg.in_channels):
        raise DDPMError(f"{path}: variance {ckpt.diffusion_config.variance_type} does not fit a model with "
                        f"{cfg.out_channels} output channels for {cfg.in_channels} input channels")
    lo, hi = ckpt.data.get("data_range", (-1.0, 1.0))
    return SourceModel(module=module, diffusion=ckpt.diffusion_config,
                       image_shape=(cfg.in_channels, cfg.image_size, cfg.image_size), source="ddpm-deploy",
                       sha256=file_sha256(path), data_range=(float(lo), float(hi)),
                       provenance={"train_step": str(ckpt.step)})
