"""`ddpm-serve`'s server: NVIDIA Triton Inference Server, as PyTriton ships it, on a one-model repository of our own.

The model is `runtime.serving.triton_model` (the sampling model of `ddpm-export triton-repo`) with parameters that name
the model file: Triton's Python-backend process opens it and samples like ddpm-run. Triton's dynamic batcher merges
requests up to max_batch rows into one call; the model checks each request on its own, answers a bad one alone with
one line (HTTP 400, gRPC INVALID_ARGUMENT) and samples the others together. Triton itself refuses wrong types or
shapes, missing inputs and requests of 0 or more than max_batch rows.

PyTriton runs that tritonserver (its binaries, environment and lifecycle). Its inference-function proxy is not used:
it answers a whole merged batch with one error, a traceback with server paths, when any request in it is bad.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from runtime.backends import open_model
from runtime.errors import DDPMError
from runtime.sampling import default_sampler
from runtime.serving.sampler import Sampler
from runtime.serving.triton_repo import MODEL_PY, RUNTIME, pbtxt, sampler_config


def import_pytriton() -> Any:
    try:
        import pytriton.triton  # noqa: F401
    except ImportError:
        raise DDPMError("ddpm-serve needs PyTriton: pip install 'ddpm-deploy[serve]'") from None
    return sys.modules["pytriton.triton"]


def _environment_for_triton() -> None:
    """What Triton's Python-backend process inherits: this interpreter's libpython first (not an older system copy),
    and this runtime (and train, for PyTorch sources) importable from where this process imports them."""
    for name, entry in (("LD_LIBRARY_PATH", sysconfig.get_config_var("LIBDIR")), ("PYTHONPATH", str(RUNTIME.parent))):
        current = os.environ.get(name, "")
        if entry and entry not in current.split(os.pathsep):
            os.environ[name] = f"{entry}{os.pathsep}{current}" if current else entry


def check_port(host: str, port: int, flag: str) -> None:
    """Refuse a busy port up front: Triton would exit and leave PyTriton waiting for it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise DDPMError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another {flag} or host") \
                from None


def model_config(model: Path, source_options: dict[str, Any], *, provider: str, precision: str, threads: int,
                 sampler: str | None, steps: str | None, spacing: str | None, eta: float | None,
                 max_model_calls: int | None, max_batch: int | None, queue_delay_us: int,
                 model_name: str) -> tuple[dict[str, Any], str]:
    """Open and check the model and the default chain (`sampler` None: the model kind's) here, so that a mistake is
    one line before Triton starts; return the served model's config.pbtxt fields and a one-line summary. The model
    is opened again in Triton's model process (another working folder: files are named by absolute paths); this copy
    is released on return."""
    source_options = {k: str(Path(v).resolve()) if os.path.isfile(v) else v for k, v in source_options.items()}
    backend = open_model(model, provider, precision=precision, threads=threads, **source_options)
    lo, hi = backend.batch_range
    max_batch = max_batch if max_batch is not None else max(lo, min(64, hi))
    if not lo <= max_batch <= hi:
        raise DDPMError(f"{{opt:max_batch}} must lie in {lo}..{hi} for this model, got {max_batch}")
    sampler = sampler or default_sampler(backend.info.kind)
    checked = Sampler(backend, sampler, steps, spacing, eta, max_model_calls)
    default = checked.default
    source = {"source": str(model.resolve()) if model.exists() else str(model),  # a file, a folder or a hub id
              "provider": provider, "precision": precision, "threads": str(threads),
              "source_options": json.dumps(source_options)}
    config = sampler_config(backend.info, max_batch, 1, queue_delay_us, default.sampler, default.steps,
                            default.spacing, default.eta, checked.max_model_calls, extra=source)
    config["name"] = model_name
    summary = (f"{model_name!r} ({backend.description}, {checked.chain(default).describe()} by default, batches up "
               f"to {max_batch}, at most {checked.max_model_calls} model calls per image)")
    return config, summary


def _load_failure(host: str, port: int, model_name: str, token: str) -> str | None:
    """None when the model is ready, else why Triton did not load it (the first line of its reason)."""
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else '[::1]' if host == '::' else host}:{port}/v2"
    try:
        with urllib.request.urlopen(f"{url}/models/{model_name}/ready", timeout=10):
            return None
    except (urllib.error.URLError, OSError):
        pass
    index = urllib.request.Request(f"{url}/repository/index", data=b"{}", method="POST",
                                   headers={import_pytriton().TRITON_ACCESS_HEADER: token})
    try:
        with urllib.request.urlopen(index, timeout=10) as answer:
            reasons = [m.get("reason", "") for m in json.loads(answer.read()) if m.get("name") == model_name]
    except (urllib.error.URLError, OSError, ValueError):
        reasons = []
    return (" ".join(reasons).strip().splitlines() or ["no reason given"])[0]


def serve(config: dict[str, Any], summary: str, *, host: str, http_port: int, grpc_port: int, metrics_port: int,
          log_verbose: int = 0, log_file: Path | None = None) -> None:
    """Start Triton on a repository holding the model of `config`, block until SIGINT/SIGTERM, then stop Triton."""
    triton = import_pytriton()
    from pytriton.client.exceptions import PyTritonClientError

    _environment_for_triton()
    name = config["name"]
    with tempfile.TemporaryDirectory(prefix="ddpm-serve-") as repo:
        version = Path(repo) / name / "1"
        version.mkdir(parents=True)
        (Path(repo) / name / "config.pbtxt").write_text(pbtxt(config))
        shutil.copyfile(MODEL_PY, version / "model.py")
        server_config = triton.TritonConfig(
            model_repository=Path(repo), http_address=host, http_port=http_port, grpc_address=host,
            grpc_port=grpc_port, metrics_address=host, metrics_port=metrics_port, log_verbose=log_verbose,
            exit_timeout_secs=5, log_file=log_file, exit_on_error=False, strict_readiness=False)
        # Statistics are read-only counts and timings (also on the metrics port); model loading stays token-protected.
        security = triton.TritonSecurityConfig(restricted_endpoints=["shared-memory", "model-repository", "trace",
                                                                     "logging"])

        def stop(signum: int, _frame: Any) -> None:
            raise KeyboardInterrupt  # Triton.serve() stops the server on it

        # Also when started with SIGINT ignored (`cmd &` in a script); the caller's handlers come back on return.
        previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            with triton.Triton(config=server_config, security_config=security) as server:
                # Triton runs on when the model does not load (exit_on_error off), so that it can say why.
                failure = _load_failure(host, http_port, name, server.get_access_token())
                if failure is not None:
                    raise DDPMError(f"Triton could not load the model: {failure}")
                print(f"serving {summary} on http://{host}:{http_port} and grpc {host}:{grpc_port}; ready: "
                      f"/v2/models/{name}/ready, metrics: http://{host}:{metrics_port}/metrics", file=sys.stderr,
                      flush=True)
                server.serve()
        except (TimeoutError, PyTritonClientError):  # PyTriton gave up waiting for Triton to start
            raise DDPMError("Triton did not start; run again with {opt:verbose} to see its log") from None
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
