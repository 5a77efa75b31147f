"""`ddpm-run`: sample images from an exported model (.onnx, .plan) or a training checkpoint (.pt); `ddpm-run merge`
joins the shards of a run split over processes (`--shard`, `runtime.run.shards`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from runtime.backends import open_model
from runtime.cli_common import (CONTEXT, FINITE, POSITIVE, DefaultCommandGroup, backend_options, choice, force_option,
                                model_argument, require_suffix, run_cli, seed_option)
from runtime.errors import DDPMError, NonFiniteError
from runtime.fileio import check_writable
from runtime.images import check_grid_format, make_grid, save_picture, save_png, to_uint8
from runtime.sampling.noise import check_save_noise, load_noise, save_noise
from runtime.sampling import DEFAULT_SAMPLER, DEFAULT_SOLVER_STEPS, SAMPLERS, Chain, default_sampler, sample_batches
from runtime.sampling.loop import batch_size_for
from runtime.sampling.schedule import SPACINGS, VARIANCE_TYPES
from runtime.run.shards import claim_local_gpu, merge as merge_shards, parse_shard, run_key
from runtime.run.store import SampleStore

GRID_MAX = 256  # images shown by --grid
PROGRESSIVE_ROWS = 8  # images shown by --progressive


@click.group(cls=DefaultCommandGroup, default_command="run", context_settings=CONTEXT)
@click.version_option(package_name="ddpm-deploy", prog_name="ddpm-run")
def cli() -> None:
    """Sample images: `ddpm-run MODEL [OPTIONS]` (the run command, see `ddpm-run MODEL --help`); `ddpm-run merge
    SHARDS... --out OUT` joins the shards of a run split with --shard."""


@cli.command("run", context_settings=CONTEXT)
@model_argument
@click.option("-n", "--n", "n", type=POSITIVE, default=64, show_default=True,
              help="Number of images (-n under torchrun, whose own parser takes --n for its options).")
@click.option("--steps", default=None, help="Sampling steps: K, ddimK (uniform stride) or section counts like "
              "10,20,30 (ddpm, ddim); K for the solvers. Default: all T steps for ddpm and ddim, "
              f"{DEFAULT_SOLVER_STEPS} for the solvers.")
@click.option("--sampler", type=choice(SAMPLERS), default=None,
              help="Reverse process: ancestral DDPM, DDIM, or a multistep solver for 10-20 steps: dpm++2m and unipc "
              f"(deterministic), sde-dpm++2m (stochastic). Default: {DEFAULT_SAMPLER} (ddpm for a step graph).")
@click.option("--spacing", type=choice(SPACINGS), default=None,
              help="Which K timesteps (diffusers' definitions). Default: linspace for the solvers, the respacing of "
              "--steps for ddpm and ddim.")
@click.option("--eta", type=FINITE, default=None, help="DDIM noise scale (default 0 = deterministic); ddim only.")
@click.option("--variance-type", type=choice(VARIANCE_TYPES), default=None,
              help="DDPM reverse variance. Default: the model's.")
@click.option("--clip/--no-clip", "clip", default=None, help="Clip x_0 to the data range. Default: the model's.")
@seed_option()
@click.option("--batch-size", type=POSITIVE, default=None, help="Images per model call (default: min(n, 64, max)).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("samples.npz"), show_default=True,
              help="npz with arr_0 (uint8 N x H x W x C) and samples (float32 N x C x H x W).")
@click.option("--grid", type=click.Path(path_type=Path), default=None,
              help=f"Also write a grid picture of the first {GRID_MAX} images, in the format its extension names "
              "(.png, .jpg, ...).")
@click.option("--progressive", type=POSITIVE, default=None, help="Also write the predicted x_0 of the first "
              f"{PROGRESSIVE_ROWS} images every K steps (paper Fig. 6) as a PNG grid, <out stem>.progressive.png.")
@backend_options
@click.option("--cuda-graph", is_flag=True, help="Capture a CUDA graph per batch shape (ONNX Runtime CUDA).")
@click.option("--noise", "noise_file", type=click.Path(path_type=Path), default=None,
              help="Read the chain's noise from a [K+1, N, C, H, W] float32 .npy instead of the seed.")
@click.option("--save-noise", "noise_out", type=click.Path(path_type=Path), default=None,
              help="Write the seeded noise this run uses as a [K+1, N, C, H, W] float32 .npy.")
@click.option("--shard", default=None,
              help="R/W: draw only shard R (from 0) of W of the run, whole batches, into <out stem>.shardR-of-W.npz "
              "(merge the W files with `ddpm-run merge`: the arrays of one run, bit for bit); auto: R and W from the "
              "launcher (torchrun, srun, a Slurm job array), one GPU per process on a machine.")
@force_option()
def run(model: Path, n: int, steps: str | None, sampler: str | None, spacing: str | None, eta: float | None,
        variance_type: str | None, clip: bool | None, seed: int, batch_size: int | None, out: Path,
        grid: Path | None, provider: str, precision: str, cuda_graph: bool, threads: int, noise_file: Path | None,
        noise_out: Path | None, force: bool, progressive: int | None, shard: str | None,
        source_options: dict[str, Any]) -> None:
    """Sample --n images from MODEL (.onnx, .plan, .pt, a diffusers folder or hub id) and write them to --out (and --grid).

    Samples go to disk batch by batch (<out>.partial/, one batch in memory); rerunning a killed command resumes it
    with identical results. A run that cannot fit the disk is refused before sampling."""
    if noise_file is not None and noise_out is not None:
        raise DDPMError("--noise and --save-noise exclude each other")
    part = parse_shard(shard) if shard is not None else None
    if part is not None:
        if grid is not None or progressive or noise_out is not None:
            raise DDPMError("--grid, --progressive and --save-noise show the whole run: make them with a single "
                            "ddpm-run, not with --shard")
        out = part.path(out)
        claim_local_gpu(shard, provider, model)
    figure = out.with_name(out.stem + ".progressive.png") if progressive else None
    outputs = [p for p in (out, grid, noise_out, figure) if p is not None]
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise DDPMError("--out, --grid, --save-noise and the --progressive figure must be different files")
    for path in outputs:
        check_writable(path, force)
    require_suffix(out, (".npz",), "--out", "an npz archive (arr_0 and samples)")
    if noise_out is not None:
        require_suffix(noise_out, (".npy",), "--save-noise", "a .npy array")
    backend = open_model(model, provider, precision=precision, cuda_graph=cuda_graph, threads=threads,
                         **source_options)
    chain = Chain.build(backend.info.diffusion, sampler or default_sampler(backend.info.kind), steps, eta,
                        variance_type, clip, spacing)
    shape = backend.info.image_shape
    if grid is not None:
        check_grid_format(grid, min(n, GRID_MAX), shape)
    noise = load_noise(noise_file, n, shape, len(chain)) if noise_file is not None else None
    if noise_out is not None:
        check_save_noise(n, shape)
    size = batch_size_for(n, backend.batch_range, batch_size)
    key = _run_key(model, backend.description, chain, seed, noise_file)
    if part is None:
        indices, store = range(n), SampleStore(out, n, shape, key)
    else:
        indices = part.indices(n, size)
        store = SampleStore(out, len(indices), shape, {**key, "indices": [indices.start, indices.stop]}, indices,
                            run_key(model, chain, seed, n, size, shape, noise_file, part))
    store.lock(force)
    try:
        done = store.resume_point(force)
        batches = sample_batches(backend, chain, indices.stop, seed=seed,
                                 noise=None if noise is None else noise[:, :indices.stop], batch_size=size,
                                 progress=True, first=indices.start + done)
        store.prepare(done)
    except BaseException:
        store.discard_if_new()
        raise
    if done:
        click.echo(f"resuming {store.dir}: {done} of {len(indices)} images were done")
    start = time.perf_counter()
    try:
        for first, batch in batches:
            store.write(first, batch)
    except NonFiniteError as exc:  # deterministic: a rerun would fail at the same step, so keep nothing
        store.discard()
        raise NonFiniteError(f"{exc}; nothing was written") from None
    seconds = max(time.perf_counter() - start, 1e-9)
    if grid is not None:
        save_picture(grid, make_grid(to_uint8(store.head(GRID_MAX), backend.info.data_range)), replace=force)
    store.finish(backend.info.data_range, chunk=size, replace=force)
    if noise_out is not None:
        save_noise(noise_out, seed, n, shape, len(chain), replace=force)
    if figure is not None:
        from runtime.run.progressive import progressive_grid

        save_png(figure, progressive_grid(backend, chain, min(n, PROGRESSIVE_ROWS), seed, progressive, noise),
                 replace=force)
    written = ", ".join(str(p) for p in outputs)
    drawn = len(indices) - done
    held = (f"images {indices.start}..{indices.stop - 1} of {n}" if indices else
            f"none of the {n} images ({-(-n // size)} batches of {size} for {part.world if part else 1} shards)")
    click.echo((f"shard {part}: {held}; " if part else "") +
               f"{drawn} images in {seconds:.2f} s ({drawn / seconds:.2f} images/s), {chain.describe()}, "
               f"{backend.description} -> {written}")


def _run_key(model: Path, backend: str, chain: Chain, seed: int, noise_file: Path | None) -> dict[str, object]:
    """What a partial run must share with the command that resumes it."""
    def ident(path: Path) -> list[object]:
        if not path.exists():  # a hub id: the backend's description names what it resolved to
            return [str(path)]
        st = path.stat()
        return [str(path.resolve()), st.st_size, st.st_mtime_ns]

    return {"model": ident(model), "backend": backend, "chain": chain.describe(),
            "timesteps": chain.schedule.timesteps.tolist(), "seed": seed,
            "noise": ident(noise_file) if noise_file is not None else None}


@cli.command(context_settings=CONTEXT)
@click.argument("shards", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="The merged npz: arr_0 and samples of the whole run.")
@force_option("Overwrite an existing --out.")
def merge(shards: tuple[Path, ...], out: Path, force: bool) -> None:
    """Join the SHARDS of one `ddpm-run --shard` run (all W files, any order, e.g. samples.shard*-of-8.npz) into
    --out: the npz a single ddpm-run of the run writes, the same arrays bit for bit. Refused, with nothing written,
    when shards are missing or given twice, or come from other models, chains, seeds or sizes. The shards are read
    a chunk at a time and kept."""
    require_suffix(out, (".npz",), "--out", "an npz archive (arr_0 and samples)")
    check_writable(out, force)
    start = time.perf_counter()
    merged = merge_shards(list(shards), out, replace=force)
    click.echo(f"{len(merged.files)} shards, {merged.n} images of {merged.key['chain']}, seed {merged.key['seed']} "
               f"-> {out} ({time.perf_counter() - start:.1f} s)")


def main(argv: list[str] | None = None) -> None:
    run_cli(cli, "ddpm-run", argv)


if __name__ == "__main__":  # python -m runtime.run.cli (e.g. from a checkout on PYTHONPATH)
    main()
