"""TensorRT backend: a serialized plan plus its JSON sidecar; the only module that imports tensorrt and cuda-python.

The sidecar is read and checked against the installed TensorRT version and this GPU's compute capability BEFORE
the plan is deserialized, so a foreign engine gives a clear message instead of an opaque deserialization failure.
Device memory and the stream come from cuda-python (`cuda.bindings.runtime`, or `cuda.cudart` on older releases).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.base import EpsBackend
from runtime.engine_info import EngineInfo
from runtime.errors import DDPMError


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise DDPMError("TensorRT engines need cuda-python; pip install cuda-python") from None
    return cudart


def _check(result: Any) -> Any:
    """cuda-python returns (error, *values); raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise DDPMError(f"CUDA call failed with error {err}; is a GPU visible to this process?")
    return values[0] if len(values) == 1 else values


def gpu_properties(cudart: Any) -> tuple[str, str]:
    """(name, "major.minor") of device 0."""
    props = _check(cudart.cudaGetDeviceProperties(0))
    name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
    return name, f"{props.major}.{props.minor}"


class TensorRTBackend(EpsBackend):
    def __init__(self, path: Path):
        engine_info = EngineInfo.load(path)  # no sidecar -> clear error before anything else
        self.info = engine_info.model_info(str(path))
        if self.info.kind != "eps":
            raise DDPMError(f"{path.name} is a {self.info.kind} engine; the TensorRT backend runs eps engines")
        try:
            import tensorrt as trt
        except ImportError:
            raise DDPMError("running a .plan needs the tensorrt package and a GPU; or pass the .onnx model") from None
        cudart = _cudart()
        gpu_name, capability = gpu_properties(cudart)
        engine_info.check_compatible(trt.__version__, capability, gpu_name)
        self.trt, self.cudart = trt, cudart
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise DDPMError(f"TensorRT could not deserialize {path}; rebuild it with `ddpm-export build-engine`")
        self.runtime, self.engine = runtime, engine
        self.context = engine.create_execution_context()
        self.batch_range = engine_info.batch_range
        self.description = f"tensorrt {trt.__version__} {self.info.precision} {path.name} ({gpu_name})"
        self.stream = _check(cudart.cudaStreamCreate())
        max_b = self.batch_range[1]
        c, h, w = self.info.image_shape
        sizes = {self.info.inputs[0]: max_b * c * h * w * 4, self.info.inputs[1]: max_b * 8,
                 **{name: max_b * c * h * w * 4 for name in self.info.outputs}}  # eps (and v)
        self.device = {name: _check(cudart.cudaMalloc(size)) for name, size in sizes.items()}
        for name, ptr in self.device.items():
            self.context.set_tensor_address(name, int(ptr))

    def _copy(self, dst: int, src: int, nbytes: int, kind: Any) -> None:
        _check(self.cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream))

    def _eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        x_name, t_name = self.info.inputs
        kinds = self.cudart.cudaMemcpyKind
        self.context.set_input_shape(x_name, x_t.shape)
        self.context.set_input_shape(t_name, t.shape)
        outs = [np.empty_like(x_t) for _ in self.info.outputs]
        self._copy(int(self.device[x_name]), x_t.ctypes.data, x_t.nbytes, kinds.cudaMemcpyHostToDevice)
        self._copy(int(self.device[t_name]), t.ctypes.data, t.nbytes, kinds.cudaMemcpyHostToDevice)
        if not self.context.execute_async_v3(int(self.stream)):
            raise DDPMError("TensorRT execution failed; see the TensorRT log above")
        for name, out in zip(self.info.outputs, outs):
            self._copy(out.ctypes.data, int(self.device[name]), out.nbytes, kinds.cudaMemcpyDeviceToHost)
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)  # eps, v -> [B, 2C, H, W]

    def __del__(self) -> None:
        for ptr in getattr(self, "device", {}).values():
            self.cudart.cudaFree(ptr)
