"""`ddpm-serve`: the runtime's sampler behind NVIDIA Triton Inference Server (through PyTriton).

Triton batch rows are images. A request holds one row per image it wants: `seed` and `index` (INT64), and optional
chain options `sampler`, `steps`, `spacing` (BYTES) and `eta` (FP64) that default to the server's options.
Triton's dynamic batcher merges requests up to `--max-batch` rows; the inference function below groups the rows of
a model batch by chain options and runs each group through `runtime.samplers.run_chain` with the noise of
`runtime.noise.SeededNoise` for each (seed, index). Noise is per image and the update is elementwise, so an image
is bit-identical to image `index` of `ddpm-run --seed seed` with the same chain, whatever batch it was merged into.

Errors: Triton itself refuses wrong types or shapes, missing inputs and requests of 0 or more than --max-batch rows,
each on its own. Bad values (negative seed or index, unknown sampler, bad steps or eta) are found here and fail the
whole model batch the request was merged into (a PyTriton model answers one execute call with one error); the
server keeps serving.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import sysconfig
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import click
import numpy as np

from runtime.backends import PROVIDERS, Backend, open_model
from runtime.errors import DDPMError, run_cli
from runtime.noise import SeededNoise
from runtime.samplers import DEFAULT_SAMPLER, SAMPLERS, Chain, default_sampler, run_chain
from runtime.schedule import SPACINGS
from runtime.validation import FINITE

MODEL_NAME = "ddpm"
INPUTS = ("seed", "index", "sampler", "steps", "spacing", "eta")
OUTPUT = "image"
CHAIN_CACHE = 16  # distinct chains kept built


class Options(NamedTuple):
    """A row's chain options, with ddpm-run's meaning (None: the model's or the sampler's default)."""

    sampler: str
    steps: str | None
    spacing: str | None
    eta: float | None


Row = tuple[int, int, Options]  # seed, index, chain options


class RowsNoise:
    """The chain noise of arbitrary (seed, index) images: each row is `SeededNoise(seed, index, 1)`."""

    def __init__(self, rows: list[tuple[int, int]], image_shape: tuple[int, int, int]):
        self.sources = [SeededNoise(seed, index, 1, image_shape) for seed, index in rows]

    def draw(self) -> np.ndarray:
        return np.concatenate([source.draw() for source in self.sources])


class Sampler:
    """The inference function: requests -> grouped rows -> one `run_chain` per chain -> responses."""

    def __init__(self, backend: Backend, sampler: str = DEFAULT_SAMPLER, steps: str | None = None,
                 spacing: str | None = None, eta: float | None = None):
        self.backend = backend
        self.shape = tuple(backend.info.image_shape)
        self.default = Options(sampler, steps, spacing, eta)
        self.chains: OrderedDict[Options, Chain] = OrderedDict()
        self.chain(self.default)  # a bad server default fails at start, not on the first request

    def chain(self, options: Options) -> Chain:
        """The chain for `options`, built once and kept (least recently used dropped)."""
        if options in self.chains:
            self.chains.move_to_end(options)
            return self.chains[options]
        chain = Chain.build(self.backend.info.diffusion, options.sampler, options.steps, options.eta,
                            spacing=options.spacing)
        self.chains[options] = chain
        if len(self.chains) > CHAIN_CACHE:
            self.chains.popitem(last=False)
        return chain

    def rows(self, request: Any) -> list[Row]:
        """(seed, index, options) of each row of one request (name -> array); bad values raise DDPMError. Absent or
        empty options take the server's defaults; the server's --eta applies to ddim rows only."""
        seeds, indices = request["seed"].reshape(-1), request["index"].reshape(-1)
        n = len(seeds)
        sampler = _column(request, "sampler", n, self.default.sampler)
        steps = _column(request, "steps", n, self.default.steps)
        spacing = _column(request, "spacing", n, self.default.spacing)
        eta = request["eta"].reshape(-1) if "eta" in request else [None] * n
        out = []
        for i in range(n):
            seed, index = int(seeds[i]), int(indices[i])
            if seed < 0 or index < 0:
                raise DDPMError(f"seed and index must be >= 0, got seed={seed} index={index}")
            name = (sampler[i] or "").lower()
            row_eta = float(eta[i]) if eta[i] is not None else self.default.eta if name == "ddim" else None
            options = Options(name, steps[i], spacing[i] and spacing[i].lower(), row_eta)
            self.chain(options)  # unknown sampler, bad steps, spacing or eta: refused before anything runs
            out.append((seed, index, options))
        return out

    def run(self, per_request: list[list[Row]]) -> list[np.ndarray]:
        """The images of every request's rows: one `run_chain` per distinct chain over all requests."""
        flat = [row for rows in per_request for row in rows]
        groups: dict[Options, list[int]] = {}
        for i, (_, _, options) in enumerate(flat):
            groups.setdefault(options, []).append(i)
        images = np.empty((len(flat), *self.shape), dtype=np.float32)
        for options, where in groups.items():
            chain = self.chain(options)
            noise = RowsNoise([(flat[i][0], flat[i][1]) for i in where], self.shape)
            images[where] = run_chain(self.backend.stepper(chain), chain, noise)
        starts = np.cumsum([0] + [len(rows) for rows in per_request])
        return [images[a:b] for a, b in zip(starts[:-1], starts[1:])]

    def __call__(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        """PyTriton's inference function: a bad request fails the whole call (PyTriton answers it with one error)."""
        per_request = [self.rows(r) for r in requests]
        return [{OUTPUT: images} for images in self.run(per_request)]


def _column(request: Any, name: str, n: int, default: str | None) -> list[str | None]:
    if name not in request:
        return [default] * n
    values = request[name].reshape(-1)
    try:
        text = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
    except UnicodeDecodeError:
        raise DDPMError(f"{name} must be UTF-8 text") from None
    return [t.strip() or default for t in text]  # an empty value means the server's default


def _import_pytriton() -> Any:
    try:
        import pytriton.triton  # noqa: F401
    except ImportError:
        raise DDPMError("ddpm-serve needs PyTriton: pip install 'ddpm-deploy[serve]'") from None
    return sys.modules["pytriton.triton"]


def _python_libdir_first() -> None:
    """Triton's Python-backend stub links libpython; make it find this interpreter's, not an older system copy."""
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and not current.startswith(libdir):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def _check_port(host: str, port: int, flag: str) -> None:
    """Refuse a busy port up front: Triton would exit and leave PyTriton waiting for it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise DDPMError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another {flag} or --host") \
                from None


def serve(backend: Backend, sampler: Sampler, *, host: str, http_port: int, grpc_port: int, metrics_port: int,
          max_batch: int, queue_delay_us: int, model_name: str = MODEL_NAME, log_verbose: int = 0,
          log_file: Path | None = None) -> None:
    """Start Triton, bind the sampler and block until SIGINT/SIGTERM, then stop Triton and return."""
    triton = _import_pytriton()
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    _python_libdir_first()
    config = triton.TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                                 metrics_address=host, metrics_port=metrics_port, log_verbose=log_verbose,
                                 exit_timeout_secs=5, log_file=log_file)
    # Statistics are read-only counts and timings (also on the metrics port); model loading stays token-protected.
    security = triton.TritonSecurityConfig(restricted_endpoints=["shared-memory", "model-repository", "trace",
                                                                 "logging"])
    inputs = [Tensor(name="seed", dtype=np.int64, shape=(1,)), Tensor(name="index", dtype=np.int64, shape=(1,)),
              Tensor(name="sampler", dtype=np.bytes_, shape=(1,), optional=True),
              Tensor(name="steps", dtype=np.bytes_, shape=(1,), optional=True),
              Tensor(name="spacing", dtype=np.bytes_, shape=(1,), optional=True),
              Tensor(name="eta", dtype=np.float64, shape=(1,), optional=True)]
    outputs = [Tensor(name=OUTPUT, dtype=np.float32, shape=tuple(backend.info.image_shape))]
    model_config = ModelConfig(max_batch_size=max_batch, batcher=DynamicBatcher(
        max_queue_delay_microseconds=queue_delay_us, preferred_batch_size=[max_batch]))

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # Triton.serve() stops the server on it

    for signum in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored (`cmd &` in a script)
        signal.signal(signum, stop)
    with triton.Triton(config=config, security_config=security) as server:
        server.bind(model_name=model_name, infer_func=sampler, inputs=inputs, outputs=outputs, config=model_config,
                    strict=True)
        server.run()
        click.echo(f"serving {model_name!r} ({backend.description}, {sampler.chain(sampler.default).describe()} by "
                   f"default, batches up to {max_batch}) on http://{host}:{http_port} and grpc {host}:{grpc_port}; "
                   f"ready: /v2/models/{model_name}/ready, metrics: http://{host}:{metrics_port}/metrics", err=True)
        server.serve()


def _choice(values: tuple[str, ...]) -> click.Choice:
    return click.Choice(values, case_sensitive=False)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ddpm-deploy", prog_name="ddpm-serve")
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True, help="Prometheus metrics (/metrics).")
@click.option("--max-batch", type=int, default=None, help="Most images per model batch (Triton max_batch_size). "
              "Default: min(64, the model's largest batch).")
@click.option("--queue-delay-us", type=int, default=5000, show_default=True,
              help="How long Triton's dynamic batcher waits to fill a batch.")
@click.option("--provider", type=_choice(PROVIDERS), default="cpu", show_default=True)
@click.option("--precision", type=_choice(("auto", "fp32", "fp16")), default="auto", show_default=True)
@click.option("--threads", type=int, default=0, show_default=True, help="CPU threads (0: library default).")
@click.option("--sampler", type=_choice(SAMPLERS), default=None,
              help=f"Default for requests without a sampler. Default: {DEFAULT_SAMPLER} (ddpm for a step graph).")
@click.option("--steps", default=None, help="Default for requests without steps (as ddpm-run --steps).")
@click.option("--spacing", type=_choice(SPACINGS), default=None,
              help="Default for requests without spacing (as ddpm-run --spacing).")
@click.option("--eta", type=FINITE, default=None, help="Default DDIM eta of ddim requests without eta (0).")
@click.option("--model-name", default=MODEL_NAME, show_default=True, help="Name clients address.")
@click.option("--verbose", is_flag=True, help="Triton's and PyTriton's logs.")
@click.option("--log-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write Triton's log there instead of stdout (PyTriton keeps a copy of stdout logs in memory).")
def cli(model: Path, host: str, http_port: int, grpc_port: int, metrics_port: int, max_batch: int | None,
        queue_delay_us: int, provider: str, precision: str, threads: int, sampler: str | None, steps: str | None,
        spacing: str | None, eta: float | None, model_name: str, verbose: bool, log_file: Path | None) -> None:
    """Serve MODEL (.onnx, .plan or .pt) on Triton; stop with Ctrl-C or SIGTERM."""
    ports = {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port}
    for flag, port in ports.items():
        if not 1 <= port <= 65535:
            raise DDPMError(f"{flag} must lie in 1..65535, got {port}")
    if len(set(ports.values())) != 3:
        raise DDPMError("--http-port, --grpc-port and --metrics-port must differ")
    for flag, port in ports.items():
        _check_port(host, port, flag)
    if queue_delay_us < 0:
        raise DDPMError(f"--queue-delay-us must be >= 0, got {queue_delay_us}")
    if log_file is not None and not log_file.parent.is_dir():
        raise DDPMError(f"--log-file {log_file}: folder {log_file.parent} does not exist; create it first")
    _import_pytriton()  # a missing extra is reported before the model is loaded
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING)
    backend = open_model(model, provider, precision=precision, threads=threads)
    lo, hi = backend.batch_range
    max_batch = max_batch if max_batch is not None else max(lo, min(64, hi))
    if not lo <= max_batch <= hi:
        raise DDPMError(f"--max-batch must lie in {lo}..{hi} for this model, got {max_batch}")
    sampler_fn = Sampler(backend, sampler or default_sampler(backend.info.kind), steps, spacing, eta)
    serve(backend, sampler_fn, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
          max_batch=max_batch, queue_delay_us=queue_delay_us, model_name=model_name,
          log_verbose=1 if verbose else 0, log_file=log_file)


def main(argv: list[str] | None = None) -> None:
    run_cli(cli, "ddpm-serve", argv)


if __name__ == "__main__":
    main()
