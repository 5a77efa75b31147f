"""`ddpm-export triton-repo`: the repository's files, its config.pbtxt files parsed with Triton's own model-config
schema (shipped in tritonclient), and the Python-backend sampling model run against a stand-in `pb_utils`."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from ddpm_export.cli import main as export_main
from runtime.serving.triton_repo import eps_config, pbtxt, write_repository
from runtime.backends import open_model
from runtime.errors import DDPMError
from runtime.metadata import ModelInfo
from runtime.sampling import DEFAULT_SAMPLER, Chain, sample
from runtime.sampling.schedule import DiffusionConfig
from benchmarks.serving import LEAK, MALFORMED, mixed_load

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="needs tritonclient (the serve extra)")
from google.protobuf import json_format, text_format  # noqa: E402  (comes with tritonclient)


def parse(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repo(tiny_export_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    export_main(["triton-repo", str(tiny_export_dir), "--out", str(out), "--steps", "8", "--queue-delay-us", "500"])
    return out


def test_configs_parse_with_triton_schema_and_say_what_the_export_is(repo, tiny_export_dir):
    eps, loop = parse(repo / "ddpm_eps" / "config.pbtxt"), parse(repo / "ddpm" / "config.pbtxt")
    assert eps.name == "ddpm_eps" and eps.platform == "onnxruntime_onnx"
    assert eps.max_batch_size == 4  # the export's ddpm.max_batch
    assert [(i.name, i.data_type, list(i.dims)) for i in eps.input] == [
        ("x_t", model_config_pb2.TYPE_FP32, [1, 32, 32]), ("t", model_config_pb2.TYPE_INT64, [1])]
    assert eps.input[1].HasField("reshape") and list(eps.input[1].reshape.shape) == []
    assert [(o.name, list(o.dims)) for o in eps.output] == [("eps", [1, 32, 32])]
    assert list(eps.dynamic_batching.preferred_batch_size) == [1, 2, 4]
    assert eps.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.count, g.kind) for g in eps.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_GPU)]
    assert loop.backend == "python" and loop.max_batch_size == 4
    assert [(i.name, i.optional) for i in loop.input] == [("seed", False), ("index", False), ("sampler", True),
                                                         ("steps", True), ("spacing", True), ("eta", True)]
    assert [(o.name, list(o.dims)) for o in loop.output] == [("image", [1, 32, 32])]
    assert loop.parameters["default_steps"].string_value == "8"
    assert loop.parameters["default_eta"].string_value == ""  # ddim's own default, 0
    assert loop.parameters["max_model_calls"].string_value == ""  # the sampler's default cap
    assert "source" not in loop.parameters  # eps through BLS calls, not a model of its own
    assert (repo / "ddpm_eps" / "1" / "model.onnx").read_bytes() == (tiny_export_dir / "model.onnx").read_bytes()
    assert (repo / "ddpm" / "1" / "runtime" / "sampling" / "loop.py").is_file()
    info = ModelInfo.from_metadata(json.loads((repo / "ddpm" / "1" / "model_info.json").read_text()), "repo")
    assert info == open_model(tiny_export_dir / "model.onnx").info


def test_learned_variance_graph_has_eps_and_v_outputs():
    info = ModelInfo(diffusion=DiffusionConfig(variance_type="learned_range"), image_shape=(3, 32, 32),
                     outputs=("eps", "v"))
    text = pbtxt(eps_config(info, 16, "tensorrt_plan", "gpu", 2, 1000))
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert [(o.name, list(o.dims)) for o in config.output] == [("eps", [3, 32, 32]), ("v", [3, 32, 32])]
    assert config.platform == "tensorrt_plan" and config.instance_group[0].count == 2
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]


def test_bad_arguments_are_refused(tiny_export_dir, repo, tmp_path):
    with pytest.raises(DDPMError, match="already exists"):
        write_repository(tiny_export_dir, repo)
    with pytest.raises(DDPMError, match="step graph"):
        write_repository(tiny_export_dir, tmp_path / "r1", graph="model.step.onnx")
    with pytest.raises(DDPMError, match="max batch"):
        write_repository(tiny_export_dir, tmp_path / "r2", max_batch=5)
    with pytest.raises(DDPMError, match="unknown sampler"):
        write_repository(tiny_export_dir, tmp_path / "r3", sampler="euler")
    with pytest.raises(DDPMError, match="max_model_calls 10 is below the 20 model calls of the default chain"):
        write_repository(tiny_export_dir, tmp_path / "r4", steps="20", max_model_calls=10)
    assert not any(tmp_path.iterdir())  # nothing half-written


class _Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Error:
    INTERNAL, INVALID_ARG = "INTERNAL", "INVALID_ARG"

    def __init__(self, message: str, code: str = INTERNAL):
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> str:
        return self._code


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error_ = output_tensors or [], error

    def has_error(self) -> bool:
        return self.error_ is not None

    def error(self):
        return self.error_


def fake_pb_utils(eps_graph: Path, config: dict) -> types.ModuleType:
    """What model.py uses of triton_python_backend_utils; BLS requests to ddpm_eps run the repository's graph in
    ONNX Runtime, after Triton's reshape of t from [B, 1] to [B]."""
    session = ort.InferenceSession(str(eps_graph), providers=["CPUExecutionProvider"])
    assert [i["name"] for i in config["input"]] == ["x_t", "t"]

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs):
            assert model_name == "ddpm_eps"
            self.outputs, self.inputs = requested_output_names, {t.name(): t.as_numpy() for t in inputs}

        def exec(self):
            x_t, t = self.inputs["x_t"], self.inputs["t"]
            assert t.shape == (len(x_t), 1) and len(x_t) <= config["max_batch_size"]
            outs = session.run(self.outputs, {"x_t": x_t, "t": t.reshape(-1)})
            return _Response([_Tensor(n, o) for n, o in zip(self.outputs, outs)])

    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor, module.TritonError, module.InferenceResponse = _Tensor, _Error, _Response
    module.InferenceRequest = InferenceRequest
    module.get_input_tensor_by_name = lambda request, name: request.get(name)
    module.get_output_tensor_by_name = lambda response, name: next(
        (t for t in response.output_tensors if t.name() == name), None)
    return module


