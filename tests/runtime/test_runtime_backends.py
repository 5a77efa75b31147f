"""Backend selection and the TensorRT engine checks (TensorRT and CUDA are faked: they are not installable here),
plus the CUDA paths, which run only where onnxruntime-gpu and a GPU are present."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from runtime.backends import open_model, tensorrt_backend
from runtime.engine_info import EngineInfo, sidecar_path
from runtime.errors import DDPMError
from runtime.metadata import ModelInfo
from runtime.sampling import Chain, sample
from runtime.sampling.schedule import DiffusionConfig

INFO = ModelInfo(diffusion=DiffusionConfig(), image_shape=(1, 32, 32), precision="fp16")


class FakeTensorRT(types.ModuleType):
    """Just enough of the tensorrt module to see whether (and when) our code deserializes a plan."""

    def __init__(self, version: str):
        super().__init__("tensorrt")
        self.__version__ = version
        self.deserialized: list[bytes] = []
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level: int):
                self.level = level

        class Runtime:
            def __init__(self, logger: Logger):
                self.logger = logger

            def deserialize_cuda_engine(self, data: bytes) -> None:
                fake.deserialized.append(data)
                return None  # what TensorRT returns for a plan it cannot read

        self.Logger, self.Runtime = Logger, Runtime


class FakeCudart:
    def __init__(self, name: str, major: int, minor: int):
        self.props = types.SimpleNamespace(name=name.encode(), major=major, minor=minor)

    def cudaGetDeviceProperties(self, device: int):  # noqa: N802 - cuda-python's name
        return 0, self.props


@pytest.fixture
def plan(tmp_path: Path) -> Path:
    path = tmp_path / "model.fp16.plan"
    path.write_bytes(b"serialized engine bytes")
    return path


def _sidecar(plan: Path, version: str = "10.9.0", capability: str = "9.0") -> None:
    EngineInfo(metadata=INFO.to_metadata(), tensorrt_version=version, gpu_name="NVIDIA H100",
               compute_capability=capability, profile={"x_t": [1, 8, 64], "t": [1, 8, 64]},
               onnx_sha256="0" * 64).save(plan)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    def install(version: str = "10.9.0", capability: tuple[int, int] = (9, 0)) -> FakeTensorRT:
        trt = FakeTensorRT(version)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(tensorrt_backend, "_cudart", lambda: FakeCudart("NVIDIA H100", *capability))
        return trt
    return install


def test_engine_without_sidecar_is_refused_before_tensorrt_is_touched(plan, fake_gpu):
    trt = fake_gpu()
    with pytest.raises(DDPMError, match="has no sidecar model.fp16.plan.json"):
        open_model(plan)
    assert trt.deserialized == []


@pytest.mark.parametrize("version,capability,message", [
    ("10.3.0", (9, 0), "built with TensorRT 10.9.0 but TensorRT 10.3.0 is installed"),
    ("10.9.0", (8, 9), r"compute capability 9.0\) but this GPU NVIDIA H100 is 8.9"),
])
def test_foreign_engine_is_refused_before_deserializing(plan, fake_gpu, version, capability, message):
    _sidecar(plan)
    trt = fake_gpu(version, capability)
    with pytest.raises(DDPMError, match=message):
        open_model(plan)
    assert trt.deserialized == []


def test_matching_engine_is_deserialized_and_a_bad_plan_reported(plan, fake_gpu):
    _sidecar(plan)
    trt = fake_gpu()
    with pytest.raises(DDPMError, match="could not deserialize"):
        open_model(plan)
    assert trt.deserialized == [b"serialized engine bytes"]


def test_engine_needs_tensorrt(plan, monkeypatch):
    _sidecar(plan)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(DDPMError, match="needs the tensorrt package"):
        open_model(plan)


def test_corrupt_sidecar_is_one_clear_error(plan):
    sidecar_path(plan).write_text("{not json")
    with pytest.raises(DDPMError, match="not a valid ddpm-deploy engine sidecar"):
        open_model(plan)


def test_open_model_options_are_checked(tiny_export_dir):
    with pytest.raises(DDPMError, match="unknown provider"):
        open_model(tiny_export_dir / "model.onnx", "rocm")
    with pytest.raises(DDPMError, match="CUDA graphs"):
        open_model(tiny_export_dir / "model.onnx", "cpu", cuda_graph=True)


def test_onnx_backend_reads_everything_from_the_file(tiny_export_dir, tiny_checkpoint):
    onnx_model = open_model(tiny_export_dir / "model.onnx", threads=1)
    eager = open_model(tiny_checkpoint, threads=1)
    assert onnx_model.info.diffusion == eager.info.diffusion
    assert onnx_model.info.image_shape == eager.info.image_shape == (1, 32, 32)
    assert onnx_model.info.source_sha256 == eager.info.source_sha256
    assert onnx_model.batch_range == (1, 4)  # the export's max_batch
    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32)
    t = np.array([0, 500, 999])
    np.testing.assert_allclose(onnx_model.eps(x, t), eager.eps(x, t), atol=1e-4)
    fp16 = open_model(tiny_export_dir / "model.onnx", precision="fp16", threads=1)
    assert fp16.info.precision == "fp16" and "model.fp16.onnx" in fp16.description


# --- CUDA (onnxruntime-gpu): skipped on CPU-only machines -------------------------------------------------------


def _needs_cuda() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_step_graph_keeps_x_on_device_and_matches_cpu(tiny_export_dir, cuda_graph):
    _needs_cuda()
    cpu = open_model(tiny_export_dir / "model.step.onnx", "cpu")
    gpu = open_model(tiny_export_dir / "model.onnx", "cuda", precision="fp32", cuda_graph=cuda_graph)
    chain = Chain.build(gpu.info.diffusion)
    assert gpu.step_graph_fits(chain) and "model.step.onnx" in gpu.description
    ref = sample(cpu, chain, 6, seed=1, batch_size=4)
    for _ in range(2):  # a second run reuses the bound buffers (and captured graphs)
        np.testing.assert_allclose(sample(gpu, chain, 6, seed=1, batch_size=4), ref, atol=1e-3)


@pytest.mark.gpu
def test_cuda_fp16_eps_graph_is_the_default_for_other_chains(tiny_export_dir):
    _needs_cuda()
    gpu = open_model(tiny_export_dir / "model.onnx", "cuda")
    cpu = open_model(tiny_export_dir / "model.onnx", "cpu")
    assert gpu.info.precision == "fp16"
    chain = Chain.build(gpu.info.diffusion, "ddim", "ddim20")
    assert np.abs(sample(gpu, chain, 4, seed=2) - sample(cpu, chain, 4, seed=2)).max() < 0.1


def test_cli_reports_an_engine_problem_in_one_line(plan, tmp_path, capsys):
    from runtime.run.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(plan), "--out", str(tmp_path / "s.npz")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: engine " + str(plan) + " has no sidecar model.fp16.plan.json; "
                                               "rebuild it with `ddpm-export build-engine`")
    assert not (tmp_path / "s.npz").exists()
