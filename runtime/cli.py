"""`ddpm-run`: sample images from an exported model (.onnx, .plan) or a training checkpoint (.pt)."""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from runtime.backends import PROVIDERS, open_model
from runtime.errors import DDPMError, run_cli
from runtime.fileio import atomic_write, check_writable
from runtime.images import make_grid, save_png, to_uint8
from runtime.noise import load_noise, save_noise
from runtime.samplers import SAMPLERS, Chain, sample
from runtime.schedule import VARIANCE_TYPES


def _choice(values: tuple[str, ...]) -> click.Choice:
    return click.Choice(values, case_sensitive=False)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--n", "n", type=int, default=64, show_default=True, help="Number of images.")
@click.option("--steps", default=None, help="Sampling steps: K, ddimK (uniform stride) or section counts like "
              "10,20,30. Default: all T steps.")
@click.option("--sampler", type=_choice(SAMPLERS), default="ddpm", show_default=True)
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM noise scale (0 = deterministic).")
@click.option("--variance-type", type=_choice(VARIANCE_TYPES), default=None,
              help="DDPM reverse variance. Default: the model's.")
@click.option("--clip/--no-clip", "clip", default=None, help="Clip x_0 to the data range. Default: the model's.")
@click.option("--seed", type=int, default=0, show_default=True, help="Image i uses rng([seed, i]).")
@click.option("--batch-size", type=int, default=None, help="Images per model call (default: min(n, 64, max)).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("samples.npz"), show_default=True,
              help="npz with arr_0 (uint8 N x H x W x C) and samples (float32 N x C x H x W).")
@click.option("--grid", type=click.Path(path_type=Path), default=None, help="Also write a PNG grid.")
@click.option("--provider", type=_choice(PROVIDERS), default="cpu", show_default=True)
@click.option("--precision", type=_choice(("auto", "fp32", "fp16")), default="auto", show_default=True,
              help="auto: the FP16 graph on CUDA when it was exported, FP32 on CPU.")
@click.option("--cuda-graph", is_flag=True, help="Capture a CUDA graph per batch shape (ONNX Runtime CUDA).")
@click.option("--threads", type=int, default=0, show_default=True, help="CPU threads (0: library default).")
@click.option("--noise", "noise_file", type=click.Path(path_type=Path), default=None,
              help="Read the chain's noise from a [K+1, N, C, H, W] float32 .npy instead of the seed.")
@click.option("--save-noise", "noise_out", type=click.Path(path_type=Path), default=None,
              help="Write the seeded noise this run uses as a [K+1, N, C, H, W] float32 .npy.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def run(model: Path, n: int, steps: str | None, sampler: str, eta: float, variance_type: str | None,
        clip: bool | None, seed: int, batch_size: int | None, out: Path, grid: Path | None, provider: str,
        precision: str, cuda_graph: bool, threads: int, noise_file: Path | None, noise_out: Path | None,
        force: bool) -> None:
    """Sample --n images from MODEL (.onnx, .plan or .pt) and write them to --out (and --grid)."""
    if n < 1:
        raise DDPMError(f"--n must be >= 1, got {n}")
    if batch_size is not None and batch_size < 1:
        raise DDPMError(f"--batch-size must be >= 1, got {batch_size}")
    if seed < 0:
        raise DDPMError(f"--seed must be >= 0, got {seed}")
    if noise_file is not None and noise_out is not None:
        raise DDPMError("--noise and --save-noise exclude each other")
    outputs = [p for p in (out, grid, noise_out) if p is not None]
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise DDPMError("--out, --grid and --save-noise must be different files")
    for path in outputs:
        check_writable(path, force)
    backend = open_model(model, provider, precision=precision, cuda_graph=cuda_graph, threads=threads)
    chain = Chain.build(backend.info.diffusion, sampler, steps, eta, variance_type, clip)
    shape = backend.info.image_shape
    noise = load_noise(noise_file, n, shape, len(chain)) if noise_file is not None else None
    start = time.perf_counter()
    samples = sample(backend, chain, n, seed=seed, noise=noise, batch_size=batch_size, progress=True)
    seconds = time.perf_counter() - start
    pictures = to_uint8(samples, backend.info.data_range)
    atomic_write(out, lambda f: np.savez(f, arr_0=pictures, samples=samples))
    if grid is not None:
        save_png(grid, make_grid(pictures))
    if noise_out is not None:
        save_noise(noise_out, seed, n, shape, len(chain))
    written = ", ".join(str(p) for p in outputs)
    click.echo(f"{n} images in {seconds:.2f} s ({n / seconds:.2f} images/s), {chain.describe()}, "
               f"{backend.description} -> {written}")


def main(argv: list[str] | None = None) -> None:
    run_cli(run, "ddpm-run", argv)
