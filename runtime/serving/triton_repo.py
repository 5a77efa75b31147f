"""An export folder -> a model repository for the official Triton Inference Server containers.

    REPO/ddpm_eps/config.pbtxt, 1/model.onnx (onnxruntime backend) or 1/model.plan (tensorrt_plan)
    REPO/ddpm/config.pbtxt, 1/model.py, 1/model_info.json, 1/runtime/ (the modules of this runtime that sampling
    and request handling need: errors, metadata, sampling/, serving/schema.py and sampler.py)

`ddpm_eps` is the eps graph with Triton's dynamic batcher. `ddpm` is a Python-backend (BLS) model with the request
format of `ddpm-serve` (`runtime.serving.schema`): it runs the sampling loop of the copied modules and calls
`ddpm_eps` once per step. It imports that copy rather than carrying its own math, so the repository samples exactly
like `ddpm-run` of the same version, and new samplers come with it; the container's Python needs numpy and tqdm
(`pip install numpy tqdm`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engine_info import EngineInfo
from runtime.errors import DDPMError
from runtime.fileio import staged_folder
from runtime.metadata import GRAPH_SUFFIXES, ModelInfo, external_data_path
from runtime.sampling import DEFAULT_SAMPLER, Chain
from runtime.serving.sampler import call_limit
from runtime.serving.schema import INPUTS, MODEL_NAME, OUTPUT, TRITON_TYPES

EPS_MODEL = "ddpm_eps"
SAMPLER_MODEL = MODEL_NAME
RUNTIME = Path(__file__).resolve().parents[1]  # the runtime package
# What the Python-backend model imports, and nothing else (no backends, commands or click).
COPIED = ("errors.py", "finite.py", "resources.py", "fileio.py", "metadata.py", "progress.py", "sampling",
          "serving/schema.py", "serving/sampler.py")
KINDS = ("gpu", "cpu")
MODEL_PY = Path(__file__).with_name("triton_model.py")


class Enum(str):
    """A protobuf enum value: written without quotes."""


def pbtxt(fields: dict[str, Any], indent: int = 0) -> str:
    """Protobuf text format of nested dicts: dict -> message, list of dicts -> repeated message, list -> [..]."""
    pad, lines = "  " * indent, []
    for key, value in fields.items():
        items = value if isinstance(value, list) and value and isinstance(value[0], dict) else [value]
        for item in items:
            if isinstance(item, dict):
                lines.append(f"{pad}{key} {{\n{pbtxt(item, indent + 1)}{pad}}}")
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
    return "".join(line + "\n" for line in lines)


def _scalar(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def _batcher(max_batch: int, queue_delay_us: int) -> dict[str, Any]:
    preferred = sorted({b for b in (max_batch // 4, max_batch // 2, max_batch) if b >= 1})
    return {"preferred_batch_size": preferred, "max_queue_delay_microseconds": queue_delay_us}


def eps_config(info: ModelInfo, max_batch: int, platform: str, kind: str, instances: int,
               queue_delay_us: int) -> dict[str, Any]:
    """config.pbtxt fields of the eps graph; t is [B] in the graph, [B, 1] on the wire (reshaped)."""
    c, h, w = info.image_shape
    return {
        "name": EPS_MODEL,
        "platform": platform,
        "max_batch_size": max_batch,
        "input": [{"name": info.inputs[0], "data_type": Enum("TYPE_FP32"), "dims": [c, h, w]},
                  {"name": info.inputs[1], "data_type": Enum("TYPE_INT64"), "dims": [1], "reshape": {"shape": []}}],
        "output": [{"name": name, "data_type": Enum("TYPE_FP32"), "dims": [c, h, w]} for name in info.outputs],
        "dynamic_batching": _batcher(max_batch, queue_delay_us),
        "instance_group": [{"count": instances, "kind": Enum(f"KIND_{kind.upper()}")}],
    }


def sampler_config(info: ModelInfo, max_batch: int, instances: int, queue_delay_us: int, sampler: str,
                   steps: str | None, spacing: str | None, eta: float | None, max_model_calls: int | None = None,
                   extra: dict[str, str] | None = None) -> dict[str, Any]:
    """config.pbtxt fields of the Python sampling model (`triton_model.py`): ddpm-serve's request format; `extra`
    parameters name the model ddpm-serve opens in place of BLS calls."""
    def tensor(name: str, kind: str, dims: list[int], optional: bool = False) -> dict[str, Any]:
        return {"name": name, "data_type": Enum(kind), "dims": dims, **({"optional": True} if optional else {})}

    params = {"default_sampler": sampler, "default_steps": steps or "", "default_spacing": spacing or "",
              "default_eta": "" if eta is None else repr(float(eta)),  # "": the model's or sampler's default
              "max_model_calls": "" if max_model_calls is None else str(max_model_calls), **(extra or {})}
    return {
        "name": SAMPLER_MODEL,
        "backend": "python",
        "max_batch_size": max_batch,
        "input": [tensor(i.name, TRITON_TYPES[i.dtype], [1], i.optional) for i in INPUTS],
        "output": [tensor(OUTPUT, TRITON_TYPES[np.float32], list(info.image_shape))],
        "dynamic_batching": _batcher(max_batch, queue_delay_us),
        # The loop is host work between eps calls; CPU instances keep several chains in flight for the GPU model.
        "instance_group": [{"count": instances, "kind": Enum("KIND_CPU")}],
        "parameters": [{"key": k, "value": {"string_value": v}} for k, v in params.items()],
    }


def _eps_source(export_dir: Path, graph: str | None) -> Path:
    """The eps graph to serve: `graph` if given, else the export's TensorRT plan if one was built, else model.onnx."""
    if graph is not None:
        path = Path(graph) if Path(graph).is_absolute() or Path(graph).exists() else export_dir / graph
        if not path.is_file():
            raise DDPMError(f"{path} not found; pass a graph of {export_dir} (model.onnx, model.fp16.onnx, *.plan)")
        return path
    plans = sorted(export_dir.glob("*.plan"))
    if plans:
        return plans[0]
    path = export_dir / ("model" + GRAPH_SUFFIXES[("eps", "fp32")])
    if not path.is_file():
        raise DDPMError(f"{export_dir} holds no model.onnx; run `ddpm-export CKPT --out-dir {export_dir}` first")
    return path


