"""ONNX Runtime backend: the eps graph on the CPU provider, or on CUDA with device-resident tensors.

On CUDA, when a step graph (x_t, t, noise -> x_prev, exported beside the eps graph) matches the chain, the whole
update runs on the device: x_t ping-pongs between two device buffers bound once per batch shape, and only t and
the host-drawn noise are copied in per step. Optional CUDA graph capture replays the step for a fixed batch (one
session, and one captured graph per binding, per batch shape). The eps graph serves every other chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from runtime.backends.base import UNBOUNDED, EpsBackend
from runtime.errors import DDPMError
from runtime.metadata import GRAPH_SUFFIXES, ModelInfo
from runtime.sampling import Chain, Stepper

_EP = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# CUDA provider options every session gets; parity checks set {"use_tf32": "0"} to compare with FP32 torch exactly.
CUDA_OPTIONS: dict[str, str] = {}


def open_session(path: Path, provider: str = "cpu", threads: int = 0, cuda_graph: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime session on `provider` (full graph optimisation); an unloadable file is one DDPMError."""
    if provider == "cuda" and _EP["cuda"] not in ort.get_available_providers():
        raise DDPMError("{opt:provider} cuda needs onnxruntime-gpu (and a CUDA GPU); this onnxruntime only has "
                        f"{', '.join(ort.get_available_providers())}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if provider == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from the pip packages or torch, where the system has none
    cuda = {"device_id": "0", "enable_cuda_graph": str(int(cuda_graph)), **CUDA_OPTIONS}
    providers: list[Any] = ([("CUDAExecutionProvider", cuda),
                             "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"])
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own pybind types for unreadable or invalid graphs
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DDPMError(f"{path} is not a loadable ONNX model ({first[:160]})") from None
    if session.get_providers()[0] != _EP[provider]:
        raise DDPMError(f"onnxruntime could not start {_EP[provider]} (got {session.get_providers()}); check the "
                        "CUDA and cuDNN installation")
    return session


def graph_info(session: ort.InferenceSession, path: Path) -> ModelInfo:
    """The graph's ddpm-deploy metadata, checked against its actual inputs and outputs."""
    info = ModelInfo.from_metadata(session.get_modelmeta().custom_metadata_map, str(path))
    names = tuple(i.name for i in session.get_inputs()), tuple(o.name for o in session.get_outputs())
    if names != (info.inputs, info.outputs):
        raise DDPMError(f"{path}: graph I/O {names} does not match its metadata {(info.inputs, info.outputs)}; "
                        "re-export it")
    image = list(info.image_shape)
    want = {"x_t": ("tensor(float)", image), "t": ("tensor(int64)", []), "noise": ("tensor(float)", image),
            "eps": ("tensor(float)", image), "v": ("tensor(float)", image), "x_prev": ("tensor(float)", image)}
    bad = [f"{v.name} {v.type} {v.shape}" for v in (*session.get_inputs(), *session.get_outputs())
           if v.name in want and (v.type != want[v.name][0] or len(v.shape) != 1 + len(want[v.name][1])
                                  or any(isinstance(d, int) and d != w for d, w in zip(v.shape[1:], want[v.name][1])))]
    if bad:
        raise DDPMError(f"{path}: {'; '.join(bad)} do not fit its metadata (image shape {image}, float32 images, "
                        "int64 t); re-export it")
    return info


def _batch_range(session: ort.InferenceSession, info: ModelInfo) -> tuple[int, int]:
    dim = session.get_inputs()[0].shape[0]
    if isinstance(dim, int):
        return dim, dim
    return 1, int(info.extra.get("max_batch", UNBOUNDED))


@dataclass
class _Bound:
    """Device buffers and IO bindings for one batch shape; kept so a captured CUDA graph sees the same addresses."""

    session: ort.InferenceSession
    bindings: list[Any]  # binding i reads buffer i, writes buffer 1 - i (step graph); one binding (eps graph:
    # reads buffer 0, writes eps (and v) to the buffers after it)
    buffers: list[Any]
    t: Any
    noise: Any
    run_options: list[Any]


class OnnxRuntimeBackend(EpsBackend):
    """An eps graph, optionally with a matching step graph used for device-resident DDPM chains."""

    def __init__(self, path: Path, provider: str, threads: int = 0, cuda_graph: bool = False,
                 step_path: Path | None = None):
        self.path, self.provider, self.threads, self.cuda_graph = path, provider, threads, cuda_graph
        self.device = "cuda" if provider == "cuda" else "cpu"
        self.session = open_session(path, provider, threads, cuda_graph)
        self.info = graph_info(self.session, path)
        self.batch_range = _batch_range(self.session, self.info)
        self.step_path = step_path
        self._sessions: dict[tuple[str, int], ort.InferenceSession] = {}
        self._bound: dict[tuple[str, int], _Bound] = {}
        if self.info.kind == "step":
            self.step_info = self.info
            self._sessions[("step", 0)] = self.session
        elif step_path is not None:
            step_session = open_session(step_path, provider, threads, cuda_graph)
            self.step_info = graph_info(step_session, step_path)
            if self.step_info.kind != "step" or self.step_info.source_sha256 != self.info.source_sha256:
                raise DDPMError(f"{step_path} is not the step graph of {path.name}; re-export both together")
            self._sessions[("step", 0)] = step_session
        used = "eps" if self.info.kind == "eps" else "step"
        self.description = (f"onnxruntime {_EP[provider]} {self.info.precision} {path.name}"
                            + (f" + {step_path.name}" if step_path else "") + (" (CUDA graph)" if cuda_graph else "")
                            + ("" if used == "eps" else " (step graph)"))

    def _eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        if self.info.kind != "eps":
            raise DDPMError(f"{self.path.name} is a step graph; it runs full-length DDPM chains with its own "
                            f"variance ({self.info.diffusion.variance_type}) and clipping only; use the eps graph")
        if self.device == "cpu":
            outs = self.session.run(None, {self.info.inputs[0]: x_t, self.info.inputs[1]: t})
            return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)  # eps, v -> [B, 2C, H, W]
        bound = self._bind("eps", len(x_t))
        bound.buffers[0].update_inplace(x_t)
        bound.t.update_inplace(t)
        bound.session.run_with_iobinding(bound.bindings[0], bound.run_options[0])
        outs = [b.numpy() for b in bound.buffers[1:]]  # eps (and v)
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)

    def step_graph_fits(self, chain: Chain) -> bool:
        """A step graph bakes the full schedule, DDPM, and the model's variance type and clipping."""
        info = getattr(self, "step_info", None)
        return info is not None and chain.fits_step_graph(info.diffusion)

    def stepper(self, chain: Chain) -> Stepper:
        if self.step_graph_fits(chain) and (self.info.kind == "step" or self.device == "cuda"):
            return BoundStepStepper(self)
        if self.info.kind == "step":
            raise DDPMError(f"{self.path.name} is a step graph: it runs only full {self.info.diffusion.num_timesteps}"
                            f"-step DDPM chains with variance {self.info.diffusion.variance_type} and clip="
                            f"{'on' if self.info.diffusion.clip_denoised else 'off'}; pass the eps graph "
                            "(model.onnx) for other samplers")
        return super().stepper(chain)

    def _session_for(self, graph: str, batch: int) -> ort.InferenceSession:
        """A CUDA graph is captured per session and shape, so capture mode keeps one session per batch size."""
        key = (graph, batch if self.cuda_graph else 0)
        if key not in self._sessions:
            if graph == "eps" and not self.cuda_graph:
                self._sessions[key] = self.session
            else:
                source = self.path if graph == "eps" or self.info.kind == "step" else self.step_path
                self._sessions[key] = open_session(source, self.provider, self.threads, self.cuda_graph)  # type: ignore
        return self._sessions[key]

    def _bind(self, graph: str, batch: int) -> _Bound:
        """Bind inputs and outputs to device buffers once per (graph, batch) and reuse them on every call."""
        key = (graph, batch)
        if key in self._bound:
            return self._bound[key]
        info = self.info if graph == "eps" else self.step_info
        session = self._session_for(graph, batch)
        shape = (batch, *info.image_shape)
        count = 2 if graph == "step" else 1 + len(info.outputs)  # step: x ping-pong; eps: x_t, eps (and v)
        buf = [ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self.device, 0) for _ in range(count)]
        t = ort.OrtValue.ortvalue_from_numpy(np.zeros(batch, np.int64), self.device, 0)
        noise = (ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self.device, 0) if graph == "step"
                 else None)
        bindings, run_options = [], []
        for i in range(2 if graph == "step" else 1):
            io = session.io_binding()
            io.bind_ortvalue_input(info.inputs[0], buf[i])
            io.bind_ortvalue_input(info.inputs[1], t)
            if graph == "step":
                io.bind_ortvalue_input(info.inputs[2], noise)
                io.bind_ortvalue_output(info.outputs[0], buf[1 - i])
            else:
                for name, value in zip(info.outputs, buf[1:]):
                    io.bind_ortvalue_output(name, value)
            opts = ort.RunOptions()
            if self.cuda_graph:
                opts.add_run_config_entry("gpu_graph_id", str(i))
            bindings.append(io)
            run_options.append(opts)
        self._bound[key] = _Bound(session, bindings, buf, t, noise, run_options)
        return self._bound[key]


