"""The way back: a ddpm-train checkpoint as a diffusers `DDPMPipeline` folder (unet/ + scheduler/ +
model_index.json) that `DDPMPipeline.from_pretrained` loads, sampling the same chain as our runtime.

The UNet goes through `train.diffusers_map` (the same network under diffusers' names); the schedule becomes the
DDPMScheduler config that `train.sources.diffusers_source.diffusion_from_scheduler` reads back into the same
`DiffusionConfig`, so the folder round-trips exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from runtime.errors import DDPMError
from runtime.fileio import staged_folder
from runtime.sampling.schedule import DiffusionConfig
from train.checkpoint import load_checkpoint
from train.diffusers_map import to_diffusers


def scheduler_config(diffusion: DiffusionConfig) -> dict[str, Any]:
    """DDPMScheduler keyword arguments of our schedule (diffusers' linear betas are not scaled by 1000 / T)."""
    T = diffusion.num_timesteps
    if diffusion.schedule == "linear":
        betas: dict[str, Any] = {"beta_schedule": "linear", "beta_start": diffusion.beta_start * 1000.0 / T,
                                 "beta_end": diffusion.beta_end * 1000.0 / T}
    else:
        betas = {"beta_schedule": "squaredcos_cap_v2"}
    return {"num_train_timesteps": T, **betas, "variance_type": diffusion.variance_type,
            "clip_sample": diffusion.clip_denoised, "clip_sample_range": diffusion.clip_range,
            "prediction_type": "epsilon"}


def write_pipeline(checkpoint: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the DDPMPipeline folder of `checkpoint` (its EMA weights) at `out`, staged beside it and renamed into
    place; an existing `out` is replaced only with `force`."""
    from diffusers import DDPMPipeline, DDPMScheduler

    out = Path(out)
    if out.exists() and not force:
        raise DDPMError(f"{out} already exists; pass {{opt:force}} to replace it or choose another folder")
    if out.exists() and not out.is_dir():
        raise DDPMError(f"{out} is a file; give a folder path")
    if not out.parent.is_dir():
        raise DDPMError(f"cannot write {out}: folder {out.parent} does not exist; create it first")
    ckpt = load_checkpoint(checkpoint)
    lo, hi = ckpt.data.get("data_range", (-1.0, 1.0))
    if (float(lo), float(hi)) != (-1.0, 1.0):
        raise DDPMError(f"{checkpoint} models data in [{lo}, {hi}]; DDPMPipeline assumes [-1, 1]")
    unet = to_diffusers(ckpt.ema_model())
    pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**scheduler_config(ckpt.diffusion_config)))
    with staged_folder(out) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
    return out