def _graph_info(path: Path) -> tuple[ModelInfo, int | None]:
    """The graph's ModelInfo and, for a plan, its profile's largest batch (a plan needs min batch 1 here)."""
    if path.suffix == ".plan":
        engine = EngineInfo.load(path)
        lo, hi = engine.batch_range
        if lo != 1:
            raise DDPMError(f"{path.name} was built for batches {lo}..{hi}; Triton sends any batch from 1, rebuild "
                            "it with `ddpm-export build-engine --min-batch 1`")
        return engine.model_info(str(path)), hi
    from runtime.backends.onnxruntime_backend import graph_info, open_session

    return graph_info(open_session(path), path), None


def copy_runtime(dest: Path) -> None:
    """The runtime modules the sampling model imports, under `dest` (a package without backends or commands)."""
    dest.mkdir(parents=True)
    (dest / "__init__.py").write_text('"""The part of ddpm-deploy\'s runtime that the `ddpm` model imports."""\n')
    (dest / "serving").mkdir()
    (dest / "serving" / "__init__.py").write_text("")
    for name in COPIED:
        source = RUNTIME / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copyfile(source, dest / name)


def write_repository(export_dir: str | Path, out: str | Path, *, graph: str | None = None, kind: str = "gpu",
                     instances: int = 1, sampler_instances: int = 2, max_batch: int | None = None,
                     queue_delay_us: int = 2000, sampler: str = DEFAULT_SAMPLER, steps: str | None = None,
                     spacing: str | None = None, eta: float | None = None, max_model_calls: int | None = None,
                     force: bool = False) -> dict[str, Path]:
    """Write the repository under `out` (built in a temp folder beside it, then renamed); returns its configs."""
    export_dir, out = Path(export_dir), Path(out)
    if kind not in KINDS:
        raise DDPMError(f"unknown instance kind {kind!r}; use gpu or cpu")
    if instances < 1 or sampler_instances < 1:
        raise DDPMError("instance counts must be >= 1")
    if queue_delay_us < 0:
        raise DDPMError(f"queue delay must be >= 0 microseconds, got {queue_delay_us}")
    if not export_dir.is_dir():
        raise DDPMError(f"export folder {export_dir} not found")
    if out.exists() and not force:
        raise DDPMError(f"{out} already exists; pass {{opt:force}} to replace it or choose another folder")
    source = _eps_source(export_dir, graph)
    info, plan_max = _graph_info(source)
    if info.kind != "eps":
        raise DDPMError(f"{source.name} is a step graph; the repository serves the eps graph (model.onnx)")
    limit = plan_max or int(info.extra.get("max_batch", 64))
    max_batch = limit if max_batch is None else max_batch
    if not 1 <= max_batch <= limit:
        raise DDPMError(f"max batch must lie in 1..{limit} for {source.name}, got {max_batch}")
    default = Chain.build(info.diffusion, sampler, steps, eta, spacing=spacing)  # a bad default fails here, not later
    call_limit(len(default), max_model_calls)
    platform = "tensorrt_plan" if source.suffix == ".plan" else "onnxruntime_onnx"
    configs = {
        EPS_MODEL: eps_config(info, max_batch, platform, kind, instances, queue_delay_us),
        SAMPLER_MODEL: sampler_config(info, max_batch, sampler_instances, queue_delay_us, sampler, steps, spacing, eta,
                                      max_model_calls),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(out) as staging:
        for name, config in configs.items():
            (staging / name / "1").mkdir(parents=True)
            (staging / name / "config.pbtxt").write_text(pbtxt(config))
        eps_dir = staging / EPS_MODEL / "1"
        shutil.copyfile(source, eps_dir / ("model.plan" if source.suffix == ".plan" else "model.onnx"))
        if external_data_path(source).is_file():  # the graph names its data file; keep that name
            shutil.copyfile(external_data_path(source), eps_dir / external_data_path(source).name)
        loop_dir = staging / SAMPLER_MODEL / "1"
        shutil.copyfile(MODEL_PY, loop_dir / "model.py")
        (loop_dir / "model_info.json").write_text(json.dumps(info.to_metadata(), indent=2, sort_keys=True))
        copy_runtime(loop_dir / "runtime")
    return {name: out / name / "config.pbtxt" for name in configs}

