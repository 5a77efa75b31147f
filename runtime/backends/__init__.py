"""Inference backends behind one small protocol, and `open_model`, which picks one from a file's extension.

A backend computes eps(x_t, t) on a batch, says which batch sizes it accepts, and carries the model's `ModelInfo`
read from the file itself (ONNX metadata, engine sidecar or checkpoint). Backends import their heavy libraries
lazily, so `runtime` imports with NumPy and ONNX Runtime alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from runtime.backends.base import PRECISIONS, PROVIDERS, UNBOUNDED, Backend, EpsBackend
from runtime.errors import DDPMError

__all__ = ["PRECISIONS", "PROVIDERS", "UNBOUNDED", "Backend", "EpsBackend", "is_hub_id", "open_model"]

def open_model(path: str | os.PathLike, provider: str = "cpu", *, precision: str = "auto",
               cuda_graph: bool = False, threads: int = 0, **source_options: Any) -> Backend:
    """Open `.onnx` (ONNX Runtime), `.plan`/`.engine` (TensorRT, GPU), or, eagerly in PyTorch (needs torch), a `.pt`,
    a diffusers folder or a hub id of one in the local Hugging Face cache (`train.sources`).

    provider: "cpu" or "cuda". precision "auto" picks the FP16 sibling graph on CUDA when one was exported.
    cuda_graph: capture a CUDA graph per batch shape (ONNX Runtime CUDA only). threads: CPU threads, 0 = default.
    source_options: for eager sources, `train.sources.load_source`'s (scheduler_config, flags).
    """
    path = Path(path)
    if provider not in PROVIDERS:
        raise DDPMError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    if precision not in PRECISIONS:
        raise DDPMError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if path.is_dir() or is_hub_id(path):  # a diffusers folder, or a hub id of one in the local cache
        from runtime.backends.eager_backend import EagerBackend

        return EagerBackend(path, provider, threads=threads, **source_options)
    if not path.is_file():
        raise DDPMError(f"model file {path} not found")
    suffix = path.suffix.lower()
    if source_options and suffix != ".pt":
        raise DDPMError(f"{', '.join(source_options)} only apply to PyTorch sources (.pt or a diffusers folder)")
    if cuda_graph and (suffix != ".onnx" or provider != "cuda"):
        raise DDPMError("CUDA graphs are only supported for .onnx models with {opt:provider} cuda")
    if suffix == ".onnx":
        from runtime.backends.onnxruntime_backend import open_onnx

        return open_onnx(path, provider, precision=precision, cuda_graph=cuda_graph, threads=threads)
    if suffix in (".plan", ".engine"):  # always on the GPU it was built for; `provider` does not apply
        from runtime.backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(path)
    if suffix == ".pt":
        from runtime.backends.eager_backend import EagerBackend

        return EagerBackend(path, provider, threads=threads, **source_options)
    raise DDPMError(f"unknown model file type {path.suffix or '(none)'!r} for {path.name}; pass a .onnx, .plan or "
                    ".pt file or a diffusers folder")



_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
MODEL_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".onnx", ".plan", ".engine", ".npz", ".json")


def is_hub_id(text: str | os.PathLike) -> bool:
    """owner/name[@revision] of a Hugging Face model: not an existing path, not a model file's name. Such a model is
    opened eagerly from the local Hugging Face cache (`train.sources.hub`), never downloaded."""
    text = str(text)
    return (bool(_HUB_ID.match(text)) and not Path(text).exists()
            and not text.partition("@")[0].lower().endswith(MODEL_FILE_SUFFIXES))
