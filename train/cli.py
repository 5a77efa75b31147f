"""`ddpm-train`: train an eps-UNet on MNIST, CIFAR-10 or a folder of images; checkpoints and sample grids out.

Every check of the user's input (names, paths, an existing or unwritable --out, a foreign --resume file) runs
before training starts, and any failure is one `error: ...` line on stderr with exit status 2.
"""

from __future__ import annotations

import resource
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import click
import torch
import torch.distributed as dist
from tqdm import tqdm

from runtime.cli_common import CONTEXT, COUNT, FINITE, force_option, require_suffix, run_cli, seed_option
from runtime.errors import DDPMError, NonFiniteError
from runtime.fileio import blocking_file, check_writable
from runtime.resources import human, require_memory
from runtime.sampling.schedule import DiffusionConfig, sampling_schedule
from train.checkpoint import load_checkpoint, save_checkpoint
from train.data import DATASETS, load_dataset, pad_to
from train.model import PRESETS, ModelConfig, count_parameters, preset_config, preset_image_size
from train.sampler import save_sample_grid
from train.trainer import LR_SCHEDULES, DistInfo, Trainer, TrainConfig, pick_device

DEFAULTS = TrainConfig()


def samples_path(out: Path) -> Path:
    """Where the EMA sample grid of checkpoint `out` goes: runs/x/ckpt.pt -> runs/x/ckpt.samples.png."""
    return out.with_name(f"{out.stem}.samples.png")