class BoundStepStepper:
    """The whole update in the step graph; x_t stays in bound (device) memory between steps."""

    def __init__(self, backend: OnnxRuntimeBackend):
        self.backend = backend

    def start(self, x_T: np.ndarray) -> list[Any]:
        bound = self.backend._bind("step", len(x_T))
        bound.buffers[0].update_inplace(np.ascontiguousarray(x_T, dtype=np.float32))
        return [bound, 0]  # the binding that reads the current x_t

    def step(self, state: list[Any], k: int, t: np.ndarray, noise: np.ndarray) -> list[Any]:
        bound, cur = state
        bound.t.update_inplace(t)
        bound.noise.update_inplace(np.ascontiguousarray(noise, dtype=np.float32))
        bound.session.run_with_iobinding(bound.bindings[cur], bound.run_options[cur])
        return [bound, 1 - cur]

    def finish(self, state: list[Any]) -> np.ndarray:
        bound, cur = state
        return bound.buffers[cur].numpy()


def _siblings(path: Path) -> dict[tuple[str, str], Path]:
    """The export's file family, from any member: model.onnx, model.fp16.onnx, model.step.onnx, model.fp16.step.onnx.
    Suffixes match in any case (MODEL.ONNX); the member given keeps its own name, the others take ours."""
    by_length = sorted(GRAPH_SUFFIXES.items(), key=lambda item: len(item[1]), reverse=True)
    key, suffix = next(((k, s) for k, s in by_length if path.name.lower().endswith(s)), (None, ""))
    if key is None:
        raise DDPMError(f"{path.name} is not an exported graph (no .onnx suffix); pass the model.onnx of an export")
    base = path.name[: -len(suffix)]
    return {**{k: path.with_name(base + s) for k, s in GRAPH_SUFFIXES.items()}, key: path}


