"""The DDPM training loop: L_simple with Adam, warm-up, clipping and EMA, resumable bit-for-bit.

Every random draw of the loop (batch indices, t, noise, flips) comes from one dedicated CPU `torch.Generator`; its
state and torch's global RNG (dropout) go into the checkpoint, so a resumed run continues the exact loss sequence.
Under `torchrun` every rank draws the same global batch from that generator and keeps its own disjoint slice.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from runtime.errors import DDPMError
from runtime.sampling.schedule import DiffusionConfig, Schedule
from runtime.progress import progress
from runtime.sampling.steps import q_sample
from runtime.errors import NonFiniteError
from train.checkpoint import Checkpoint
from train.data import Dataset
from train.model import ModelConfig, UNet


LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation options; stored in the checkpoint so --resume continues with the same ones."""

    batch_size: int = 64  # global batch, split over ranks
    lr: float = 2e-4
    warmup: int = 100  # linear lr warm-up steps (the paper: 5000 over 800k steps)
    lr_schedule: str = "constant"  # after warm-up: "constant" (the paper) or "cosine" (decay to 0 at the last step)
    ema_decay: float = 0.995  # see ema_decay_at: capped early by (1 + step) / (10 + step)
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise DDPMError(f"{{opt:batch_size}} must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise DDPMError(f"{{opt:lr}} must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise DDPMError(f"{{opt:warmup}} must be >= 0, got {self.warmup}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise DDPMError(f"{{opt:lr_schedule}} must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise DDPMError(f"{{opt:ema_decay}} must be in [0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def ema_decay_at(decay: float, step: int) -> float:
    """EMA warm-up: early on the average would be dominated by the random init, so cap the decay by
    (1 + step) / (10 + step) (about a step/9-step horizon) until it reaches `decay`."""
    return min(decay, (1.0 + step) / (10.0 + step))


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "DistInfo":
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str | None, dist_info: DistInfo) -> torch.device:
    """CUDA when available (one GPU per rank under torchrun), else CPU; an explicit --device wins."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise DDPMError(f"unknown device {requested!r}; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DDPMError(f"{{opt:device}} {requested} asked for CUDA but no CUDA GPU is visible; use {{opt:device}} cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", dist_info.local_rank if dist_info.world_size > 1 else 0)
    return torch.device("cpu")


class Trainer:
    """Holds the model, its EMA copy, the optimizer and the RNG; `train_step` does one optimisation step."""

    def __init__(self, model_config: ModelConfig, diffusion_config: DiffusionConfig, dataset: Dataset,
                 config: TrainConfig, device: torch.device | str = "cpu", dist_info: DistInfo | None = None):
        self.dist = dist_info or DistInfo()
        if config.batch_size % self.dist.world_size:
            raise DDPMError(f"{{opt:batch_size}} {config.batch_size} must be divisible by the {self.dist.world_size} ranks")
        self.model_config, self.diffusion_config, self.config = model_config, diffusion_config, config
        self.dataset = dataset
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)
        torch.manual_seed(config.seed)  # weights init and the global (dropout) stream
        self.model = UNet(model_config).to(self.device)
        if self.device.type == "cpu":  # oneDNN's CPU convolutions are fastest in NHWC
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        # foreach: one call per update for all tensors instead of one op per tensor (the CPU default), as clipping
        # and the EMA are done: fewer, larger kernels per step
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, foreach=True)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        schedule = Schedule.from_config(diffusion_config)
        self.sqrt_ac = torch.tensor(schedule.sqrt_alphas_cumprod, dtype=torch.float32).to(self.device)
        self.sqrt_1m_ac = torch.tensor(schedule.sqrt_one_minus_alphas_cumprod, dtype=torch.float32).to(self.device)
        self.num_timesteps = len(schedule)
        self.net: nn.Module = self.model
        if self.dist.world_size > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def lr_at(self, step: int, total: int | None = None) -> float:
        """Linear warm-up, then constant or (with the run's last step `total` known) a cosine decay to 0.
        A short CPU run gains most from the decay: the last steps average out the noise of the large rate."""
        c = self.config
        if step < c.warmup:
            return c.lr * (step + 1) / c.warmup
        if c.lr_schedule == "cosine" and total is not None and total > c.warmup:
            return c.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - c.warmup) / (total - c.warmup))))
        return c.lr

    def draw_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch (indices drawn uniformly, with replacement): x0, t and eps."""
        g, B = self.generator, self.config.batch_size
        idx = torch.randint(len(self.dataset.images), (B,), generator=g)
        t = torch.randint(self.num_timesteps, (B,), generator=g)
        noise = torch.randn((B, *self.dataset.images.shape[1:]), generator=g)
        flips = torch.rand(B, generator=g) < 0.5 if self.dataset.allow_flips else None
        per_rank = B // self.dist.world_size
        mine = slice(self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank)
        x0 = self.images[idx[mine].to(self.device)]
        if flips is not None:
            x0 = torch.where(flips[mine].to(self.device)[:, None, None, None], x0.flip(3), x0)
        return x0, t[mine].to(self.device), noise[mine].to(self.device)

    def loss(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """L_simple: mean squared error between the true and the predicted noise of x_t."""
        x_t = q_sample(x0, noise, self.sqrt_ac[t][:, None, None, None], self.sqrt_1m_ac[t][:, None, None, None])
        return ((self.net(x_t, t) - noise) ** 2).mean()

    def train_step(self, total: int | None = None) -> float:
        """One optimisation step; `total` (the run's last step) sets the horizon of a cosine lr decay."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step, total)
        loss = self.loss(*self.draw_batch())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip, foreach=True)
        self.optimizer.step()
        self.update_ema()
        self.step += 1
        value = loss.detach()
        if self.dist.world_size > 1:
            dist.all_reduce(value)
            value /= self.dist.world_size
        if not math.isfinite(float(value)):  # every rank sees the reduced value, so all stop together
            raise NonFiniteError(f"the training loss became {float(value)} at step {self.step}: the run diverged "
                                 "({opt:lr} too high?)")
        return float(value)

    @torch.no_grad()
    def update_ema(self) -> None:
        decay = ema_decay_at(self.config.ema_decay, self.step)
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1.0 - decay)
        for e, b in zip(self.ema.buffers(), self.model.buffers()):
            e.copy_(b)

    def train(self, until: int, on_step: Callable[[int, float], None] | None = None) -> list[float]:
        """Run steps until `self.step == until`, with a tqdm bar (loss, it/s) on rank 0; returns the losses."""
        losses = []
        with progress(total=until, initial=self.step, desc="train", unit="step", show=self.dist.is_main,
                      dynamic_ncols=True) as bar:
            while self.step < until:
                losses.append(self.train_step(until))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
                if on_step is not None:
                    on_step(self.step, losses[-1])
        return losses

    def sampling_model(self) -> UNet:
        """The EMA weights in a plain (contiguous, eval) UNet, built as `ddpm-run ckpt.pt` builds it from the
        checkpoint, so the preview grid is what sampling the checkpoint gives (the EMA copy trains channels-last)."""
        model = UNet(self.model_config)
        model.load_state_dict(self.ema.state_dict())
        return model.to(self.device).eval()

    def checkpoint(self) -> Checkpoint:
        """Everything needed to sample, export or resume, as CPU tensors."""
        cpu = lambda sd: {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}  # noqa: E731
        for name, module in (("weights", self.model), ("EMA weights", self.ema)):
            if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
                raise NonFiniteError(f"the {name} hold NaN or inf at step {self.step}: the run diverged "
                                     "({opt:lr} too high?)")
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state(),
               "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}
        return Checkpoint(
            model_config=self.model_config, diffusion_config=self.diffusion_config,
            ema=cpu(self.ema.state_dict()), model=cpu(self.model.state_dict()),
            data={"dataset": self.dataset.name, "image_size": int(self.images.shape[-1]),
                  "channels": self.dataset.channels, "data_range": [-1.0, 1.0]},
            step=self.step, optimizer=_optimizer_to_cpu(self.optimizer.state_dict()),
            train_config=self.config.to_dict(), rng=rng)

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from `ckpt` exactly: weights, EMA, Adam moments, step and both RNG streams."""
        if ckpt.model_config != self.model_config or ckpt.diffusion_config != self.diffusion_config:
            raise DDPMError("the {opt:resume} checkpoint has a different model or schedule than asked for; drop "
                            "{opt:preset} or resume with the checkpoint's own settings")
        if ckpt.optimizer is None or "generator" not in ckpt.rng or "torch" not in ckpt.rng:
            raise DDPMError("the {opt:resume} checkpoint holds no optimizer or RNG state (is it an export-only file?); "
                            "resume from a checkpoint written by ddpm-train")
        try:
            self.model.load_state_dict(ckpt.model)
            self.ema.load_state_dict(ckpt.ema)
            self.optimizer.load_state_dict(ckpt.optimizer)
            self.generator.set_state(ckpt.rng["generator"])
            torch.set_rng_state(ckpt.rng["torch"])
            if ckpt.rng.get("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt.rng["cuda"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
            raise DDPMError(f"the {{opt:resume}} checkpoint does not fit this model ({first}); "
                            "resume with the settings it was trained with") from None
        self.step = ckpt.step


def _optimizer_to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {"state": {k: {n: v.detach().cpu().contiguous().clone() if torch.is_tensor(v) else v
                          for n, v in s.items()}
                      for k, s in state["state"].items()},
            "param_groups": copy.deepcopy(state["param_groups"])}
