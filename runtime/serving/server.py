"""`ddpm-serve`'s server: the `Sampler` inference function behind NVIDIA Triton Inference Server, through PyTriton.

Triton's dynamic batcher merges requests up to `max_batch` rows into one call of the inference function
(`runtime.serving.sampler.Sampler`). Errors: Triton itself refuses wrong types or shapes, missing inputs and
requests of 0 or more than max_batch rows, each on its own. Bad values (negative seed or index, unknown sampler, bad
steps or eta) are found by the inference function and fail the whole model batch the request was merged into (a
PyTriton model answers one execute call with one error); the server keeps serving.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import DDPMError
from runtime.serving.sampler import Sampler
from runtime.serving.schema import INPUTS, MODEL_NAME, OUTPUT


def import_pytriton() -> Any:
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


def check_port(host: str, port: int, flag: str) -> None:
    """Refuse a busy port up front: Triton would exit and leave PyTriton waiting for it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise DDPMError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another {flag} or host") \
                from None


def serve(backend: Backend, sampler: Sampler, *, host: str, http_port: int, grpc_port: int, metrics_port: int,
          max_batch: int, queue_delay_us: int, model_name: str = MODEL_NAME, log_verbose: int = 0,
          log_file: Path | None = None) -> None:
    """Start Triton, bind the sampler and block until SIGINT/SIGTERM, then stop Triton and return."""
    triton = import_pytriton()
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    _python_libdir_first()
    config = triton.TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                                 metrics_address=host, metrics_port=metrics_port, log_verbose=log_verbose,
                                 exit_timeout_secs=5, log_file=log_file)
    # Statistics are read-only counts and timings (also on the metrics port); model loading stays token-protected.
    security = triton.TritonSecurityConfig(restricted_endpoints=["shared-memory", "model-repository", "trace",
                                                                 "logging"])
    inputs = [Tensor(name=i.name, dtype=i.dtype, shape=(1,), optional=i.optional) for i in INPUTS]
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
        print(f"serving {model_name!r} ({backend.description}, {sampler.chain(sampler.default).describe()} by "
                   f"default, batches up to {max_batch}) on http://{host}:{http_port} and grpc {host}:{grpc_port}; "
                   f"ready: /v2/models/{model_name}/ready, metrics: http://{host}:{metrics_port}/metrics", file=sys.stderr, flush=True)
        server.serve()
