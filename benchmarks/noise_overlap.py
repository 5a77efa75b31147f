"""Host noise on or off the critical path: wall time per step with and without the worker-thread prefetch.

    python -m benchmarks.noise_overlap --shape 3,32,32 --batch 64 --device-ms 2.5
    python -m benchmarks.noise_overlap --model export/model.onnx --batch 8      # a real ONNX Runtime CPU step

Without --model, the device step is simulated by a wait of --device-ms (what a host thread does while a GPU runs: it
sleeps in a synchronize, holding no GIL), so the figure isolates what the noise costs the loop. "host ms/step" is
wall time per step minus the device step's own time: the time the loop adds around the model.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from runtime.backends import open_model
from runtime.cli_common import run_cli
from runtime.errors import DDPMError
from runtime.sampling.noise import SeededNoise
from runtime.sampling import Chain, run_chain
from runtime.sampling.schedule import DiffusionConfig


def _shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise DDPMError(f"--shape must be C,H,W like 3,32,32, got {text!r}") from None
    return c, h, w


def _time_chain(eps, chain: Chain, batch: int, shape: tuple[int, int, int], overlap: bool) -> float:
    source = SeededNoise(0, 0, batch, shape)
    start = time.perf_counter()
    run_chain(chain.stepper(eps), chain, source, overlap_noise=overlap)
    return time.perf_counter() - start


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="an exported .onnx: time its real CPU step instead of a simulated device step")
@click.option("--shape", default="3,32,32", show_default=True, help="image shape C,H,W (without --model)")
@click.option("--batch", type=int, default=64, show_default=True, help="images per step")
@click.option("--steps", type=int, default=50, show_default=True, help="DDPM steps (respaced) per timed chain")
@click.option("--device-ms", type=float, default=2.5, show_default=True,
              help="simulated device step in milliseconds (without --model)")
def benchmark(model: Path | None, shape: str, batch: int, steps: int, device_ms: float) -> None:
    """Wall and host milliseconds per step, noise drawn serially vs on a worker thread."""
    if batch < 1 or steps < 1 or device_ms < 0:
        raise DDPMError("--batch and --steps must be >= 1 and --device-ms >= 0")
    if model is not None:
        backend = open_model(model)
        image_shape, diffusion, eps = backend.info.image_shape, backend.info.diffusion, backend.eps
        eps(np.zeros((batch, *image_shape), np.float32), np.zeros(batch, np.int64))  # warm-up
        step_s = min(_timed(lambda: eps(np.zeros((batch, *image_shape), np.float32), np.zeros(batch, np.int64)))
                     for _ in range(3))
        what = f"{backend.description}, batch {batch}"
    else:
        image_shape, diffusion = _shape(shape), DiffusionConfig()
        zeros = np.zeros((batch, *image_shape), np.float32)
        step_s = device_ms / 1000

        def eps(x: np.ndarray, t: np.ndarray) -> np.ndarray:
            time.sleep(step_s)
            return zeros

        what = f"simulated {device_ms:g} ms device step, batch {batch} x {','.join(map(str, image_shape))}"
    draw_s = min(_timed(SeededNoise(0, 0, batch, image_shape).draw) for _ in range(5))
    chain = Chain.build(diffusion, "ddpm", str(steps))
    click.echo(what)
    click.echo(f"noise draw alone: {1000 * draw_s:.2f} ms per step; model step alone: {1000 * step_s:.2f} ms")
    click.echo(f"{'noise':<22} {'wall ms/step':>13} {'host ms/step':>13}")
    for overlap in (False, True):
        wall = min(_time_chain(eps, chain, batch, image_shape, overlap) for _ in range(2)) / len(chain)
        label = "worker thread (overlap)" if overlap else "serial"
        click.echo(f"{label:<22} {1000 * wall:>13.2f} {1000 * (wall - step_s):>13.2f}")


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    run_cli(benchmark, "python -m benchmarks.noise_overlap", argv)


if __name__ == "__main__":
    main()
