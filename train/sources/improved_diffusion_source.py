"""An openai/improved-diffusion checkpoint (a plain UNet state dict) plus the flags it was trained with.

The flags are their scripts' names and defaults (`model_and_diffusion_defaults()` in script_util.py), given as a
string ("--image_size 32 --num_channels 128 ..."), a JSON file or a dict. Their training and sampling script flags
(--lr, --batch_size, --use_ddim, ...) are accepted and ignored; `--channel_mult 1,2` (guided-diffusion's name)
overrides the multipliers their scripts pick by image size. The module meets `SourceModel`'s contract the way their
`_WrappedModel` does: original int64 timesteps in, `t * 1000 / T` as float to the UNet when rescale_timesteps.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runtime.errors import DDPMError
from runtime.fileio import file_sha256
from runtime.sampling.schedule import LEARNED_RANGE, DiffusionConfig
from train.improved_unet import CHANNEL_MULT_BY_SIZE, ImprovedUNet, ImprovedUNetConfig
from train.sources import SourceModel

# improved_diffusion.script_util.model_and_diffusion_defaults(), plus image_sample.py's clip_denoised and
# guided-diffusion's channel_mult ("" = by image size).
DEFAULTS: dict[str, Any] = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1,
    "attention_resolutions": "16,8", "dropout": 0.0, "learn_sigma": False, "sigma_small": False,
    "class_cond": False, "diffusion_steps": 1000, "noise_schedule": "linear", "timestep_respacing": "",
    "use_kl": False, "predict_xstart": False, "rescale_timesteps": True, "rescale_learned_sigmas": True,
    "use_checkpoint": False, "use_scale_shift_norm": True, "clip_denoised": True, "channel_mult": "",
}
# Flags of their image_train / image_sample / image_nll scripts that do not change the model or its sampling math.
IGNORED = frozenset({
    "data_dir", "schedule_sampler", "lr", "weight_decay", "lr_anneal_steps", "batch_size", "microbatch", "ema_rate",
    "log_interval", "save_interval", "resume_checkpoint", "use_fp16", "fp16_scale_growth", "num_samples",
    "use_ddim", "model_path",
})
_TRUE, _FALSE = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")


def parse_flags(flags: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """All model and diffusion flags (defaults filled in, values typed as theirs) from a flag string, a JSON file
    or a dict."""
    if isinstance(flags, dict):
        given = dict(flags)
    elif isinstance(flags, str) and flags.lstrip().startswith("-"):
        given = _split_flag_string(flags)
    else:
        given = _read_flag_file(Path(flags))
    given = {str(k).lstrip("-").replace("-", "_"): v for k, v in given.items()}
    unknown = sorted(set(given) - set(DEFAULTS) - IGNORED)
    if unknown:
        raise DDPMError(f"unknown improved-diffusion flag(s) {', '.join('--' + k for k in unknown)}; "
                        f"known: {', '.join('--' + k for k in DEFAULTS)}")
    out = dict(DEFAULTS)
    for name, value in given.items():
        if name in DEFAULTS:
            out[name] = _typed(name, value)
    return out


def _split_flag_string(text: str) -> dict[str, str]:
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise DDPMError(f"cannot read the flags {text!r} ({exc}); write them like --image_size 32 --learn_sigma "
                        "True") from None
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) < 3:
            raise DDPMError(f"expected a --flag in the flags, got {token!r}; write them like --image_size 32")
        if "=" in token:
            name, value = token[2:].split("=", 1)
            i += 1
        elif i + 1 < len(tokens):
            name, value = token[2:], tokens[i + 1]
            i += 2
        else:
            raise DDPMError(f"flag {token} has no value; write it like {token} VALUE")
        out[name] = value
    return out


def _read_flag_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DDPMError(f"flags {str(path)!r} are neither a flag string (--image_size 32 ...) nor an existing "
                        "JSON file")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DDPMError(f"flags file {path} is not valid JSON ({exc}); write an object like "
                        '{"image_size": 32, "learn_sigma": true}') from None
    if not isinstance(data, dict):
        raise DDPMError(f"flags file {path} must hold a JSON object of flag names to values")
    return data


def _typed(name: str, value: Any) -> Any:
    """Convert like their argparse types: str2bool for booleans, else the default's type."""
    default = DEFAULTS[name]
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
            raise ValueError("expected a boolean")
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("expected an integer")
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except ValueError:
        raise DDPMError(f"flag --{name} got {value!r}, expected a {type(default).__name__} "
                        f"(their default: {default!r})") from None


