"""Load benchmark: `ddpm-serve` under 1, 4 and 16 concurrent clients beside offline `ddpm-run` sampling.

    python -m benchmarks.serving MODEL [--steps 20] [--images-per-request 4] [--seconds 20] [--max-batch 64]

Offline throughput is `runtime.sampling.loop.sample` (what ddpm-run runs) at `--max-batch` images per model call, in this
process, before the server starts and again after it stopped. Between the two, ddpm-serve runs on free loopback ports
with the same model, chain and max batch, and each client thread sends requests of `--images-per-request` images back
to back for `--seconds`.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np

from runtime.backends import open_model
from runtime.cli_common import run_cli
from runtime.errors import DDPMError
from runtime.sampling import Chain, sample


def free_ports(k: int) -> list[int]:
    """k loopback ports that were free a moment ago (for the server this benchmark and the tests start)."""
    socks = [socket.socket() for _ in range(k)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def offline(model: Path, steps: str | None, max_batch: int, images: int, threads: int) -> float:
    """Images/s of `sample` (ddpm-run's loop) on `images` images in batches of `max_batch` (after one warm-up)."""
    backend = open_model(model, threads=threads)
    chain = Chain.build(backend.info.diffusion, "ddpm", steps)
    sample(backend, chain, min(images, max_batch), seed=1, batch_size=max_batch)
    start = time.perf_counter()
    sample(backend, chain, images, seed=0, batch_size=max_batch)
    return images / (time.perf_counter() - start)


def load(url: str, protocol: str, clients: int, per_request: int, seconds: float) -> dict[str, float]:
    """`clients` threads, each its own client, sending requests back to back for `seconds`."""
    from runtime.serving.client import ImageClient

    latencies: list[float] = []
    lock, errors = threading.Lock(), []
    stop_at = time.perf_counter() + seconds

    def worker(seed: int) -> None:
        client = ImageClient(url, protocol)
        index = 0
        try:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                client.request([seed] * per_request, list(range(index, index + per_request)))
                with lock:
                    latencies.append(time.perf_counter() - t0)
                index += per_request
        except Exception as exc:  # reported after the run
            errors.append(exc)
        finally:
            client.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise DDPMError(f"{len(errors)} client(s) failed: {errors[0]}")
    lat = np.array(latencies)
    return {"requests/s": len(lat) / wall, "images/s": len(lat) * per_request / wall,
            "p50 ms": float(np.percentile(lat, 50)) * 1e3, "p95 ms": float(np.percentile(lat, 95)) * 1e3}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--steps", default="20", show_default=True, help="Chain length (as ddpm-run --steps).")
@click.option("--images-per-request", type=int, default=4, show_default=True)
@click.option("--clients", default="1,4,16", show_default=True, help="Concurrency levels.")
@click.option("--seconds", type=float, default=20.0, show_default=True, help="Load time per level.")
@click.option("--max-batch", type=int, default=64, show_default=True, help="Server max batch = offline batch.")
@click.option("--queue-delay-us", type=int, default=20000, show_default=True)
@click.option("--offline-images", type=int, default=256, show_default=True)
@click.option("--threads", type=int, default=0, show_default=True, help="CPU threads of both (0: default).")
@click.option("--protocol", type=click.Choice(("http", "grpc")), default="grpc", show_default=True)
def cli(model: Path, steps: str, images_per_request: int, clients: str, seconds: float, max_batch: int,
        queue_delay_us: int, offline_images: int, threads: int, protocol: str) -> None:
    """Print requests/s and images/s of ddpm-serve at each concurrency, and offline images/s, for MODEL."""
    from runtime.serving.client import ImageClient

    levels = [int(c) for c in clients.split(",")]
    if images_per_request < 1 or images_per_request > max_batch or min(levels) < 1:
        raise DDPMError("need 1 <= --images-per-request <= --max-batch and client counts >= 1")
    before = offline(model, steps, max_batch, offline_images, threads)
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "runtime.serving.cli", str(model), "--steps", steps, "--max-batch", str(max_batch),
           "--queue-delay-us", str(queue_delay_us), "--threads", str(threads), "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"127.0.0.1:{grpc if protocol == 'grpc' else http}"
    try:
        probe = ImageClient(url, protocol)
        deadline = time.monotonic() + 180
        while not probe.ready():
            if server.poll() is not None or time.monotonic() > deadline:
                raise DDPMError(f"ddpm-serve did not start; run it by hand: {' '.join(cmd)}")
            time.sleep(0.5)
        probe.request([0] * images_per_request, list(range(images_per_request)))  # warm-up
        rows = [(c, load(url, protocol, c, images_per_request, seconds)) for c in levels]
        sizes = probe.batch_sizes()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    after = offline(model, steps, max_batch, offline_images, threads)  # the machine's load may have changed
    base = (before + after) / 2
    click.echo(f"model {model}, ddpm {steps} steps, {images_per_request} images/request, max batch {max_batch}, "
               f"{protocol}, {seconds:g} s per level")
    click.echo(f"offline (sample(), batch {max_batch}): {before:.1f} images/s before the server ran, {after:.1f} "
               f"after; 'vs offline' compares with their mean {base:.1f}")
    click.echo("| clients | requests/s | images/s | vs offline | p50 latency | p95 latency |")
    click.echo("|---|---|---|---|---|---|")
    for c, r in rows:
        click.echo(f"| {c} | {r['requests/s']:.2f} | {r['images/s']:.1f} | {100 * r['images/s'] / base:.0f} % | "
                   f"{r['p50 ms']:.0f} ms | {r['p95 ms']:.0f} ms |")
    common = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    click.echo("most frequent model batch sizes (size: count): " + ", ".join(f"{s}: {n}" for s, n in common))


def main(argv: list[str] | None = None) -> None:
    run_cli(cli, "serve_bench", argv)


if __name__ == "__main__":
    main()