def make_parent(out: Path) -> None:
    """Create the folder of --out (runs/mnist/) like mkdir -p; one error line if that is impossible."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = blocking_file(out.parent)
        if blocker is not None:
            raise DDPMError(f"cannot write {out}: {blocker} is a file, not a folder; choose another --out") from None
        raise DDPMError(f"cannot create folder {out.parent} for {out} ({exc.strerror}); choose another --out") \
            from None


def check_batch_memory(per_rank: int, config: ModelConfig, device: torch.device) -> None:
    """Refuse a batch that cannot fit before allocating it: a lower bound, four full-resolution feature maps per
    image (input conv, one res block, output conv) kept for the backward pass."""
    need = 4 * per_rank * config.base_channels * config.image_size ** 2 * 4
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if need > free:
            raise DDPMError(f"--batch-size {per_rank} per GPU needs at least {human(need)} of GPU memory, "
                            f"{human(free)} is free on {device}; lower --batch-size")
        return
    require_memory(need, f"--batch-size {per_rank}", "lower --batch-size")


def check_outputs(out: Path, overwrite: bool) -> None:
    check_writable(out, force=overwrite)
    check_writable(samples_path(out), force=overwrite)


class SpeedProbe:
    """Measures this machine's training speed over the first `window` steps after the first one (which pays for
    one-time set-up) and prints it once, with the time the whole run will take at that pace."""

    def __init__(self, start: int, until: int, window: int = 10):
        self.first, self.last, self.until = start + 1, start + 1 + window, until
        self.t0 = self.cpu0 = 0.0

    @staticmethod
    def _cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def __call__(self, step: int) -> None:
        if step == self.first:
            self.t0, self.cpu0 = time.perf_counter(), self._cpu()
        elif step == self.last:
            n = self.last - self.first
            wall, cpu = (time.perf_counter() - self.t0) / n, (self._cpu() - self.cpu0) / n
            tqdm.write(f"speed: {1 / wall:.2f} steps/s ({wall:.2f} s/step, {cpu:.2f} CPU s/step on "
                       f"{torch.get_num_threads()} threads) over steps {self.first + 1}-{self.last}; "
                       f"the remaining {self.until - step} steps take about {(self.until - step) * wall / 60:.1f} "
                       "min at this pace", file=sys.stderr)


@click.command(context_settings=CONTEXT)
@click.version_option(package_name="ddpm-deploy", prog_name="ddpm-train")
@click.option("--dataset", default="mnist", show_default=True, help=f"One of {', '.join(DATASETS)}.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Folder of CIFAR-10 batches or of images "
              "(cifar10, folder).")
@click.option("--preset", default="small", show_default=True, help=f"Model size: {', '.join(PRESETS)}.")
@click.option("--steps", type=int, required=True, help="Total optimisation steps, counting resumed ones.")
@click.option("--batch-size", type=int, default=DEFAULTS.batch_size, show_default=True,
              help="Global batch in images per step, split over the ranks.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint file to write (.pt).")
@click.option("--lr", type=FINITE, default=DEFAULTS.lr, show_default=True, help="Adam learning rate (peak).")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=DEFAULTS.lr_schedule, show_default=True,
              help="After warm-up: constant, or cosine decay to 0 at --steps.")
@click.option("--ema-decay", type=FINITE, default=DEFAULTS.ema_decay, show_default=True,
              help="EMA decay per step (warmed up as min(decay, (1+step)/(10+step))).")
@click.option("--warmup", type=int, default=DEFAULTS.warmup, show_default=True,
              help="Linear lr warm-up, in steps.")
@seed_option("Seeds the weights, every training draw and the preview noise.", default=DEFAULTS.seed)
@click.option("--sample-every", type=COUNT, default=0, show_default=True,
              help="Also write the preview grid every K steps (0: only at the end).")
@click.option("--sample-steps", default="100", show_default=True,
              help="Sampling steps of the 64-image preview grid (respaced ancestral DDPM; 1000 = the full chain).")
@click.option("--preview/--no-preview", default=True, show_default=True,
              help="Write the preview grid at the end (--no-preview: sample the checkpoint later with ddpm-run).")
@click.option("--save-every", type=COUNT, default=1000, show_default=True,
              help="Checkpoint every K steps (0: only at the end).")
@click.option("--resume", is_flag=True, help="Continue the run stored in --out (same loss sequence).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N  [default: CUDA if available, else cpu]")
@force_option("Overwrite an existing --out and its preview grid.")
@click.pass_context
def train_command(ctx: click.Context, dataset: str, data_dir: Path | None, preset: str, steps: int, batch_size: int,
                  out: Path, lr: float, lr_schedule: str, ema_decay: float, warmup: int, seed: int,
                  sample_every: int, sample_steps: str, preview: bool, save_every: int, resume: bool,
                  device: str | None, force: bool) -> None:
    """Train a DDPM eps-UNet (Ho et al. 2020) and write a checkpoint plus <out stem>.samples.png."""
    if steps < 1:
        raise DDPMError(f"--steps must be >= 1, got {steps}")
    if out.is_dir():
        raise DDPMError(f"--out {out} is a folder; give the checkpoint's file path, e.g. --out {out / 'ckpt.pt'}")
    require_suffix(out, (".pt",), "--out", "a PyTorch checkpoint that ddpm-export and ddpm-run recognise by")
    if preset not in PRESETS:
        raise DDPMError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    if resume and force:
        raise DDPMError("--resume continues --out and --force overwrites it; pass only one")
    if resume and not out.is_file():
        raise DDPMError(f"nothing to resume: {out} does not exist; drop --resume to start a new run")
    if out.parent.is_dir():  # else the folder is created (and checked) once the other options are known good
        check_outputs(out, force or resume)
    explicit = {name for name in ("preset", "batch_size", "lr", "lr_schedule", "ema_decay", "warmup", "seed")
                if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    config = TrainConfig(batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, warmup=warmup, ema_decay=ema_decay,
                         seed=seed)
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
    model_config = preset_config(preset, preset_image_size(preset, data.images.shape[-1]), data.channels)
    if ckpt is not None and "preset" not in explicit:  # an explicit, different --preset fails in restore()
        model_config = ckpt.model_config
    data = pad_to(data, model_config.image_size)
    check_batch_memory(config.batch_size // dist_info.world_size, model_config, dev)
    trainer = Trainer(model_config, diffusion, data, config, dev, dist_info)
    if ckpt is not None:
        trainer.restore(ckpt)

    probe = SpeedProbe(trainer.step, steps)
    saved = {"step": ckpt.step if ckpt is not None else None}  # the last checkpoint on disk

    def save() -> None:
        save_checkpoint(out, trainer.checkpoint(), replace=force or resume or saved["step"] is not None)
        saved["step"] = trainer.step

    def on_step(step: int, loss: float) -> None:
        if not dist_info.is_main:
            return
        probe(step)
        if step == steps:
            return
        if save_every and step % save_every == 0:
            save()
        if sample_every and step % sample_every == 0:
            save_sample_grid(samples_path(out), trainer.sampling_model(), trainer.diffusion_config,
                             steps=sample_steps, seed=config.seed)

    if dist_info.is_main:
        click.echo(f"training a {count_parameters(trainer.model):,}-parameter UNet on "
                   f"{dataset} ({len(data.images)} images) on {dev}, steps {trainer.step} -> {steps}", err=True)
    try:
        trainer.train(steps, on_step)
        if dist_info.is_main:
            save()
    except NonFiniteError as exc:
        kept = (f"{out} keeps the last good checkpoint (step {saved['step']}); continue it with --resume and a "
                "lower --lr" if saved["step"] is not None else "no checkpoint was written; rerun with a lower --lr")
        raise NonFiniteError(f"{exc}; {kept}") from None
    except (dist.DistError, RuntimeError) as exc:
        if dist_info.world_size == 1:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DDPMError(f"rank {dist_info.rank} lost its peers ({first}); check the other ranks' output, then "
                        "continue from the last periodic checkpoint with --resume") from None
    if dist_info.is_main and preview:
        grid = save_sample_grid(samples_path(out), trainer.sampling_model(), trainer.diffusion_config,
                                steps=sample_steps, seed=config.seed)
        click.echo(f"wrote {out} and {grid}", err=True)
    elif dist_info.is_main:
        click.echo(f"wrote {out}", err=True)
    if dist_info.world_size > 1:
        dist.barrier()  # tear down together: a rank that leaves while rank 0 still writes can hang in gloo's teardown
        dist.destroy_process_group()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (torchrun stopping a job, kill) ends like Ctrl-C: no temp file left behind


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    run_cli(train_command, "ddpm-train", argv,
            interrupted="interrupted; the last periodic checkpoint (if any) is intact, continue with --resume")


if __name__ == "__main__":  # python -m train.cli, e.g. under torchrun -m
    main()
