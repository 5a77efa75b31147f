"""The checkpoint file: one self-describing, weights_only-loadable dict that export and the runtime read.

Layout (all values are tensors, dicts, lists, str, int, float or bool, so `torch.load(weights_only=True)` reads it):
    format: "ddpm-deploy/checkpoint"   format_version: 1
    model_config: ModelConfig.to_dict()        diffusion_config: DiffusionConfig.to_dict()
    data: {"dataset", "image_size", "channels", "data_range": [-1.0, 1.0]}
    ema: state_dict (weights to sample with)   model: state_dict (raw weights)
    optimizer: optimizer state_dict or None    step: int
    train_config: dict of the trainer options  rng: {"torch": ByteTensor, "cuda": [ByteTensor], "generator": ByteTensor}
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime.errors import DDPMError
from runtime.fileio import atomic_write
from runtime.sampling.schedule import DiffusionConfig
from train.model import ModelConfig, UNet, preset_config

FORMAT = "ddpm-deploy/checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    model_config: ModelConfig
    diffusion_config: DiffusionConfig
    ema: dict[str, torch.Tensor]
    model: dict[str, torch.Tensor]
    data: dict[str, Any]
    step: int = 0
    optimizer: dict[str, Any] | None = None
    train_config: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_config": self.model_config.to_dict(),
            "diffusion_config": self.diffusion_config.to_dict(),
            "data": dict(self.data),
            "ema": self.ema,
            "model": self.model,
            "optimizer": self.optimizer,
            "step": int(self.step),
            "train_config": dict(self.train_config),
            "rng": self.rng,
        }

    def ema_model(self, device: str | torch.device = "cpu") -> UNet:
        """The EMA UNet in eval mode: what sampling and export use."""
        model = UNet(self.model_config)
        try:
            model.load_state_dict(self.ema)
        except RuntimeError as exc:  # names missing/unexpected keys and shape mismatches, one per line
            lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
            raise DDPMError(f"checkpoint weights do not fit its model_config ({'; '.join(lines)[:300]}); "
                            "the file was edited or mixed with another model's config") from None
        return model.to(device).eval()


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint, *, replace: bool = True) -> Path:
    """Atomically write `ckpt` (temp file + rename): an interrupted save never leaves a broken file.
    replace=False refuses if `path` exists by now (another run's first save won the race)."""
    return atomic_write(path, lambda f: torch.save(ckpt.to_dict(), f), replace=replace)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint with weights_only=True; a missing, corrupt or foreign file raises a one-line DDPMError."""
    path = Path(path)
    if not path.is_file():
        raise DDPMError(f"checkpoint {path} not found; pass the .pt file written by ddpm-train")
    if not zipfile.is_zipfile(path):  # torch.save always writes a zip archive
        raise DDPMError(f"{path} is not a ddpm-deploy checkpoint (not even a torch.save archive); "
                        "pass a .pt file written by ddpm-train")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for foreign bytes; all mean "not our file"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DDPMError(f"{path} is not a readable ddpm-deploy checkpoint ({first[:120]}); "
                        "pass a .pt file written by ddpm-train") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        hint = (" (a bare state dict: an improved-diffusion checkpoint? give its training flags with {opt:flags})"
                if isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()) else "")
        raise DDPMError(f"{path} is not a ddpm-deploy checkpoint (no '{FORMAT}' marker){hint}; "
                        "pass a .pt file written by ddpm-train")
    if raw.get("format_version") != FORMAT_VERSION:
        raise DDPMError(f"{path} has checkpoint format version {raw.get('format_version')}, this tool reads "
                        f"{FORMAT_VERSION}; use the ddpm-deploy version that wrote it")
    try:
        return Checkpoint(
            model_config=ModelConfig.from_dict(raw["model_config"]),
            diffusion_config=DiffusionConfig.from_dict(raw["diffusion_config"]),
            ema=raw["ema"],
            model=raw["model"],
            data=raw["data"],
            step=int(raw["step"]),
            optimizer=raw.get("optimizer"),
            train_config=raw.get("train_config", {}),
            rng=raw.get("rng", {}),
        )
    except (KeyError, TypeError) as exc:
        raise DDPMError(f"{path} is an incomplete ddpm-deploy checkpoint (missing {exc}); re-save it with ddpm-train") \
            from None



def random_checkpoint(preset: str = "tiny", channels: int = 1, image_size: int = 32,
                      diffusion: DiffusionConfig | None = None, seed: int = 0) -> Checkpoint:
    """A checkpoint with random weights everywhere, the zero-initialised output layers too, so eps is a
    non-trivial function of its inputs: for tests, export timings and benchmarks without training. A learned_range
    `diffusion` gives the model a v output (2 x channels)."""
    torch.manual_seed(seed)
    config = preset_config(preset, image_size, channels)
    if diffusion is not None and diffusion.learned_variance:
        config = dataclasses.replace(config, out_channels=2 * channels)
    model = UNet(config)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.05)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return Checkpoint(model_config=model.config, diffusion_config=diffusion or DiffusionConfig(), ema=state,
                      model=state, data={"dataset": "random", "image_size": image_size, "channels": channels,
                                         "data_range": [-1.0, 1.0]})
