"""`ddpm-serve`: serve a model on Triton (as PyTriton ships it) with `ddpm-run`'s chains, per (seed, index) image."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import click

from runtime.cli_common import CONTEXT, FINITE, POSITIVE, backend_options, choice, model_argument, run_cli
from runtime.errors import DDPMError
from runtime.sampling import DEFAULT_SAMPLER, SAMPLERS
from runtime.sampling.schedule import SPACINGS
from runtime.serving.sampler import DEFAULT_MAX_CALLS
from runtime.serving.schema import MODEL_NAME
from runtime.serving.server import check_port, import_pytriton, model_config, serve


@click.command(context_settings=CONTEXT)
@click.version_option(package_name="ddpm-deploy", prog_name="ddpm-serve")
@model_argument
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True, help="Prometheus metrics (/metrics).")
@click.option("--max-batch", type=int, default=None, help="Most images per model batch (Triton max_batch_size). "
              "Default: min(64, the model's largest batch).")
@click.option("--queue-delay-us", type=int, default=5000, show_default=True,
              help="How long Triton's dynamic batcher waits to fill a batch.")
@backend_options
@click.option("--sampler", type=choice(SAMPLERS), default=None,
              help=f"Default for requests without a sampler. Default: {DEFAULT_SAMPLER} (ddpm for a step graph).")
@click.option("--steps", default=None, help="Default for requests without steps (as ddpm-run --steps).")
@click.option("--spacing", type=choice(SPACINGS), default=None,
              help="Default for requests without spacing (as ddpm-run --spacing).")
@click.option("--eta", type=FINITE, default=None, help="Default DDIM eta of ddim requests without eta (0).")
@click.option("--max-model-calls", type=POSITIVE, default=None,
              help="Most model calls per image a request's chain may take (its steps); longer ones are refused. "
              f"Default: {DEFAULT_MAX_CALLS}, or the default chain's when longer.")
@click.option("--model-name", default=MODEL_NAME, show_default=True, help="Name clients address.")
@click.option("--verbose", is_flag=True, help="Triton's and PyTriton's logs.")
@click.option("--log-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write Triton's log there instead of stdout (PyTriton keeps a copy of stdout logs in memory).")
def cli(model: Path, host: str, http_port: int, grpc_port: int, metrics_port: int, max_batch: int | None,
        queue_delay_us: int, provider: str, precision: str, threads: int, sampler: str | None, steps: str | None,
        spacing: str | None, eta: float | None, max_model_calls: int | None, model_name: str, verbose: bool,
        log_file: Path | None, source_options: dict[str, Any]) -> None:
    """Serve MODEL (.onnx, .plan or .pt) on Triton; stop with Ctrl-C or SIGTERM."""
    ports = {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port}
    for flag, port in ports.items():
        if not 1 <= port <= 65535:
            raise DDPMError(f"{flag} must lie in 1..65535, got {port}")
    if len(set(ports.values())) != 3:
        raise DDPMError("--http-port, --grpc-port and --metrics-port must differ")
    for flag, port in ports.items():
        check_port(host, port, flag)
    if queue_delay_us < 0:
        raise DDPMError(f"--queue-delay-us must be >= 0, got {queue_delay_us}")
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", model_name):
        raise DDPMError(f"--model-name {model_name!r}: use letters, digits, '.', '_' and '-' (not first '.')")
    if log_file is not None and not log_file.parent.is_dir():
        raise DDPMError(f"--log-file {log_file}: folder {log_file.parent} does not exist; create it first")
    import_pytriton()  # a missing extra is reported before the model is loaded
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING)
    config, summary = model_config(
        model, source_options, provider=provider, precision=precision, threads=threads, sampler=sampler,
        steps=steps, spacing=spacing, eta=eta, max_model_calls=max_model_calls, max_batch=max_batch,
        queue_delay_us=queue_delay_us, model_name=model_name)
    serve(config, summary, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
          log_verbose=1 if verbose else 0, log_file=log_file)


def main(argv: list[str] | None = None) -> None:
    run_cli(cli, "ddpm-serve", argv)


if __name__ == "__main__":
    main()
