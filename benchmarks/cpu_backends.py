"""CPU benchmark: the same checkpoint and chain through eager PyTorch and through ONNX Runtime, in one run.

    python -m benchmarks.cpu_backends CKPT.pt MODEL.onnx --batch 8 --steps 10

Both go through the one sampling loop; the eps calls are timed, so the table shows images/s and the share of wall
time the runtime spends outside the model (noise, update, bookkeeping).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from runtime.backends import open_model
from runtime.cli_common import run_cli
from runtime.errors import DDPMError
from runtime.sampling import Chain, sample


@dataclass(frozen=True)
class Result:
    name: str
    seconds: float
    eps_seconds: float
    images: int
    steps: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def overhead(self) -> float:
        """Share of wall time outside the eps-model calls."""
        return 1.0 - self.eps_seconds / self.seconds


def measure(model_path: Path, batch: int, steps: str, threads: int, repeats: int, seed: int = 0) -> Result:
    """Best of `repeats` sampling runs of `batch` images (after one warm-up model call)."""
    backend = open_model(model_path, threads=threads)
    chain = Chain.build(backend.info.diffusion, "ddpm", steps)
    shape = backend.info.image_shape
    eps_seconds = [0.0]

    def timed_eps(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        eps = backend.eps(x, t)
        eps_seconds[0] += time.perf_counter() - start
        return eps

    backend.eps(np.zeros((batch, *shape), np.float32), np.zeros(batch, np.int64))
    best: Result | None = None
    for _ in range(repeats):
        eps_seconds[0] = 0.0
        start = time.perf_counter()
        sample(timed_eps, chain, batch, image_shape=shape, seed=seed, batch_size=batch)
        result = Result(backend.description, time.perf_counter() - start, eps_seconds[0], batch, len(chain))
        best = result if best is None or result.seconds < best.seconds else best
    assert best is not None
    return best


def table(results: list[Result]) -> str:
    rows = [f"{'backend':<58} {'images/s':>9} {'s/step':>8} {'outside eps':>12}"]
    for r in results:
        rows.append(f"{r.name:<58} {r.images_per_s:>9.3f} {r.seconds / r.steps:>8.3f} {100 * r.overhead:>11.2f}%")
    return "\n".join(rows)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("onnx_model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--batch", type=int, default=8, show_default=True)
@click.option("--steps", default="10", show_default=True, help="DDPM steps (respaced), the same for both.")
@click.option("--threads", type=int, default=0, show_default=True, help="CPU threads for both (0: default).")
@click.option("--repeats", type=int, default=2, show_default=True, help="Report the best of this many runs.")
def benchmark(checkpoint: Path, onnx_model: Path, batch: int, steps: str, threads: int, repeats: int) -> None:
    """Images/s of eager PyTorch vs ONNX Runtime CPU on the same checkpoint and step count."""
    if batch < 1 or repeats < 1:
        raise DDPMError("--batch and --repeats must be >= 1")
    results = [measure(path, batch, steps, threads, repeats) for path in (checkpoint, onnx_model)]
    click.echo(table(results))
    click.echo(f"ONNX Runtime / eager speed-up: {results[1].images_per_s / results[0].images_per_s:.2f}x "
               f"(batch {batch}, {results[0].steps} steps)")


def main(argv: list[str] | None = None) -> None:
    run_cli(benchmark, "python -m benchmarks.cpu_backends", argv)


if __name__ == "__main__":
    main()
