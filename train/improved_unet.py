"""The UNet of Improved DDPM (Nichol & Dhariwal 2021, openai/improved-diffusion), unconditional, 2-D.

Written from that project's documented structure so that its checkpoints load with `load_state_dict(strict=True)`:
every parameter name and shape is theirs. Differences from our own `train.model.UNet` that matter for exactness:
the timestep embedding is [cos, sin] of a float timestep, ResBlocks can modulate their second norm with a scale and
shift from the embedding, attention splits q/k/v per head from one interleaved 1x1 convolution, and GroupNorm (32
groups, eps 1e-5) is always computed in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.errors import DDPMError

# Channel multipliers their image scripts pick by image size (improved_diffusion/script_util.py, create_model).
CHANNEL_MULT_BY_SIZE = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}


@dataclass(frozen=True)
class ImprovedUNetConfig:
    """Architecture hyper-parameters in their terms; `attention_rates` are downsample rates (image_size // res)."""

    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_rates: tuple[int, ...]
    channel_mult: tuple[int, ...]
    dropout: float = 0.0
    num_heads: int = 1
    num_heads_upsample: int = -1  # -1: same as num_heads
    use_scale_shift_norm: bool = False
    conv_resample: bool = True

    def __post_init__(self) -> None:
        widths = {self.model_channels * m for m in self.channel_mult}
        if any(w % 32 for w in widths):
            raise DDPMError(f"every level width {sorted(widths)} must be divisible by 32 (their GroupNorm has 32 "
                            "groups); check --num_channels")

    @property
    def heads_up(self) -> int:
        return self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in float32 whatever the input precision, as theirs."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos(t f_i), sin(t f_i)], f_i = P^(-i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    angles = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the timestep added (or scale-shift applied) between them, and a skip path."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False):
        super().__init__()
        out = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out if use_scale_shift_norm else out))
        self.out_layers = nn.Sequential(GroupNorm32(out), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out, out, 3, padding=1))
        self.skip_connection = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all positions; one 1-D conv makes q, k, v, grouped per head as [q_h, k_h, v_h]."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise DDPMError(f"{num_heads} attention heads cannot split {channels} channels; check --num_heads")
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        flat = x.reshape(b, c, height * width)
        qkv = self.qkv(self.norm(flat)).reshape(b * self.num_heads, 3 * c // self.num_heads, height * width)
        q, k, v = qkv.chunk(3, dim=1)  # each [B*heads, c/heads, N]
        scale = (c // self.num_heads) ** -0.25  # applied to q and k each, as theirs
        weights = torch.softmax(torch.matmul((q * scale).transpose(1, 2), k * scale).float(), dim=-1).type(q.dtype)
        h = torch.matmul(v, weights.transpose(1, 2)).reshape(b, c, height * width)
        return (flat + self.proj_out(h)).reshape(b, c, height, width)


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


class EmbedSequential(nn.Sequential):
    """A sequence of layers where ResBlocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ImprovedUNet(nn.Module):
    """`forward(x, t)`: x [B, in, H, W], t [B] float timesteps as the UNet sees them (already rescaled) ->
    [B, out, H, W]. Weights named like improved-diffusion's UNetModel."""

    def __init__(self, config: ImprovedUNetConfig):
        super().__init__()
        self.config = cfg = config
        ch0 = cfg.model_channels
        emb_dim = 4 * ch0
        self.time_embed = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, emb_dim, cfg.dropout, cout, cfg.use_scale_shift_norm)

        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(cfg.in_channels, ch0, 3, padding=1))])
        skips, ch, rate = [ch0], ch0, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * ch0)]
                ch = mult * ch0
                if rate in cfg.attention_rates:
                    layers.append(AttentionBlock(ch, cfg.num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                skips.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch, cfg.conv_resample)))
                skips.append(ch)
                rate *= 2
        self.middle_block = EmbedSequential(res(ch, ch), AttentionBlock(ch, cfg.num_heads), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skips.pop(), mult * ch0)]
                ch = mult * ch0
                if rate in cfg.attention_rates:
                    layers.append(AttentionBlock(ch, cfg.heads_up))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch, cfg.conv_resample))
                    rate //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
