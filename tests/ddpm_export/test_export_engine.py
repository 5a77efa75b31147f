"""Our logic around TensorRT (profiles, flags, timing cache, plan + sidecar, skip/error paths).

TensorRT cannot be installed here, so a fake `tensorrt` module stands in for it: it records what our code asks of
the documented builder API. It proves our bookkeeping, not that TensorRT builds the engine; that needs a GPU host
(`test_real_tensorrt_engine`, skipped without tensorrt).
"""

from __future__ import annotations

import importlib.machinery
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from ddpm_export import engine
from ddpm_export.onnx_io import read_info
from ddpm_export.pipeline import export_all
from runtime.engine_info import EngineInfo, sidecar_path
from runtime.errors import DDPMError
from runtime.fileio import file_sha256


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.parse_ok, self.plan = True, b"PLAN-BYTES"


def _fake_tensorrt(rec: _Recorder, version: str = "10.9.0") -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = version

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return b"cache:" + self.data

    class Profile:
        def set_shape(self, name, lo, opt, hi) -> None:
            rec.calls.append(("set_shape", name, lo, opt, hi))

    class Config:
        progress_monitor = None
        builder_optimization_level = None

        def add_optimization_profile(self, profile) -> None:
            rec.calls.append(("add_profile",))

        def create_timing_cache(self, data: bytes) -> TimingCache:
            rec.calls.append(("timing_cache_in", bytes(data)))
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache:
            return self.cache

    class Builder:
        def __init__(self, logger) -> None:
            pass

        def create_network(self, flags: int) -> str:
            rec.calls.append(("create_network", flags))
            return "network"

        def create_builder_config(self) -> Config:
            self.config = Config()
            return self.config

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network, config):
            rec.calls.append(("build", config.builder_optimization_level))
            monitor = config.progress_monitor
            monitor.phase_start("Building", None, 2)
            assert monitor.step_complete("Building", 0) is True
            monitor.phase_finish("Building")
            return rec.plan

    class OnnxParser:
        num_errors = 1

        def __init__(self, network, logger) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            rec.calls.append(("parse", path))
            return rec.parse_ok

        def get_error(self, i: int) -> str:
            return "unsupported node X"

    for cls in (Logger, NetworkDefinitionCreationFlag, IProgressMonitor, Builder, OnnxParser):
        setattr(trt, cls.__name__, cls)
    return trt


@pytest.fixture
def fake_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    """A fake tensorrt module and a fake nvidia-smi (our parser of its output is exercised too)."""
    rec = _Recorder()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA Fake GPU 80GB, 9.0'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(rec))
    return rec


def test_batch_profile_shapes_and_bad_ranges() -> None:
    shapes = engine.batch_profile(1, 3, 8, (3, 32, 32))
    assert shapes == {"x_t": ((1, 3, 32, 32), (3, 3, 32, 32), (8, 3, 32, 32)), "t": ((1,), (3,), (8,))}
    for bad in [(0, 1, 8), (4, 2, 8), (1, 9, 8)]:
        with pytest.raises(DDPMError, match="min batch <= opt batch <= max batch"):
            engine.batch_profile(*bad, (3, 32, 32))


