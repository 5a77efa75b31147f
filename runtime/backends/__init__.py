"""Inference backends behind one small protocol, and `open_model`, which picks one from a file's extension.

A backend computes eps(x_t, t) on a batch, says which batch sizes it accepts, and carries the model's `ModelInfo`
read from the file itself (ONNX metadata, engine sidecar or checkpoint). Backends import their heavy libraries
lazily, so `runtime` imports with NumPy and ONNX Runtime alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime.errors import DDPMError
from runtime.metadata import ModelInfo
from runtime.sampling import Chain, Stepper

PROVIDERS = ("cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16")  # auto: the FP16 sibling graph on CUDA when one was exported
UNBOUNDED = 1 << 20  # "any batch" for graphs with a free batch dimension


class Backend(Protocol):
    """What the sampling loop needs from a model."""

    info: ModelInfo
    batch_range: tuple[int, int]  # smallest and largest batch one call accepts
    description: str  # e.g. "onnxruntime CPUExecutionProvider fp32 model.onnx", for summaries

    def eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray: ...  # [B, C or 2C (eps, v), H, W]

    def stepper(self, chain: Chain) -> Stepper: ...


class EpsBackend:
    """Shared part of the eps-graph backends: input checks, padding up to the smallest batch, the host stepper."""

    info: ModelInfo
    batch_range: tuple[int, int] = (1, UNBOUNDED)
    description: str = ""

    def eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        b = len(x_t)
        lo, hi = self.batch_range
        if b > hi:
            raise DDPMError(f"batch {b} exceeds this model's largest batch {hi}")
        if b < lo:  # pad a final partial batch up to the profile's minimum, then drop the padding
            x_t = np.concatenate([x_t, np.zeros((lo - b, *x_t.shape[1:]), x_t.dtype)])
            t = np.concatenate([t, np.full(lo - b, t[0], t.dtype)])
        x_t = np.ascontiguousarray(x_t, dtype=np.float32)
        return self._eps(x_t, np.ascontiguousarray(t, dtype=np.int64))[:b]

    def _eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def stepper(self, chain: Chain) -> Stepper:
        return chain.stepper(self.eps)


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