def unet_config(flags: dict[str, Any]) -> ImprovedUNetConfig:
    """Their `create_model` for the parsed flags: channel multipliers by image size, attention resolutions turned
    into downsample rates, 6 output channels when learn_sigma."""
    size = flags["image_size"]
    if flags["class_cond"]:
        raise DDPMError("class-conditional improved-diffusion models (--class_cond True) are not supported; "
                        "use an unconditional checkpoint")
    if flags["channel_mult"]:
        try:
            mult = tuple(int(m) for m in flags["channel_mult"].split(","))
        except ValueError:
            raise DDPMError(f"--channel_mult {flags['channel_mult']!r} must be comma-separated integers, e.g. "
                            "1,2,2") from None
    elif size in CHANNEL_MULT_BY_SIZE:
        mult = CHANNEL_MULT_BY_SIZE[size]
    else:
        raise DDPMError(f"their scripts build image sizes {sorted(CHANNEL_MULT_BY_SIZE)} only; for --image_size "
                        f"{size} also pass --channel_mult (e.g. 1,2,2)")
    if size < 1 or size % 2 ** (len(mult) - 1):
        raise DDPMError(f"--image_size {size} must be divisible by {2 ** (len(mult) - 1)} for {len(mult)} levels")
    try:
        resolutions = [int(r) for r in flags["attention_resolutions"].split(",") if r.strip()]
    except ValueError:
        raise DDPMError(f"--attention_resolutions {flags['attention_resolutions']!r} must be comma-separated "
                        "integers, e.g. 16,8") from None
    if any(r < 1 for r in resolutions):
        raise DDPMError(f"--attention_resolutions {flags['attention_resolutions']!r} must be positive")
    return ImprovedUNetConfig(
        in_channels=3, model_channels=flags["num_channels"], out_channels=6 if flags["learn_sigma"] else 3,
        num_res_blocks=flags["num_res_blocks"], attention_rates=tuple(size // r for r in resolutions),
        channel_mult=mult, dropout=flags["dropout"], num_heads=flags["num_heads"],
        num_heads_upsample=flags["num_heads_upsample"], use_scale_shift_norm=flags["use_scale_shift_norm"])


def diffusion_config(flags: dict[str, Any]) -> DiffusionConfig:
    """Their `create_gaussian_diffusion` in our terms. use_kl and rescale_learned_sigmas only weight training
    losses; timestep_respacing is a sampling choice (ddpm-run --steps), not part of the model."""
    if flags["predict_xstart"]:
        raise DDPMError("models trained with --predict_xstart True output x_0, not eps; only eps models are "
                        "supported")
    if flags["noise_schedule"] not in ("linear", "cosine"):
        raise DDPMError(f"unknown --noise_schedule {flags['noise_schedule']!r}; theirs are linear and cosine")
    if flags["learn_sigma"]:
        variance = LEARNED_RANGE
    else:
        variance = "fixed_small" if flags["sigma_small"] else "fixed_large"
    # linear: our make_betas scales 1e-4..0.02 by 1000/T exactly like their get_named_beta_schedule
    return DiffusionConfig(schedule=flags["noise_schedule"], num_timesteps=flags["diffusion_steps"],
                           variance_type=variance, clip_denoised=flags["clip_denoised"], clip_range=1.0)


class ImprovedDiffusionModel(nn.Module):
    """`forward(x_t, t)` with original int64 timesteps -> [B, 3 or 6, H, W] (eps, then v when learn_sigma)."""

    def __init__(self, unet: ImprovedUNet, num_timesteps: int, rescale_timesteps: bool):
        super().__init__()
        self.unet = unet
        self.num_timesteps = num_timesteps
        self.rescale_timesteps = rescale_timesteps

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        if self.rescale_timesteps:
            t = t * (1000.0 / self.num_timesteps)
        return self.unet(x_t, t)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pt state dict (torch.load with weights_only=True) or a .safetensors file."""
    if not path.is_file():
        raise DDPMError(f"improved-diffusion checkpoint {path} not found")
    if path.suffix == ".safetensors":
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError:
            raise DDPMError(f"{path.name} is a safetensors file; pip install safetensors to read it") from None
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise DDPMError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:120]})") \
                from None
    with open(path, "rb") as f:
        is_pickle = f.read(1) == b"\x80"  # a pickle's protocol opcode: torch.save's legacy (non-zip) format
    if not (is_pickle or zipfile.is_zipfile(path)):
        raise DDPMError(f"{path} is not a torch checkpoint (neither a torch.save archive nor a pickle); pass the "
                        ".pt state dict improved-diffusion saved")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # the weights_only unpickler met something other than tensors and containers
        raise DDPMError(f"refusing {path}: its pickle would build objects other than tensors (it could run code); "
                        "load it only if you trust it and re-save model.state_dict() alone") from None
    except Exception as exc:  # torch raises many types for foreign bytes; all mean "not a checkpoint"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DDPMError(f"{path} is not a readable torch checkpoint ({first[:120]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise DDPMError(f"{path} is not a state dict (a flat mapping of names to tensors) as improved-diffusion "
                        "saves; pass the model or EMA file (e.g. ema_0.9999_500000.pt)")
    return state


def check_fits(state: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """One line naming the tensors that do not fit the model the flags describe (a few names and the counts)."""
    if any(k.startswith("label_emb.") for k in state):
        raise DDPMError(f"{path} is a class-conditional checkpoint (it holds label_emb.*); only unconditional "
                        "models are supported")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    reshaped = [f"{k} {list(state[k].shape)} vs {list(s)}" for k, s in want.items()
                if k in state and tuple(state[k].shape) != s]
    if not (missing or unexpected or reshaped):
        return
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("with other shapes (file vs flags)",
                                                                              reshaped)):
        if names:
            more = f", ... {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{len(names)} {label}: {', '.join(names[:3])}{more}")
    raise DDPMError(f"{path} does not fit the flags ({'; '.join(parts)}); check --image_size, --num_channels, "
                    "--num_res_blocks, --attention_resolutions, --learn_sigma and --use_scale_shift_norm")


def load(path: str | os.PathLike, flags: str | os.PathLike | dict[str, Any]) -> SourceModel:
    """The checkpoint at `path` built with `flags`, ready to export or sample (eval mode, float32, CPU)."""
    path = Path(path)
    parsed = parse_flags(flags)
    config, diffusion = unet_config(parsed), diffusion_config(parsed)
    state = read_state_dict(path)
    with torch.device("meta"):  # no random init: every parameter comes from the file
        unet = ImprovedUNet(config)
    check_fits(state, unet, path)
    unet.load_state_dict(state, strict=True, assign=True)
    module = ImprovedDiffusionModel(unet, diffusion.num_timesteps, parsed["rescale_timesteps"]).float().eval()
    model_flags = " ".join(f"--{k} {parsed[k]}" for k in DEFAULTS if k != "timestep_respacing")
    provenance = {"improved_diffusion.flags": model_flags}
    if parsed["timestep_respacing"]:  # a sampling choice, not part of the export: tell the user how to get it
        provenance["improved_diffusion.timestep_respacing"] = (
            f"{parsed['timestep_respacing']} (not applied at export; sample with --steps "
            f"{parsed['timestep_respacing']})")
    size = parsed["image_size"]
    return SourceModel(module=module, diffusion=diffusion, image_shape=(3, size, size),
                       source="improved-diffusion", sha256=file_sha256(path), provenance=provenance)
