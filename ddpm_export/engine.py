"""TensorRT engine building from the FP16 ONNX. `tensorrt` is imported inside functions only: the export works
without it, and everything here is written to the documented TensorRT 10/11 Python API.

Precision lives in the ONNX graph: the network is strongly typed (a creation flag on TensorRT 10.x, always on and
the flag ignored on 11.x), so the FP16 graph's float32 islands stay float32 in the engine.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ddpm_export.onnx_io import load_onnx, read_info
from runtime.engine_info import EngineInfo, sidecar_path
from runtime.errors import DDPMError
from runtime.fileio import atomic_write_bytes, check_writable, file_sha256
from runtime.progress import progress

BUILD_LATER = "build it on a GPU host with `ddpm-export build-engine MODEL.fp16.onnx`"


def missing_reason() -> str | None:
    """Why an engine cannot be built here (no tensorrt package, no NVIDIA GPU), or None if it can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed"
    try:
        gpu_identity()
    except DDPMError as exc:
        return str(exc)
    return None


def gpu_identity() -> tuple[str, str]:
    """(name, "major.minor" compute capability) of GPU 0, from nvidia-smi (ships with every NVIDIA driver)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise DDPMError("no NVIDIA GPU found (nvidia-smi is missing)")
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        name, cap = (v.strip() for v in out.strip().splitlines()[0].rsplit(",", 1))
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        raise DDPMError("no usable NVIDIA GPU found (nvidia-smi failed)") from None
    return name, cap


def batch_profile(min_batch: int, opt_batch: int, max_batch: int, info_image_shape: tuple[int, ...]
                  ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Optimization-profile shapes (min, opt, max) for every input of an eps graph."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise DDPMError(f"need 1 <= min batch <= opt batch <= max batch, got {min_batch}, {opt_batch}, {max_batch}")
    sizes = (min_batch, opt_batch, max_batch)
    return {"x_t": tuple((b, *info_image_shape) for b in sizes),  # type: ignore[dict-item]
            "t": tuple((b,) for b in sizes)}  # type: ignore[dict-item]


def _progress_monitor(trt: Any) -> Any | None:
    """A TensorRT IProgressMonitor printing phases with tqdm (None on versions without the interface)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self._lock = threading.Lock()
            self._bars: dict[str, tqdm] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                self._bars[phase_name] = progress(total=num_steps, desc=phase_name, leave=False,
                                                  position=len(self._bars))

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                if phase_name in self._bars:
                    self._bars[phase_name].update()
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                bar = self._bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()

    return Monitor()


def timing_cache_path(plan: Path) -> Path:
    """One timing cache per output folder, reused by later builds (it speeds up rebuilds a lot)."""
    return plan.parent / "tensorrt.timing.cache"


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, profile: tuple[int, int, int], *,
                 optimization_level: int = 3, force: bool = False) -> dict[str, Path]:
    """Build `plan_path` (+ its EngineInfo sidecar) from an FP16 eps ONNX with a dynamic-batch profile."""
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    check_writable(plan_path, force)
    check_writable(sidecar_path(plan_path), force)
    if not 0 <= optimization_level <= 5:
        raise DDPMError(f"builder optimization level must be 0..5, got {optimization_level}")
    info = read_info(load_onnx(onnx_path), str(onnx_path))
    if info.kind != "eps":
        raise DDPMError(f"{onnx_path} is a {info.kind} graph; build engines from model.fp16.onnx (an eps graph)")
    shapes = batch_profile(*profile, info.image_shape)
    reason = missing_reason()
    if reason:
        raise DDPMError(f"cannot build a TensorRT engine: {reason}; {BUILD_LATER}")
    gpu_name, capability = gpu_identity()
    trt = importlib.import_module("tensorrt")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # required on 10.x, ignored on 11.x
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DDPMError(f"TensorRT cannot parse {onnx_path}: {errors[:300]}")
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    trt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        trt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(trt_profile)
    cache_file = timing_cache_path(plan_path)
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)
    monitor = _progress_monitor(trt)
    if monitor is not None:
        config.progress_monitor = monitor

    start = time.perf_counter()
    with progress(desc="building TensorRT engine", bar_format="{desc}: {elapsed}", show=monitor is None):
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise DDPMError(f"TensorRT failed to build an engine from {onnx_path}; rerun with a lower "
                        "{opt:opt_level} or check the log above")
    seconds = time.perf_counter() - start
    atomic_write_bytes(cache_file, bytes(config.get_timing_cache().serialize()))
    atomic_write_bytes(plan_path, bytes(plan))
    engine_info = EngineInfo(
        metadata=info.to_metadata(), tensorrt_version=str(trt.__version__), gpu_name=gpu_name,
        compute_capability=capability, profile={k: [v[0][0], v[1][0], v[2][0]] for k, v in shapes.items()},
        onnx_sha256=file_sha256(onnx_path), builder_optimization_level=optimization_level,
        extra={"build_seconds": round(seconds, 1), "strongly_typed": True, "timing_cache": cache_file.name})
    return {"plan": plan_path, "plan_info": engine_info.save(plan_path)}