def test_python_model_answers_each_request_like_ddpm_run(repo, tiny_export_dir, monkeypatch):
    """model.py of the repository, driven the way the Python backend drives it: images equal `sample` for the same
    seeds and indices (ddpm-run's function), and each bad request of the batch fails alone, with one line and
    INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT)."""
    eps_config_dict = json_format.MessageToDict(parse(repo / "ddpm_eps" / "config.pbtxt"),
                                                preserving_proto_field_name=True)
    loop_config = json_format.MessageToDict(parse(repo / "ddpm" / "config.pbtxt"), preserving_proto_field_name=True)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils",
                        fake_pb_utils(repo / "ddpm_eps" / "1" / "model.onnx", eps_config_dict))
    spec = importlib.util.spec_from_file_location("ddpm_triton_model", repo / "ddpm" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(loop_config)})

    def request(seeds, indices, **options):
        tensors = {"seed": _Tensor("seed", np.array(seeds, np.int64).reshape(-1, 1)),
                   "index": _Tensor("index", np.array(indices, np.int64).reshape(-1, 1))}
        for name, value in options.items():
            array = np.full((len(seeds), 1), value, np.float64) if name == "eta" else \
                np.full((len(seeds), 1), value.encode(), object)
            tensors[name] = _Tensor(name, array)
        return tensors

    malformed = {what: {k: _Tensor(k, v) for k, v in arrays.items()} for what, arrays in MALFORMED.items()}
    malformed["chain over the limit"] = request([5], [0], sampler="ddpm", steps="1000")
    responses = model.execute([request([5, 5], [2, 0]), request([5], [1], sampler="euler"),
                               request([5], [3], sampler="ddim", steps="ddim8", eta=0.5),
                               request([5], [1], sampler="dpm++2m"), *malformed.values()])
    for what, response in zip(malformed, responses[4:]):
        assert response.has_error() and response.error().code() == _Error.INVALID_ARG, what
        assert "\n" not in response.error().message() and not LEAK.search(response.error().message()), what
    assert "this chain takes 1000 model calls per image" in responses[-1].error().message()
    backend = open_model(tiny_export_dir / "model.onnx")
    default = sample(backend, Chain.build(backend.info.diffusion, DEFAULT_SAMPLER, "8"), 4, seed=5)
    ddim = sample(backend, Chain.build(backend.info.diffusion, "ddim", "ddim8", 0.5), 4, seed=5)
    assert not responses[0].has_error() and not responses[2].has_error()
    assert np.array_equal(responses[0].output_tensors[0].as_numpy(), default[[2, 0]])
    assert np.array_equal(responses[2].output_tensors[0].as_numpy(), ddim[[3]])
    assert responses[1].has_error() and "unknown sampler" in responses[1].error().message()
    solver = sample(backend, Chain.build(backend.info.diffusion, "dpm++2m", "8"), 2, seed=5)
    assert np.array_equal(responses[3].output_tensors[0].as_numpy(), solver[[1]])


