"""A diffusers DDPM model (pipeline folder, or bare UNet2DModel folder + scheduler config) as a `SourceModel`.

The network runs through diffusers' own `UNet2DModel`, loaded from local files only; the scheduler config is
translated into our `DiffusionConfig`, and anything we could not reproduce exactly is refused with one line.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from runtime.errors import DDPMError
from runtime.fileio import file_sha256
from runtime.sampling.schedule import VARIANCE_TYPES, DiffusionConfig
from train.sources import SourceModel

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # preferred first
SCHEDULER_FILE = "scheduler_config.json"
PIPELINE_PARTS = ("unet", "scheduler")
# Schedulers whose config describes a DDPM-family discrete training schedule. Their num_train_timesteps, betas and
# prediction_type define what the model learned; their other keys choose how to sample, which our rules do instead.
DISCRETE_SCHEDULERS = (
    "DDPMScheduler", "DDPMParallelScheduler", "DDIMScheduler", "DDIMParallelScheduler", "PNDMScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler", "UniPCMultistepScheduler",
    "DEISMultistepScheduler", "SASolverScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler",
)
# DDPMScheduler's defaults, for keys a config leaves out (its variance_type too, for schedulers without one).
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0,
    "prediction_type": "epsilon", "thresholding": False, "rescale_betas_zero_snr": False, "timestep_type": "discrete",
}
# Keys that change the model or its sampling in ways we do not reproduce, with the value that is fine.
REFUSED = {"thresholding": False, "rescale_betas_zero_snr": False, "trained_betas": None, "timestep_type": "discrete"}


class DiffusersEps(torch.nn.Module):
    """The SourceModel contract around a UNet2DModel: (x_t, int64 t) -> `.sample` as float32 [B, C or 2C, H, W]."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t).sample.float()


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DDPMError(f"{path} not found: {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DDPMError(f"cannot read {path} ({exc}); it must be a diffusers JSON config") from None
    if not isinstance(data, dict):
        raise DDPMError(f"{path} is not a JSON object; it must be a diffusers config")
    return data


def diffusion_from_scheduler(config: dict[str, Any], where: str = "scheduler config") -> DiffusionConfig:
    """Our DiffusionConfig for any DDPM-family discrete scheduler config (DDPM, DDIM, PNDM, DPM-Solver, UniPC,
    Euler, ...): the same betas, variance (the config's where it has one, else DDPMScheduler's fixed_small) and
    clipping. Anything that we could not reproduce is refused with the key that says so."""
    cls = config.get("_class_name", "DDPMScheduler")
    if cls not in DISCRETE_SCHEDULERS:
        raise DDPMError(f"{where} is a {cls}, not a DDPM-family discrete-time scheduler; pass "
                        "{opt:scheduler_config} FILE with the config the model was trained with (e.g. DDPMScheduler)")
    c = {**SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if k in SCHEDULER_DEFAULTS}}
    if c["variance_type"] is None:  # solvers' configs say None where the model predicts no variance
        c["variance_type"] = SCHEDULER_DEFAULTS["variance_type"]
    if c["prediction_type"] != "epsilon":
        raise DDPMError(f"{where}: prediction_type {c['prediction_type']!r} is not supported; only epsilon models")
    for key, fine in REFUSED.items():
        if c[key] != fine:
            raise DDPMError(f"{where}: {key} = {c[key]!r} is not supported (we reproduce {key} = {fine!r} only)")
    if c["variance_type"] not in VARIANCE_TYPES:
        raise DDPMError(f"{where}: variance_type {c['variance_type']!r} is not supported; use one of "
                        f"{', '.join(VARIANCE_TYPES)}")
    T = int(c["num_train_timesteps"])
    if c["beta_schedule"] == "linear":
        # diffusers' linear betas are linspace(beta_start, beta_end, T); ours scale both ends by 1000 / T.
        betas = {"schedule": "linear", "beta_start": float(c["beta_start"]) * T / 1000.0,
                 "beta_end": float(c["beta_end"]) * T / 1000.0}
    elif c["beta_schedule"] == "squaredcos_cap_v2":  # Improved DDPM's cosine, betas capped at 0.999: ours
        betas = {"schedule": "cosine"}
    else:
        raise DDPMError(f"{where}: beta_schedule {c['beta_schedule']!r} is not supported; use linear or "
                        "squaredcos_cap_v2")
    return DiffusionConfig(num_timesteps=T, variance_type=c["variance_type"], clip_denoised=bool(c["clip_sample"]),
                           clip_range=float(c["clip_sample_range"]), **betas)