def open_onnx(path: Path, provider: str, *, precision: str = "auto", cuda_graph: bool = False,
              threads: int = 0) -> OnnxRuntimeBackend:
    """Open an exported graph, or, given the FP32 eps graph, the member of its family that fits.

    `auto` is FP16 on CUDA when the FP16 eps graph was exported, FP32 on CPU. On CUDA a step graph of the same
    precision beside it is used for device-resident DDPM chains (the eps graph serves the others).
    """
    family = _siblings(path)
    if path != family[("eps", "fp32")]:  # a specific member was named: its own precision
        precision = "fp16" if path in (family[("eps", "fp16")], family[("step", "fp16")]) else "fp32"
    elif precision == "auto":
        precision = "fp16" if provider == "cuda" and family[("eps", "fp16")].is_file() else "fp32"
    if precision == "fp16" and path == family[("eps", "fp32")]:
        path = family[("eps", "fp16")]
        if not path.is_file():
            raise DDPMError(f"{{opt:precision}} fp16 needs {path.name} beside {family[('eps', 'fp32')].name}; export with "
                            "fp16 enabled")
    step = family[("step", precision)]
    use_step = provider == "cuda" and path in (family[("eps", "fp32")], family[("eps", "fp16")]) and step.is_file()
    return OnnxRuntimeBackend(path, provider, threads, cuda_graph, step if use_step else None)
