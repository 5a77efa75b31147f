"""`ddpm-eval sweep`: what sample quality each sampler buys per model call, measured on one model.

A cell is (sampler, steps): N images sampled with a seed, scored by the MNIST digit classifier of `evaluation/digit_quality.py`
(Frechet distance in its hidden features against the 5,000 real digits, and the share labelled confidently). Each
seed of each cell is saved to `sweep.json` as soon as it is done, so a long sweep that is stopped resumes where it
stopped. The noise floor is the same score for N real digits (drawn per seed from the 5,000); the spread is the
largest minus the smallest score over the seeds of a cell. ddpm and ddim cells use ddpm-run's respacing of --steps
K; the solvers use --spacing.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from runtime.cli_common import backend_options, force_option, model_argument
from runtime.errors import DDPMError
from runtime.fileio import atomic_write_bytes
from runtime.images import to_uint8
from runtime.sampling.schedule import SPACINGS
from runtime.sampling import SOLVERS

SWEEP_SAMPLERS = ("ddpm", "ddim") + SOLVERS
DEFAULT_STEPS = "10,20,50,100,250,1000"
CONTEXT = {"help_option_names": ["-h", "--help"]}


def parse_cells(cells: tuple[str, ...], samplers: str, steps: str) -> list[tuple[str, int]]:
    """--cell SAMPLER:STEPS (repeatable, run in the order given), else every sampler at every step count."""
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise DDPMError(f"bad step count {text!r}; give whole numbers like 10,20,50") from None
        if value < 1:
            raise DDPMError(f"step counts must be >= 1, got {value}")
        return value

    def sampler(name: str) -> str:
        if name not in SWEEP_SAMPLERS:
            raise DDPMError(f"unknown sampler {name!r}; use one of {', '.join(SWEEP_SAMPLERS)}")
        return name

    if cells:
        pairs = []
        for spec in cells:
            if spec.count(":") != 1:
                raise DDPMError(f"bad {{opt:cells}} {spec!r}; write SAMPLER:STEPS, e.g. sde-dpm++2m:10")
            name, k = spec.split(":")
            pairs.append((sampler(name.strip()), count(k)))
        return list(dict.fromkeys(pairs))
    return [(sampler(s.strip()), count(k)) for s in samplers.split(",") for k in steps.split(",")]


def parse_seeds(seeds: str) -> list[int]:
    try:
        values = [int(s) for s in seeds.split(",")]
    except ValueError:
        raise DDPMError(f"bad {{opt:seeds}} {seeds!r}; give seeds like 0,1") from None
    if any(s < 0 for s in values) or len(set(values)) != len(values):
        raise DDPMError(f"{{opt:seeds}} must be distinct numbers >= 0, got {seeds}")
    return values


def score(images_uint8_nhwc: np.ndarray) -> dict[str, float]:
    """Frechet distance to the real digits in the classifier's features, and the confidently labelled share."""
    from evaluation.digit_quality import DigitQuality, digit_frechet  # the eval extra (scikit-learn, mlxtend)

    return {"fd": digit_frechet(images_uint8_nhwc), "confident": DigitQuality.of(images_uint8_nhwc).confident_fraction}


def real_digits(n: int, seed: int) -> np.ndarray:
    """n of the 5,000 real MNIST digits, drawn without replacement by `seed`: N x 28 x 28 x 1 uint8."""
    from train.data import mnist_arrays

    digits, _ = mnist_arrays()
    if n > len(digits):
        raise DDPMError(f"{{opt:n}} {n} exceeds the {len(digits)} real digits the noise floor is drawn from")
    return digits[np.random.default_rng(seed).choice(len(digits), n, replace=False)][..., None]


