"""Our UNet (train/model.py) <-> diffusers' `UNet2DModel` in the paper's layout (google/ddpm-cifar10-32), both ways.

The two are the same network of Ho et al. (2020) under different names: configs map one to one, state dicts map key
by key, except that our attention computes q, k, v with one fused 1x1 conv ([3C, C, 1, 1]) where diffusers has three
linear layers ([C, C] each), and our attention output is a 1x1 conv where diffusers has a linear layer. A diffusers
config that is not this network (other time embedding, padding, multi-head attention, conditioning...) is refused.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterator, Mapping

import torch

from runtime.errors import DDPMError
from train.model import ModelConfig, UNet

# UNet2DModel options whose value is fixed by the paper's network (our UNet has no switch for them).
FIXED: dict[str, Any] = {
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "flip_sin_to_cos": False,  # [sin | cos]
    "freq_shift": 1,  # frequencies exp(-i ln(10000) / (half - 1))
    "downsample_padding": 0,  # TF "SAME": pad 0 top/left, 1 bottom/right
    "downsample_type": "conv",
    "upsample_type": "conv",
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "attention_head_dim": None,  # one head over all channels
    "attn_norm_num_groups": None,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
}
ACTIVATIONS = ("silu", "swish")  # both are x * sigmoid(x) in diffusers
DOWN, ATTN_DOWN, UP, ATTN_UP = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"
# Residual block: our name -> diffusers' name (the shortcut exists only where the width changes).
RES_NAMES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
             "shortcut": "conv_shortcut"}


def unet2d_defaults() -> dict[str, Any]:
    """UNet2DModel's own defaults, for configs (JSON files) that leave options out."""
    from diffusers import UNet2DModel

    params = inspect.signature(UNet2DModel.__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def to_diffusers_config(config: ModelConfig) -> dict[str, Any]:
    """The UNet2DModel keyword arguments of the same network (for the cifar10 preset: google/ddpm-cifar10-32's
    config, with our dropout 0.1 where that file leaves diffusers' default 0)."""
    if config.patch_size != 1:
        raise DDPMError(f"UNet2DModel has no patch stem; a model with patch_size {config.patch_size} has no diffusers "
                        "equivalent (export it to ONNX instead)")
    levels = len(config.channel_mult)
    attn = [config.image_size // 2**i in config.attention_resolutions for i in range(levels)]
    return {
        "sample_size": config.image_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": [config.base_channels * m for m in config.channel_mult],
        "layers_per_block": config.num_res_blocks,
        "down_block_types": [ATTN_DOWN if a else DOWN for a in attn],
        "up_block_types": [ATTN_UP if a else UP for a in reversed(attn)],
        "dropout": config.dropout,
        "norm_num_groups": config.num_groups,
        "norm_eps": config.norm_eps,
        "act_fn": "silu",
        **FIXED,
    }


def from_diffusers_config(config: Mapping[str, Any]) -> ModelConfig:
    """Our ModelConfig for a UNet2DModel config (a loaded model's `.config` or a config.json dict); refuses, in one
    line, any option our network cannot reproduce exactly."""
    cfg = {**unet2d_defaults(), **{k: v for k, v in config.items() if not k.startswith("_")}}
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise DDPMError(f"diffusers model class {cls} is not the DDPM UNet; only UNet2DModel maps to ours")
    for key, want in FIXED.items():
        got = cfg.get(key)
        if got != want:
            raise DDPMError(f"UNet2DModel option {key}={got!r} is not the DDPM paper's network (needs {want!r}); "
                            "such a model cannot be mapped")
    if cfg.get("act_fn") not in ACTIVATIONS:
        raise DDPMError(f"UNet2DModel act_fn={cfg.get('act_fn')!r} cannot be mapped; only silu is supported")
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise DDPMError(f"UNet2DModel sample_size={list(size)} is not square; only square images are supported")
        size = size[0]
    if not isinstance(size, int):
        raise DDPMError("UNet2DModel config has no sample_size; add the image size to config.json")
    if not isinstance(cfg.get("norm_num_groups"), int):
        raise DDPMError(f"UNet2DModel norm_num_groups={cfg.get('norm_num_groups')!r} cannot be mapped; give a number")
    widths = [int(w) for w in cfg["block_out_channels"]]
    base = widths[0]
    if any(w % base for w in widths):
        raise DDPMError(f"block_out_channels {widths} are not multiples of the first; cannot be mapped")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if any(d not in (DOWN, ATTN_DOWN) for d in down) or len(up) != len(down) or \
            up != [ATTN_UP if d == ATTN_DOWN else UP for d in reversed(down)]:
        raise DDPMError(f"UNet2DModel blocks {down} / {up} cannot be mapped: need DownBlock2D/AttnDownBlock2D and "
                        "the mirrored UpBlock2D/AttnUpBlock2D")
    return ModelConfig(
        image_size=size, in_channels=int(cfg["in_channels"]), out_channels=int(cfg["out_channels"]),
        base_channels=base, channel_mult=tuple(w // base for w in widths), num_res_blocks=int(cfg["layers_per_block"]),
        attention_resolutions=tuple(size // 2**i for i, d in enumerate(down) if d == ATTN_DOWN),
        dropout=float(cfg["dropout"]), num_groups=int(cfg["norm_num_groups"]), norm_eps=float(cfg["norm_eps"]))


def _module_pairs(config: ModelConfig) -> Iterator[tuple[str, str, str]]:
    """(our module path, diffusers' module path, kind) for every module holding weights; kind is plain, res or
    attn."""
    yield "temb.0", "time_embedding.linear_1", "plain"
    yield "temb.2", "time_embedding.linear_2", "plain"
    yield "conv_in", "conv_in", "plain"
    levels, res, k = len(config.channel_mult), config.image_size, 0
    for level in range(levels):
        for j in range(config.num_res_blocks):
            yield f"down.{k}.0", f"down_blocks.{level}.resnets.{j}", "res"
            if res in config.attention_resolutions:
                yield f"down.{k}.1", f"down_blocks.{level}.attentions.{j}", "attn"
            k += 1
        if level != levels - 1:
            yield f"down.{k}.0.conv", f"down_blocks.{level}.downsamplers.0.conv", "plain"
            k, res = k + 1, res // 2
    yield "mid.0", "mid_block.resnets.0", "res"
    yield "mid.1", "mid_block.attentions.0", "attn"
    yield "mid.2", "mid_block.resnets.1", "res"
    k = 0
    for i, level in enumerate(reversed(range(levels))):
        for j in range(config.num_res_blocks + 1):
            yield f"up.{k}.0", f"up_blocks.{i}.resnets.{j}", "res"
            if res in config.attention_resolutions:
                yield f"up.{k}.1", f"up_blocks.{i}.attentions.{j}", "attn"
            k += 1
        if level != 0:
            yield f"up.{k}.0.conv", f"up_blocks.{i}.upsamplers.0.conv", "plain"
            k, res = k + 1, res * 2
    yield "norm_out", "conv_norm_out", "plain"
    yield "conv_out", "conv_out", "plain"


def _renames(config: ModelConfig, src: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, str, str]]:
    """(our key, diffusers' key, kind) for every plain tensor; kind "conv1x1" marks our 1x1 conv <-> their linear.
    The fused qkv is left to the callers. `src` (either side) decides whether a residual block has a shortcut."""
    for ours, theirs, kind in _module_pairs(config):
        subs: list[tuple[str, str, str]]
        if kind == "plain":
            subs = [("", "", "same")]
        elif kind == "res":
            subs = [(f".{o}", f".{d}", "same") for o, d in RES_NAMES.items()
                    if o != "shortcut" or f"{ours}.shortcut.weight" in src or f"{theirs}.conv_shortcut.weight" in src]
        else:
            subs = [(".norm", ".group_norm", "same"), (".proj_out", ".to_out.0", "conv1x1")]
        for o, d, how in subs:
            for p in ("weight", "bias"):
                yield f"{ours}{o}.{p}", f"{theirs}{d}.{p}", how if p == "weight" else "same"


def _take(src: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    try:
        return src.pop(key)
    except KeyError:
        raise DDPMError(f"the weights have no tensor {key}; they do not fit the model config") from None


def _leftover(src: dict[str, torch.Tensor]) -> None:
    if src:
        names = sorted(src)
        raise DDPMError(f"the weights hold {len(names)} tensors the model config has no place for "
                        f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); they do not fit the config")


def to_diffusers_state_dict(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our UNet's state dict -> UNet2DModel's (for `to_diffusers_config(config)`)."""
    src, out = dict(state), {}
    for ours, theirs, how in _renames(config, src):
        t = _take(src, ours)
        out[theirs] = t[:, :, 0, 0].clone() if how == "conv1x1" else t.clone()
    for ours, theirs, kind in _module_pairs(config):
        if kind == "attn":
            for p in ("weight", "bias"):
                qkv = _take(src, f"{ours}.qkv.{p}")
                for part, name in zip(qkv.chunk(3, dim=0), ("to_q", "to_k", "to_v")):
                    out[f"{theirs}.{name}.{p}"] = (part[:, :, 0, 0] if p == "weight" else part).clone()
    _leftover(src)
    return out


def from_diffusers_state_dict(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UNet2DModel's state dict -> our UNet's (for `from_diffusers_config(...)` = `config`)."""
    src, out = dict(state), {}
    for ours, theirs, how in _renames(config, src):
        t = _take(src, theirs)
        out[ours] = t[:, :, None, None].clone() if how == "conv1x1" else t.clone()
    for ours, theirs, kind in _module_pairs(config):
        if kind == "attn":
            for p in ("weight", "bias"):
                parts = [_take(src, f"{theirs}.{name}.{p}") for name in ("to_q", "to_k", "to_v")]
                qkv = torch.cat(parts, dim=0)
                out[f"{ours}.qkv.{p}"] = qkv[:, :, None, None] if p == "weight" else qkv
    _leftover(src)
    return out


def _load(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1].strip()
        raise DDPMError(f"the mapped weights do not fit the model: {detail}") from None
    return module.eval()


def to_diffusers(model: UNet) -> torch.nn.Module:
    """A diffusers UNet2DModel computing exactly what `model` computes."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(**to_diffusers_config(model.config))
    return _load(unet, to_diffusers_state_dict(model.config, model.state_dict()))


def from_diffusers(unet: torch.nn.Module) -> UNet:
    """Our UNet computing exactly what the diffusers UNet2DModel `unet` computes."""
    config = from_diffusers_config(dict(unet.config))
    return _load(UNet(config), from_diffusers_state_dict(config, unet.state_dict()))