def _locate(path: Path, scheduler_config: str | os.PathLike | None) -> tuple[Path, dict[str, Any] | None, dict]:
    """(UNet folder, scheduler config or None for the paper's, provenance) of a pipeline or bare UNet folder."""
    provenance: dict[str, str] = {}
    scheduler = None
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json", "a diffusers pipeline folder needs it")
        provenance["pipeline_class"] = str(index.get("_class_name", "?"))
        parts = {k: v for k, v in index.items() if not k.startswith("_") and v not in (None, [None, None])}
        extra = sorted(set(parts) - set(PIPELINE_PARTS))
        if extra:
            raise DDPMError(f"{path} is a {provenance['pipeline_class']} with {', '.join(extra)}: only unconditional "
                            "pixel-space DDPM pipelines (unet + scheduler) are supported, no text, class or latent "
                            "parts")
        if "unet" not in parts:
            raise DDPMError(f"{path}/model_index.json names no unet; a DDPM pipeline needs unet/ and scheduler/")
        unet_dir = path / "unet"
        if scheduler_config is None:
            scheduler = _read_json(path / "scheduler" / SCHEDULER_FILE,
                                   "the pipeline's scheduler config (or pass {opt:scheduler_config} FILE)")
    else:
        unet_dir = path
    if scheduler_config is not None:
        scheduler = _read_json(Path(scheduler_config), "give the model's scheduler config JSON")
    if not (unet_dir / "config.json").is_file():
        raise DDPMError(f"{unet_dir} has no config.json; a diffusers model folder needs config.json and "
                        "diffusion_pytorch_model.safetensors (or .bin)")
    return unet_dir, scheduler, provenance


def _check_unet_config(config: dict[str, Any], where: Path) -> None:
    cls = config.get("_class_name", "UNet2DModel")
    if cls == "UNet2DConditionModel":
        raise DDPMError(f"{where} is a text-conditioned UNet2DConditionModel; only unconditional UNet2DModel DDPMs "
                        "are supported")
    if cls != "UNet2DModel":
        raise DDPMError(f"{where} holds a {cls}; only diffusers UNet2DModel DDPMs are supported")
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        raise DDPMError(f"{where} is a class-conditional UNet2DModel; only unconditional models are supported")
    if config.get("time_embedding_type", "positional") == "fourier":
        raise DDPMError(f"{where} has a Fourier time embedding (a score-SDE model, called with noise levels); only "
                        "DDPM eps models called with integer timesteps are supported")


def _weights_file(unet_dir: Path) -> Path:
    for name in WEIGHTS:
        if (unet_dir / name).is_file():
            return unet_dir / name
    raise DDPMError(f"{unet_dir} has no weights: expected {' or '.join(WEIGHTS)}")


def _refuse_unsafe_pickle(weights: Path) -> None:
    """A .bin is a pickle: make sure it holds only tensors (weights_only) before diffusers reads it."""
    try:
        torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DDPMError(f"{weights} is a pickle that needs code to load, refused (weights_only); get the model "
                        "as .safetensors or re-save it from a trusted environment") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise DDPMError(f"cannot read {weights} ({str(exc).splitlines()[0]}); is it a torch weights file?") from None


def _load_unet(unet_dir: Path, weights: Path) -> torch.nn.Module:
    from diffusers import UNet2DModel
    from diffusers.utils import logging as diffusers_logging

    if weights.suffix == ".bin":
        _refuse_unsafe_pickle(weights)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its loading notes are not for our users; problems are raised below
    try:
        unet, info = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False,
                                                 use_safetensors=weights.suffix == ".safetensors",
                                                 output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise DDPMError(f"diffusers cannot load {unet_dir}: {detail[:300]}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    wrong = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if wrong:
        parts = "; ".join(f"{k.replace('_', ' ')}: {', '.join(str(n) for n in v[:3])}{' ...' if len(v) > 3 else ''}"
                          for k, v in wrong.items())
        raise DDPMError(f"{weights} does not fit {unet_dir / 'config.json'} ({parts})")
    return unet.float().eval()


def load(path: str | os.PathLike, scheduler_config: str | os.PathLike | None = None) -> SourceModel:
    """Open a diffusers pipeline folder (model_index.json, unet/, scheduler/) or a bare UNet2DModel folder;
    `scheduler_config` (a DDPMScheduler JSON) overrides the pipeline's and defaults to the DDPM paper's schedule."""
    path = Path(path)
    if not path.is_dir():
        raise DDPMError(f"{path} is not a folder; a diffusers model is a folder with model_index.json or config.json")
    unet_dir, scheduler, provenance = _locate(path, scheduler_config)
    unet_config = _read_json(unet_dir / "config.json", "a diffusers model folder needs it")
    _check_unet_config(unet_config, unet_dir)
    if scheduler is None:
        print(f"note: {path} has no scheduler config; using DDPMScheduler's defaults (linear betas 1e-4..0.02 over "
              "1000 steps, fixed_small variance, clipping on); give its scheduler config if it was trained otherwise",
              file=sys.stderr)
    diffusion = diffusion_from_scheduler(scheduler or {}, str(scheduler_config or path))
    weights = _weights_file(unet_dir)
    unet = _load_unet(unet_dir, weights)

    size = unet.config.sample_size
    if size is None:
        raise DDPMError(f"{unet_dir / 'config.json'} has no sample_size; add the image size")
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    c_in, c_out = int(unet.config.in_channels), int(unet.config.out_channels)
    want = 2 * c_in if diffusion.learned_variance else c_in
    if c_out != want:
        raise DDPMError(f"the UNet outputs {c_out} channels for {c_in} input channels, but variance_type "
                        f"{diffusion.variance_type} needs {want}; the scheduler config does not fit the model")
    provenance.update(model_class="UNet2DModel",
                      scheduler_class=str((scheduler or {}).get("_class_name", "none (DDPMScheduler defaults)")),
                      weights_file=weights.name)
    return SourceModel(module=DiffusersEps(unet).eval(), diffusion=diffusion, image_shape=(c_in, h, w),
                       source="diffusers", sha256=file_sha256(weights), provenance=provenance)
