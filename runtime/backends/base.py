"""What every backend is: the protocol the sampling loop needs, and the shared part of the eps-graph backends."""

from __future__ import annotations

from typing import Protocol

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
