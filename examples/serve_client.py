"""Ask a running `ddpm-serve` (or the `ddpm` model of a `ddpm-export triton-repo` repository) for images over HTTP
or gRPC and write them as a PNG grid.

    python examples/serve_client.py --url 127.0.0.1:8001 --protocol grpc --seed 0 --n 16 --grid served.png
    python examples/serve_client.py --url 127.0.0.1:8000 --sampler ddim --steps 50 --n 64 --grid ddim.png

Image i of seed s is bit-identical to image i of `ddpm-run --seed s` with the same chain options. Requests of at
most the server's max batch go out from `--concurrency` threads (one tritonclient client each), so Triton can
batch them together.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np

from runtime.cli_common import run_cli
from runtime.errors import DDPMError
from runtime.fileio import atomic_write, check_writable
from runtime.images import make_grid, save_png, to_uint8
from runtime.serving.client import ImageClient


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", default="127.0.0.1:8000", show_default=True, help="host:port of ddpm-serve's HTTP or gRPC.")
@click.option("--protocol", type=click.Choice(("http", "grpc")), default="http", show_default=True)
@click.option("--model-name", default="ddpm", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--start", type=int, default=0, show_default=True, help="First image index.")
@click.option("--n", "n", type=int, default=16, show_default=True)
@click.option("--sampler", default=None, help="Default: the server's.")
@click.option("--steps", default=None, help="Default: the server's.")
@click.option("--spacing", default=None, help="Default: the server's.")
@click.option("--eta", type=float, default=None, help="DDIM eta. Default: the server's.")
@click.option("--per-request", type=int, default=None, help="Images per request (default: the server's max batch).")
@click.option("--concurrency", type=int, default=4, show_default=True)
@click.option("--grid", type=click.Path(path_type=Path), default=Path("served.png"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the float32 images (npz).")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def cli(url: str, protocol: str, model_name: str, seed: int, start: int, n: int, sampler: str | None,
        steps: str | None, spacing: str | None, eta: float | None, per_request: int | None, concurrency: int,
        grid: Path, out: Path | None, force: bool) -> None:
    """Request images START..START+N-1 of SEED and write a grid."""
    if n < 1 or start < 0 or seed < 0 or concurrency < 1:
        raise DDPMError("need --n >= 1, --start >= 0, --seed >= 0 and --concurrency >= 1")
    for path in (grid, out):
        if path is not None:
            check_writable(path, force)
    probe = ImageClient(url, protocol, model_name)
    if not probe.ready():
        raise DDPMError(f"no ready model {model_name!r} at {url} ({protocol}); start it with `ddpm-serve MODEL`")
    size = per_request or probe.max_batch
    chunks = [list(range(i, min(i + size, start + n))) for i in range(start, start + n, size)]
    options = {"sampler": sampler, "steps": steps, "spacing": spacing, "eta": eta}

    def fetch(indices: list[int]) -> np.ndarray:
        client = ImageClient(url, protocol, model_name)
        try:
            return client.request([seed] * len(indices), indices, **options)
        finally:
            client.close()

    with ThreadPoolExecutor(concurrency) as pool:
        images = np.concatenate(list(pool.map(fetch, chunks)))
    save_png(grid, make_grid(to_uint8(images)))
    if out is not None:
        atomic_write(out, lambda f: np.savez(f, samples=images, indices=np.arange(start, start + n)))
    click.echo(f"{n} images of seed {seed} from {url} ({protocol}) -> {grid}" + (f", {out}" if out else ""))


if __name__ == "__main__":
    run_cli(cli, "serve_client.py")
