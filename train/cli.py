"""`ddpm-train`: train an eps-UNet on MNIST, CIFAR-10 or a folder of images; checkpoints and sample grids out.

Every check of the user's input (names, paths, an existing or unwritable --out, a foreign --resume file) runs
before training starts, and any failure is one `error: ...` line on stderr with exit status 2.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click
import torch
import torch.distributed as dist

from runtime.errors import DDPMError, run_cli
from runtime.fileio import check_writable
from runtime.schedule import DiffusionConfig, sampling_schedule
from train.checkpoint import load_checkpoint, save_checkpoint
from train.data import DATASETS, load_dataset
from train.model import PRESETS, count_parameters, preset_config
from train.sampler import save_sample_grid
from train.trainer import DistInfo, Trainer, TrainConfig, pick_device

DEFAULTS = TrainConfig()


def samples_path(out: Path) -> Path:
    """Where the EMA sample grid of checkpoint `out` goes: runs/x/ckpt.pt -> runs/x/ckpt.samples.png."""
    return out.with_name(f"{out.stem}.samples.png")


def make_parent(out: Path) -> None:
    """Create the folder of --out (runs/mnist/) like mkdir -p; one error line if that is impossible."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DDPMError(f"cannot create folder {out.parent} for {out} ({exc.strerror}); choose another --out") \
            from None


def check_outputs(out: Path, overwrite: bool) -> None:
    check_writable(out, force=overwrite)
    check_writable(samples_path(out), force=overwrite)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dataset", default="mnist", show_default=True, help=f"One of {', '.join(DATASETS)}.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Folder of CIFAR-10 batches or of images.")
@click.option("--preset", default="small", show_default=True, help=f"Model size: {', '.join(PRESETS)}.")
@click.option("--steps", type=int, required=True, help="Total optimisation steps (counting resumed ones).")
@click.option("--batch-size", type=int, default=DEFAULTS.batch_size, show_default=True, help="Global batch.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint file to write (.pt).")
@click.option("--lr", type=float, default=DEFAULTS.lr, show_default=True, help="Adam learning rate.")
@click.option("--ema-decay", type=float, default=DEFAULTS.ema_decay, show_default=True,
              help="EMA decay (warmed up as min(decay, (1+step)/(10+step))).")
@click.option("--warmup", type=int, default=DEFAULTS.warmup, show_default=True, help="Linear lr warm-up steps.")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True, help="Seeds weights and all draws.")
@click.option("--sample-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also write the sample grid every K steps (0: only at the end).")
@click.option("--sample-steps", default="100", show_default=True,
              help="Sampling steps for the preview grid (respaced; 1000 = the full chain).")
@click.option("--save-every", type=click.IntRange(min=0), default=1000, show_default=True, help="Checkpoint every K steps.")
@click.option("--resume", is_flag=True, help="Continue the run stored in --out (same loss sequence).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA if available).")
@click.option("--force", is_flag=True, help="Overwrite an existing --out and its sample grid.")
@click.pass_context
def train_command(ctx: click.Context, dataset: str, data_dir: Path | None, preset: str, steps: int, batch_size: int,
                  out: Path, lr: float, ema_decay: float, warmup: int, seed: int, sample_every: int,
                  sample_steps: str, save_every: int, resume: bool, device: str | None, force: bool) -> None:
    """Train a DDPM eps-UNet (Ho et al. 2020) and write a checkpoint plus <out stem>.samples.png."""
    if steps < 1:
        raise DDPMError(f"--steps must be >= 1, got {steps}")
    if preset not in PRESETS:
        raise DDPMError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    if resume and force:
        raise DDPMError("--resume continues --out and --force overwrites it; pass only one")
    if resume and not out.is_file():
        raise DDPMError(f"nothing to resume: {out} does not exist; drop --resume to start a new run")
    if out.parent.is_dir():  # else the folder is created (and checked) once the other options are known good
        check_outputs(out, force or resume)
    explicit = {name for name in ("preset", "batch_size", "lr", "ema_decay", "warmup", "seed")
                if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    config = TrainConfig(batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay, seed=seed)
    ckpt = load_checkpoint(out) if resume else None
    if ckpt is not None:
        if ckpt.data.get("dataset") != dataset:
            raise DDPMError(f"{out} was trained on {ckpt.data.get('dataset')!r}, not {dataset!r}; pass "
                            f"--dataset {ckpt.data.get('dataset')}")
        if ckpt.step >= steps:
            raise DDPMError(f"{out} is already at step {ckpt.step}; pass --steps greater than that to continue")
        # the run's own options, unless the user overrides one explicitly
        overrides = {k: getattr(config, k) for k in explicit - {"preset"}}
        config = replace(TrainConfig.from_dict(ckpt.train_config), **overrides)

    diffusion = ckpt.diffusion_config if ckpt is not None else DiffusionConfig()
    sampling_schedule(diffusion, sample_steps)  # a bad --sample-steps must fail now, not after training
    dist_info = DistInfo.from_env()
    dev = pick_device(device, dist_info)
    data = load_dataset(dataset, data_dir)
    if dist_info.is_main:
        make_parent(out)
        check_outputs(out, force or resume)
    if dist_info.world_size > 1:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
    model_config = preset_config(preset, data.images.shape[-1], data.channels)
    if ckpt is not None and "preset" not in explicit:  # an explicit, different --preset fails in restore()
        model_config = ckpt.model_config
    trainer = Trainer(model_config, diffusion, data, config, dev, dist_info)
    if ckpt is not None:
        trainer.restore(ckpt)

    def on_step(step: int, loss: float) -> None:
        if not dist_info.is_main or step == steps:
            return
        if save_every and step % save_every == 0:
            save_checkpoint(out, trainer.checkpoint())
        if sample_every and step % sample_every == 0:
            save_sample_grid(samples_path(out), trainer.ema, trainer.diffusion_config, steps=sample_steps,
                             seed=config.seed)

    if dist_info.is_main:
        click.echo(f"training a {count_parameters(trainer.model):,}-parameter UNet on "
                   f"{dataset} ({len(data.images)} images) on {dev}, steps {trainer.step} -> {steps}", err=True)
    trainer.train(steps, on_step)
    if dist_info.is_main:
        save_checkpoint(out, trainer.checkpoint())
        grid = save_sample_grid(samples_path(out), trainer.ema, trainer.diffusion_config, steps=sample_steps,
                                seed=config.seed)
        click.echo(f"wrote {out} and {grid}", err=True)
    if dist_info.world_size > 1:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    run_cli(train_command, "ddpm-train", argv,
            interrupted="interrupted; the last periodic checkpoint (if any) is intact, continue with --resume")