STAND_IN_EPS = '''"""Stand-in for Triton's onnxruntime backend (absent from PyTriton's server): runs 1/model.onnx."""
import json
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.session = ort.InferenceSession(str(Path(__file__).with_name("model.onnx")),
                                            providers=["CPUExecutionProvider"])
        self.outputs = [o["name"] for o in json.loads(args["model_config"])["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            x_t = pb_utils.get_input_tensor_by_name(request, "x_t").as_numpy()
            t = pb_utils.get_input_tensor_by_name(request, "t").as_numpy()
            assert t.shape == (len(x_t),), t.shape  # the config's reshape [B, 1] -> [B]
            outs = self.session.run(self.outputs, {"x_t": x_t, "t": t})
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, a) for n, a in zip(self.outputs, outs)]))
        return responses
'''


@pytest.mark.slow
def test_repository_serves_on_a_real_tritonserver(tiny_export_dir, tmp_path):
    """The generated repository (CPU instances) on the tritonserver binary that PyTriton ships, with the eps model's
    ONNX Runtime backend (absent there) replaced by a Python stand-in: both configs load, the BLS loop answers
    concurrent HTTP and gRPC requests with ddpm-run's images, and bad requests merged with good ones fail alone."""
    pytest.importorskip("pytriton", reason="needs the serve extra")
    import signal
    import socket
    import sysconfig
    import time
    from concurrent.futures import ThreadPoolExecutor

    import pytriton
    from pytriton.utils.distribution import get_libs_path

    from runtime.serving.client import ImageClient

    repo = tmp_path / "repo"
    write_repository(tiny_export_dir, repo, kind="cpu", steps="8", sampler_instances=2)
    eps_config = repo / "ddpm_eps" / "config.pbtxt"
    eps_config.write_text(eps_config.read_text().replace('platform: "onnxruntime_onnx"', 'backend: "python"'))
    (repo / "ddpm_eps" / "1" / "model.py").write_text(STAND_IN_EPS)
    dist = Path(pytriton.__file__).parent / "tritonserver"
    backends = tmp_path / "backends"
    shutil.copytree(dist / "backends" / "python", backends / "python")
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    shutil.copy(dist / "python_backend_stubs" / version / "triton_python_backend_stub", backends / "python")
    socks = [socket.socket() for _ in range(3)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    http, grpc, metrics = (s.getsockname()[1] for s in socks)
    for s in socks:
        s.close()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "LD_LIBRARY_PATH": f"{sysconfig.get_config_var('LIBDIR')}:{get_libs_path()}"}
    cmd = [str(dist / "bin" / "tritonserver"), f"--model-repository={repo}", f"--backend-directory={backends}",
           "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", f"--http-port={http}", f"--grpc-port={grpc}",
           f"--metrics-port={metrics}", "--exit-timeout-secs=5", "--allow-gpu-metrics=false"]
    log = tmp_path / "tritonserver.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        probe = ImageClient(f"127.0.0.1:{http}")
        deadline = time.monotonic() + 120
        while not probe.ready():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)

        def job(k: int):
            c = ImageClient(f"127.0.0.1:{grpc}", "grpc") if k % 2 else ImageClient(f"127.0.0.1:{http}")
            if k == 1:
                return c.request([6, 6], [0, 3], sampler="ddim", steps="ddim8", eta=0.5)
            if k == 2:
                with pytest.raises(DDPMError, match="unknown sampler 'euler'"):
                    c.request([6], [0], sampler="euler")
                return None
            return c.request([6], [k])

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(job, range(6)))
        mixed = mixed_load(f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", rounds=3)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    backend = open_model(tiny_export_dir / "model.onnx")
    default = sample(backend, Chain.build(backend.info.diffusion, DEFAULT_SAMPLER, "8"), 6, seed=6)
    ddim = sample(backend, Chain.build(backend.info.diffusion, "ddim", "ddim8", 0.5), 4, seed=6)
    assert np.array_equal(results[1], ddim[[0, 3]])
    for k in (0, 3, 4, 5):  # requests without a sampler: the repository's default chain, as ddpm-run's
        assert np.array_equal(results[k], default[[k]])
    # Good and malformed requests at once: the good ones all answered, exact; the bad ones refused alone, in one line.
    assert not mixed.good_failed and not mixed.bad_accepted and len(mixed.refusals) == 12, mixed.summary()
    assert {status for _, status, _ in mixed.refusals} == {"400", "StatusCode.INVALID_ARGUMENT"}
    assert not mixed.leaks, mixed.refusals
    want = sample(backend, Chain.build(backend.info.diffusion, DEFAULT_SAMPLER, "8"), 24, seed=5)
    assert sorted(mixed.images) == [(5, i) for i in range(24)]
    assert all(np.array_equal(image, want[i]) for (_, i), image in mixed.images.items())


def test_plan_is_served_with_its_profile(tiny_export_dir, tmp_path):
    """An export holding a TensorRT plan: the eps model is the plan (tensorrt_plan) with the profile's largest batch;
    a plan whose profile does not start at batch 1 is refused (Triton sends any batch from 1)."""
    from runtime.engine_info import EngineInfo

    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(tiny_export_dir / "model.onnx", export)
    info = open_model(tiny_export_dir / "model.onnx").info
    plan = export / "model.fp16.plan"
    plan.write_bytes(b"stand-in engine bytes")

    def sidecar(lo: int) -> None:
        EngineInfo(metadata=info.to_metadata(), tensorrt_version="10.9.0", gpu_name="NVIDIA H100",
                   compute_capability="9.0", profile={"x_t": [lo, 4, 8], "t": [lo, 4, 8]},
                   onnx_sha256="0" * 64).save(plan)

    sidecar(1)
    configs = write_repository(export, tmp_path / "repo")
    eps = parse(configs["ddpm_eps"])
    assert eps.platform == "tensorrt_plan" and eps.max_batch_size == 8
    assert (tmp_path / "repo" / "ddpm_eps" / "1" / "model.plan").read_bytes() == plan.read_bytes()
    assert parse(configs["ddpm"]).max_batch_size == 8
    onnx_configs = write_repository(export, tmp_path / "repo_onnx", graph="model.onnx")
    assert parse(onnx_configs["ddpm_eps"]).platform == "onnxruntime_onnx"
    sidecar(2)
    with pytest.raises(DDPMError, match="min-batch 1"):
        write_repository(export, tmp_path / "repo2")


def test_the_copied_runtime_imports_alone_without_click_or_benchmarks(repo):
    """The `ddpm` model imports only the modules copied beside it: in a fresh interpreter that cannot see this
    checkout (editable-install finders removed) or import click and torch, request handling and the loop import."""
    loop_dir = repo / "ddpm" / "1"
    files = {p.relative_to(loop_dir).as_posix() for p in loop_dir.rglob("*.py")}
    assert not any("bench" in f or f.endswith("cli.py") or "backends" in f for f in files), sorted(files)
    assert not any("import click" in (loop_dir / f).read_text() for f in files)
    script = (
        "import sys\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('click', 'torch', 'onnx', 'polygraphy'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.path.insert(0, {str(loop_dir)!r})\n"
        "import runtime.serving.sampler, runtime.sampling\n"
        f"assert runtime.__file__.startswith({str(loop_dir)!r}), runtime.__file__\n")
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd=repo,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]

