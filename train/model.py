"""The eps-prediction UNet of Ho et al. (2020), configurable from a tiny CPU model to the paper's CIFAR-10 model."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from runtime.errors import DDPMError


def size_multiple(patch_size: int, levels: int) -> int:
    """Image sides a UNet takes are multiples of this: the patch folds the image, then each level but the last halves
    the grid."""
    return patch_size * 2 ** (levels - 1)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; stored in checkpoints so a model can be rebuilt without code changes."""

    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_groups: int = 32
    norm_eps: float = 1e-6
    # p > 1 folds each p x p pixel patch into channels before the first conv and unfolds the output after the last
    # (pixel_unshuffle / pixel_shuffle): the UNet runs on an (image_size / p)^2 grid, which attention_resolutions
    # refer to. Not the paper's: every level works on p^2 fewer positions, so a CPU training step costs far less
    # (figures in docs/measurements.md).
    patch_size: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        levels = len(self.channel_mult)
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise DDPMError(f"patch_size {self.patch_size} must be >= 1 and divide image_size {self.image_size}")
        if self.image_size % size_multiple(self.patch_size, levels):
            raise DDPMError(f"image_size {self.image_size} / patch_size {self.patch_size} must be divisible by "
                            f"2^{levels - 1} for {levels} levels")
        widths = {self.base_channels * m for m in self.channel_mult}
        if any(w % self.num_groups for w in widths):
            raise DDPMError(f"every level width {sorted(widths)} must be divisible by num_groups={self.num_groups}")

    @property
    def grid_size(self) -> int:
        """Side of the grid the UNet's first level runs on."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise DDPMError(f"unknown model config keys {sorted(unknown)}; is the checkpoint from another tool?")
        return cls(**d)


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's CIFAR-10 model: 35,746,307 parameters.
    "cifar10": dict(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
                    dropout=0.1, num_groups=32),
    # The paper's 256 x 256 models (LSUN church/bedroom/cat, CelebA-HQ; google/ddpm-church-256's block structure).
    "lsun256": dict(base_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attention_resolutions=(16,),
                    dropout=0.0, num_groups=32),
    # Small enough to train to recognisable MNIST digits on a CPU; attention at the lowest level, 7 x 7 for
    # 28 x 28 MNIST or 8 x 8 for 32 x 32 images.
    "small": dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(7, 8),
                  dropout=0.0, num_groups=8),
    # The quickstart's: `small`'s widths on 2 x 2 pixel patches (14 x 14 and 7 x 7 grids for MNIST), attention only
    # in the middle block. Its steps are much cheaper than `small`'s, and on MNIST the extra steps a short CPU run
    # then takes are worth more than the full-resolution first level (docs/measurements.md).
    "fast": dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                 dropout=0.0, num_groups=8, patch_size=2),
    # For tests: as fast as a UNet with every block type can be.
    "tiny": dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(16,),
                 dropout=0.0, num_groups=4),
}


def preset_image_size(name: str, size: int) -> int:
    """The smallest size >= `size` that the preset's UNet divides."""
    if name not in PRESETS:
        raise DDPMError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    multiple = size_multiple(PRESETS[name].get("patch_size", 1), len(PRESETS[name]["channel_mult"]))
    return -(-size // multiple) * multiple


def preset_config(name: str, image_size: int, channels: int) -> ModelConfig:
    if name not in PRESETS:
        raise DDPMError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    return ModelConfig(image_size=image_size, in_channels=channels, out_channels=channels, **PRESETS[name])


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps: [sin | cos] with frequencies exp(-i ln(10000) / (half - 1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, dropout: float, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, ch: int, groups: int, eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * (c**-0.5), dim=-1)  # [b, hw(q), hw(k)]
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """3x3 conv, stride 2, with TF 'SAME' padding (0 top/left, 1 bottom/right) as in the original code."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t): predicts the noise in x_t at integer timestep t (shape [B])."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        ch, groups, eps, drop = config.base_channels, config.num_groups, config.norm_eps, config.dropout
        temb, p2 = 4 * ch, config.patch_size**2
        self.temb = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(config.in_channels * p2, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips, cur, res = [ch], ch, config.grid_size
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                blocks = [ResBlock(cur, ch * mult, temb, drop, groups, eps)]
                cur = ch * mult
                if res in config.attention_resolutions:
                    blocks.append(AttnBlock(cur, groups, eps))
                self.down.append(nn.ModuleList(blocks))
                skips.append(cur)
            if level != len(config.channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                skips.append(cur)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(cur, cur, temb, drop, groups, eps), AttnBlock(cur, groups, eps),
                                  ResBlock(cur, cur, temb, drop, groups, eps)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for _ in range(config.num_res_blocks + 1):
                blocks = [ResBlock(cur + skips.pop(), ch * mult, temb, drop, groups, eps)]
                cur = ch * mult
                if res in config.attention_resolutions:
                    blocks.append(AttnBlock(cur, groups, eps))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(cur)]))
                res *= 2

        self.norm_out = nn.GroupNorm(groups, cur, eps=eps)
        self.conv_out = _zero(nn.Conv2d(cur, config.out_channels * p2, 3, padding=1))

    @staticmethod
    def _run(blocks: nn.ModuleList, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            h = block(h, temb) if isinstance(block, ResBlock) else block(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb(timestep_embedding(t, self.config.base_channels))
        p = self.config.patch_size
        hs = [self.conv_in(F.pixel_unshuffle(x, p) if p > 1 else x)]
        for blocks in self.down:
            hs.append(self._run(blocks, hs[-1], temb))
        h = self._run(self.mid, hs[-1], temb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(blocks, h, temb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, p) if p > 1 else out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
