"""Load benchmark: `ddpm-serve` under 1, 4 and 16 concurrent clients beside offline `ddpm-run` sampling; and, with
--isolation, whether malformed requests merged into a model batch with good ones fail the good ones.

    python -m benchmarks.serving MODEL [--steps 20] [--images-per-request 4] [--seconds 20] [--max-batch 64]
    python -m benchmarks.serving MODEL --isolation [--rounds 6] [--steps 8] [--max-batch 4]

Offline throughput is `runtime.sampling.loop.sample` (what ddpm-run runs) at `--max-batch` images per model call, in
this process, before the server starts and again after it stopped. Between the two, ddpm-serve runs on free loopback
ports with the same model, chain and max batch, and each client thread sends requests of `--images-per-request` images
back to back for `--seconds`. The isolation run sends, per round, 8 good one-image requests and 4 malformed ones at once
from 12 threads (HTTP and gRPC), and compares every image that comes back with `sample` (ddpm-run's function).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from runtime.backends import open_model
from runtime.cli_common import run_cli
from runtime.errors import DDPMError
from runtime.sampling import Chain, default_sampler, sample


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


def _rows(seeds: list[int], indices: list[int], **text: str) -> dict[str, np.ndarray]:
    arrays = {"seed": np.array(seeds, np.int64).reshape(-1, 1), "index": np.array(indices, np.int64).reshape(-1, 1)}
    return {**arrays, **{k: np.full((len(seeds), 1), v.encode(), dtype=object) for k, v in text.items()}}


# The malformed requests of the isolation run, each refused by the request handling (not by Triton's own checks).
MALFORMED = {
    "negative seed": _rows([-3], [0]),
    "negative index": _rows([1], [-1]),
    "unknown sampler": _rows([1], [0], sampler="euler"),
    "steps 'abc'": _rows([1], [0], steps="abc"),
    "two rows, one bad": _rows([1, 1], [0, -2]),
}
LEAK = re.compile(r"Traceback|File \"|\.py\b|(^|[\s'\"(])/[\w.-]+/")  # a traceback or a server path


@dataclass
class Mixed:
    """What came back from an isolation run."""

    images: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (seed, index) -> image of a good one
    good_failed: list[str] = field(default_factory=list)  # the error of each good request that failed
    bad_accepted: list[str] = field(default_factory=list)  # each malformed request that was answered
    refusals: list[tuple[str, str, str]] = field(default_factory=list)  # (what, status, message) per refused one

    @property
    def leaks(self) -> list[str]:
        """Refusal messages that show a traceback or a server path."""
        return [message for _, _, message in self.refusals if LEAK.search(message)]

    def summary(self) -> str:
        good = len(self.images) + len(self.good_failed)
        bad = len(self.refusals) + len(self.bad_accepted)
        statuses = sorted({status for _, status, _ in self.refusals})
        return (f"good requests answered: {len(self.images)} of {good}; malformed refused: {len(self.refusals)} of "
                f"{bad} (status {', '.join(statuses) or '-'}); refusals showing a traceback or path: "
                f"{len(self.leaks)}")


def mixed_load(http: str, grpc: str, rounds: int, seed: int = 5, good: int = 8, bad: int = 4) -> Mixed:
    """`rounds` rounds of `good` one-image requests (seed `seed`, distinct indices) and `bad` malformed ones, sent at
    once from one thread each, alternately over HTTP (url `http`) and gRPC (url `grpc`)."""
    from tritonclient.utils import InferenceServerException

    from runtime.serving.client import ImageClient

    result, lock = Mixed(), threading.Lock()
    kinds = list(MALFORMED)

    def send(job: tuple[int, str | None, int], start: threading.Barrier) -> None:
        k, what, index = job
        client = ImageClient(grpc, "grpc") if k % 2 else ImageClient(http)
        arrays = MALFORMED[what] if what else _rows([seed], [index])
        try:
            start.wait()
            image = client.infer(arrays)
        except DDPMError as exc:
            cause = exc.__cause__
            message = cause.message() if isinstance(cause, InferenceServerException) else str(exc)
            status = str(cause.status()) if isinstance(cause, InferenceServerException) else "client"
            with lock:
                if what:
                    result.refusals.append((what, status, message))
                else:
                    result.good_failed.append(f"{status}: {message}")
        else:
            with lock:
                if what:
                    result.bad_accepted.append(what)
                else:
                    result.images[(seed, index)] = image[0]
        finally:
            client.close()

    for r in range(rounds):
        jobs = [(k, None, r * good + k) for k in range(good)]
        jobs += [(good + k, kinds[(r * bad + k) % len(kinds)], -1) for k in range(bad)]
        start = threading.Barrier(len(jobs))
        threads = [threading.Thread(target=send, args=(job, start)) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return result


def start_server(model: Path, *options: str, log: Path | None = None) -> tuple[subprocess.Popen, dict[str, int]]:
    """ddpm-serve MODEL on free loopback ports, ready; its ports by protocol ("http", "grpc", "metrics")."""
    from runtime.serving.client import ImageClient

    ports = dict(zip(("http", "grpc", "metrics"), free_ports(3)))
    cmd = [sys.executable, "-m", "runtime.serving.cli", str(model), *options,
           *(a for name, port in ports.items() for a in (f"--{name}-port", str(port)))]
    out = open(log, "w") if log else subprocess.DEVNULL
    server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    probe = ImageClient(f"127.0.0.1:{ports['http']}")
    deadline = time.monotonic() + 180
    while not probe.ready():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise DDPMError(f"ddpm-serve did not start; run it by hand: {' '.join(cmd)}")
        time.sleep(0.5)
    return server, ports


def isolation_run(model: Path, steps: str, max_batch: int, queue_delay_us: int, threads: int, rounds: int) -> None:
    """Print what the isolation run got back, and whether every image equals `sample`'s."""
    server, ports = start_server(model, "--steps", steps, "--max-batch", str(max_batch), "--queue-delay-us",
                                 str(queue_delay_us), "--threads", str(threads))
    try:
        result = mixed_load(f"127.0.0.1:{ports['http']}", f"127.0.0.1:{ports['grpc']}", rounds)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    backend = open_model(model, threads=threads)
    chain = Chain.build(backend.info.diffusion, default_sampler(backend.info.kind), steps)
    if result.images:
        want = sample(backend, chain, max(i for _, i in result.images) + 1, seed=5)
        same = sum(np.array_equal(image, want[i]) for (_, i), image in result.images.items())
    else:
        same = 0
    click.echo(f"model {model}, {chain.describe()}, max batch {max_batch}, {rounds} rounds of 8 good and 4 malformed "
               "requests at once")
    click.echo(f"{result.summary()}; answered images equal to ddpm-run's: {same} of {len(result.images)}")
    for message in result.good_failed[:1] + result.leaks[:1]:
        click.echo(f"for example: {message[:300]!r}")


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
@click.option("--isolation", is_flag=True, help="Send good and malformed requests at once instead (see above).")
@click.option("--rounds", type=int, default=6, show_default=True, help="Rounds of the isolation run.")
def cli(model: Path, steps: str, images_per_request: int, clients: str, seconds: float, max_batch: int,
        queue_delay_us: int, offline_images: int, threads: int, protocol: str, isolation: bool, rounds: int) -> None:
    """Print requests/s and images/s of ddpm-serve at each concurrency, and offline images/s, for MODEL."""
    from runtime.serving.client import ImageClient

    if isolation:
        return isolation_run(model, steps, max_batch, queue_delay_us, threads, rounds)
    levels = [int(c) for c in clients.split(",")]
    if images_per_request < 1 or images_per_request > max_batch or min(levels) < 1:
        raise DDPMError("need 1 <= --images-per-request <= --max-batch and client counts >= 1")
    before = offline(model, steps, max_batch, offline_images, threads)
    server, ports = start_server(model, "--sampler", "ddpm", "--steps", steps, "--max-batch", str(max_batch),
                                 "--queue-delay-us", str(queue_delay_us), "--threads", str(threads))
    url = f"127.0.0.1:{ports[protocol]}"
    try:
        probe = ImageClient(url, protocol)
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