def test_build_writes_plan_and_sidecar(fake_gpu: _Recorder, tiny_export_dir: Path, tmp_path: Path) -> None:
    onnx_path = tiny_export_dir / "model.fp16.onnx"
    plan = tmp_path / "model.fp16.plan"
    written = engine.build_engine(onnx_path, plan, (1, 2, 4), optimization_level=4)
    assert written == {"plan": plan, "plan_info": sidecar_path(plan)}
    assert plan.read_bytes() == b"PLAN-BYTES"
    assert ("create_network", 1 << 1) in fake_gpu.calls  # strongly typed
    assert ("set_shape", "x_t", (1, 1, 32, 32), (2, 1, 32, 32), (4, 1, 32, 32)) in fake_gpu.calls
    assert ("set_shape", "t", (1,), (2,), (4,)) in fake_gpu.calls
    assert ("build", 4) in fake_gpu.calls

    info = EngineInfo.load(plan)
    assert info.tensorrt_version == "10.9.0"
    assert (info.gpu_name, info.compute_capability) == ("NVIDIA Fake GPU 80GB", "9.0")
    assert info.profile == {"x_t": [1, 2, 4], "t": [1, 2, 4]} and info.batch_range == (1, 4)
    assert info.onnx_sha256 == file_sha256(onnx_path) and info.builder_optimization_level == 4
    model_info = info.model_info(str(plan))
    assert model_info.precision == "fp16" and model_info.kind == "eps"
    import onnx

    assert model_info == read_info(onnx.load(onnx_path), "x")
    info.check_compatible("10.9.0", "9.0")
    with pytest.raises(DDPMError, match="TensorRT 10.9.0"):
        info.check_compatible("10.8.0", "9.0")
    with pytest.raises(DDPMError, match="compute capability 9.0"):
        info.check_compatible("10.9.0", "8.9")

    # the timing cache is saved and fed to the next build; existing plans need force
    cache = engine.timing_cache_path(plan)
    assert cache.read_bytes() == b"cache:"
    with pytest.raises(DDPMError, match="pass force to overwrite"):
        engine.build_engine(onnx_path, plan, (1, 2, 4))
    engine.build_engine(onnx_path, plan, (1, 2, 4), force=True)
    assert ("timing_cache_in", b"cache:") in fake_gpu.calls


@pytest.mark.parametrize("failure", ["parse", "build"])
def test_build_failures_leave_nothing_behind(fake_gpu: _Recorder, tiny_export_dir: Path, tmp_path: Path,
                                             failure: str) -> None:
    if failure == "parse":
        fake_gpu.parse_ok = False
    else:
        fake_gpu.plan = None
    plan = tmp_path / "model.fp16.plan"
    with pytest.raises(DDPMError, match="unsupported node X" if failure == "parse" else "failed to build"):
        engine.build_engine(tiny_export_dir / "model.fp16.onnx", plan, (1, 1, 2))
    assert not plan.exists() and not sidecar_path(plan).exists()


def test_missing_gpu_is_reported(fake_gpu: _Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "no NVIDIA GPU" in engine.missing_reason()
    monkeypatch.delitem(sys.modules, "tensorrt")
    monkeypatch.setattr(engine.importlib.util, "find_spec", lambda name: None)
    assert engine.missing_reason() == "the tensorrt package is not installed"


def test_pipeline_builds_engine_when_tensorrt_is_present(fake_gpu: _Recorder, tiny_checkpoint: Path,
                                                         tmp_path: Path) -> None:
    written = export_all(tiny_checkpoint, tmp_path, step_graph=False, validate=False, max_batch=3, opt_batch=2)
    assert set(written) == {"onnx", "fp16", "plan", "plan_info"}
    assert json.loads(written["plan_info"].read_text())["profile"]["x_t"] == [1, 2, 3]
    assert ("parse", str(tmp_path / "model.fp16.onnx")) in fake_gpu.calls


def test_real_tensorrt_engine(tiny_export_dir: Path, tmp_path: Path) -> None:
    """On a GPU host with TensorRT: build, then compare the engine with ONNX Runtime FP16 via Polygraphy."""
    pytest.importorskip("tensorrt")
    if engine.missing_reason():
        pytest.skip(engine.missing_reason())
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator

    src = tmp_path / "model.fp16.onnx"
    shutil.copy(tiny_export_dir / "model.fp16.onnx", src)
    plan = engine.build_engine(src, tmp_path / "model.fp16.plan", (1, 2, 4))["plan"]
    feed = {"x_t": np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32),
            "t": np.array([0, 500, 999], dtype=np.int64)}
    runners = [TrtRunner(EngineFromBytes(plan.read_bytes())), OnnxrtRunner(SessionFromOnnx(str(src)))]
    results = Comparator.run(runners, data_loader=[feed])
    a, b = (results[r.name][0]["eps"] for r in runners)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-2