class Results:
    """sweep.json: the settings and every finished (sampler, steps, seed) and floor entry, rewritten after each."""

    def __init__(self, path: Path, settings: dict[str, Any], force: bool):
        self.path, self.data = path, {"settings": settings, "cells": [], "floor": []}
        if path.exists() and not force:
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError):
                raise DDPMError(f"{path} is not a sweep record; pass {{opt:force}} to start over") from None
            if old.get("settings") != settings:
                raise DDPMError(f"{path} holds a sweep with other settings ({old.get('settings')}); pass {{opt:force}} "
                                "to start over or choose another {opt:out_dir}")
            self.data = old

    def find(self, kind: str, **key: Any) -> dict[str, Any] | None:
        return next((r for r in self.data[kind] if all(r[k] == v for k, v in key.items())), None)

    def add(self, kind: str, record: dict[str, Any]) -> None:
        self.data[kind].append(record)
        atomic_write_bytes(self.path, (json.dumps(self.data, indent=1) + "\n").encode())


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per cell (FD of the first seed, the spread over seeds, confident share, time), then the
    noise floor."""
    seeds = results["settings"]["seeds"]
    lines = ["| sampler | steps (model calls) | FD | FD spread over seeds | confident | seconds |",
             "|---|---|---|---|---|---|"]

    def row(name: str, calls: str, records: list[dict[str, Any]]) -> str:
        fds = [r["fd"] for r in records]
        spread = f"{max(fds) - min(fds):.1f} ({len(fds)} seeds)" if len(fds) > 1 else "-"
        seconds = f"{records[0]['seconds']:.0f}" if "seconds" in records[0] else "-"
        return f"| {name} | {calls} | {fds[0]:.1f} | {spread} | {records[0]['confident']:.3f} | {seconds} |"

    for sampler, steps in dict.fromkeys((r["sampler"], r["steps"]) for r in results["cells"]):
        records = [r for s in seeds for r in results["cells"]
                   if (r["sampler"], r["steps"], r["seed"]) == (sampler, steps, s)]
        lines.append(row(sampler, str(steps), records))
    if results["floor"]:
        lines.append(row("real digits (noise floor)", "-", results["floor"]))
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Quality (FD, lower is better) against model calls on a log axis, one line per sampler, the real-data noise
    floor dashed (matplotlib, the eval extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        raise DDPMError("the sweep plot needs matplotlib: pip install 'ddpm-deploy[eval]'") from None
    cells = results["cells"]
    first = results["settings"]["seeds"][0]
    points = {s: sorted((r["steps"], r["fd"]) for r in cells if r["sampler"] == s and r["seed"] == first)
              for s in SWEEP_SAMPLERS}
    points = {s: p for s, p in points.items() if p}
    if not points:
        raise DDPMError("no finished cells to plot")
    figure, axes = pyplot.subplots(figsize=(7.6, 4.8), dpi=100)
    for sampler, p in points.items():
        axes.plot(*zip(*p), marker="o", label=sampler)
    if results["floor"]:
        axes.axhline(results["floor"][0]["fd"], color="gray", linestyle="--", label="real digits (noise floor)")
    axes.set_xscale("log")
    axes.set_xlabel("model calls (log scale)")
    axes.set_ylabel("FD (digit classifier features)")
    axes.set_ylim(bottom=0)
    axes.legend(loc="upper right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


@click.command(context_settings=CONTEXT)
@model_argument
@click.option("--ref", type=click.Choice(["mnist"]), required=True,
              help="Reference data and scorer: mnist (the digit classifier of evaluation/digit_quality.py).")
@click.option("--cell", "cells", multiple=True, help="SAMPLER:STEPS to run, repeatable, in this order (default: "
              "every --samplers at every --steps).")
@click.option("--samplers", default=",".join(SWEEP_SAMPLERS), show_default=True)
@click.option("--steps", default=DEFAULT_STEPS, show_default=True, help="Step counts (= model calls per image).")
@click.option("--n", "n", type=int, default=512, show_default=True, help="Images per cell and seed.")
@click.option("--seeds", default="0,1", show_default=True, help="Seeds; the spread between them is reported.")
@click.option("--spread-max-calls", type=int, default=100, show_default=True,
              help="Run the seeds after the first only for cells of at most this many calls (saves time).")
@click.option("--spacing", type=click.Choice(SPACINGS), default="linspace", show_default=True,
              help="Timestep spacing of the solvers.")
@click.option("--batch-size", type=int, default=None, help="Images per model call (default: min(n, 64, max)).")
@backend_options
@click.option("--out-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("sweep"),
              show_default=True, help="Writes sweep.json (resumable record), sweep.md (table), sweep.png (plot).")
@force_option("Start over even if --out-dir holds a sweep.")
def sweep(model: Path, ref: str, cells: tuple[str, ...], samplers: str, steps: str, n: int, seeds: str,
          spread_max_calls: int, spacing: str, batch_size: int | None, provider: str, precision: str, threads: int,
          out_dir: Path, force: bool, source_options: dict[str, Any]) -> None:
    """Sample N images per (sampler, steps) cell from MODEL and score them against real digits: a table of
    quality per model call, and a plot of it. Finished cells are kept in --out-dir; rerunning resumes."""
    from runtime.backends import open_model
    from runtime.sampling import Chain, sample

    grid, seed_list = parse_cells(cells, samplers, steps), parse_seeds(seeds)
    if n < 2:
        raise DDPMError(f"{{opt:n}} must be >= 2 for a Frechet distance, got {n}")
    backend = open_model(model, provider, precision=precision, threads=threads, **source_options)
    if batch_size is not None and not 1 <= batch_size <= backend.batch_range[1]:
        raise DDPMError(f"{{opt:batch_size}} must lie in 1..{backend.batch_range[1]} for this model, got {batch_size}")
    chains = {(s, k): Chain.build(backend.info.diffusion, s, str(k), spacing=spacing if s in SOLVERS else None)
              for s, k in grid}  # every cell is checked before the first is sampled
    settings = {"model": str(model.resolve()), "ref": ref, "n": n, "seeds": seed_list, "spacing": spacing,
                "backend": backend.description}
    results = Results(out_dir / "sweep.json", settings, force)
    out_dir.mkdir(parents=True, exist_ok=True)  # once everything is known good: a refused sweep leaves nothing
    for seed in seed_list:
        if results.find("floor", seed=seed) is None:
            results.add("floor", {"seed": seed, **score(real_digits(n, seed))})
    for (sampler, k), chain in chains.items():
        for seed in seed_list if k <= spread_max_calls else seed_list[:1]:
            if results.find("cells", sampler=sampler, steps=k, seed=seed) is not None:
                continue
            click.echo(f"{chain.describe()}, seed {seed}, {n} images", err=True)
            start = time.perf_counter()
            samples = sample(backend, chain, n, seed=seed, batch_size=batch_size, progress=True)
            seconds = time.perf_counter() - start
            record = {"sampler": sampler, "steps": k, "seed": seed, "calls": k, "seconds": round(seconds, 1),
                      **score(to_uint8(samples, backend.info.data_range))}
            results.add("cells", record)
            click.echo(f"  FD {record['fd']:.2f}, confident {record['confident']:.3f}, {seconds:.0f} s", err=True)
    text = table(results.data)
    atomic_write_bytes(out_dir / "sweep.md", (text + "\n").encode())
    plot(results.data, out_dir / "sweep.png")
    click.echo(text)
    click.echo(f"-> {out_dir / 'sweep.json'}, {out_dir / 'sweep.md'}, {out_dir / 'sweep.png'}")
