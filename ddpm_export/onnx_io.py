"""Reading, checking and atomically writing ONNX files, and stamping them with ddpm-deploy metadata."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from runtime.errors import DDPMError
from runtime.fileio import atomic_write, temp_prefix
from runtime.metadata import ModelInfo, external_data_path

BATCH_DIM = "batch"
_PROTOBUF_LIMIT = 2**31 - 1  # a single protobuf message cannot exceed 2 GB: larger models need external data


def set_metadata(model: onnx.ModelProto, info: ModelInfo) -> onnx.ModelProto:
    """Replace every "ddpm.*" metadata_props entry with `info`'s."""
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith("ddpm.")]
    del model.metadata_props[:]
    for key, value in keep + sorted(info.to_metadata().items()):
        model.metadata_props.add(key=key, value=value)
    return model


def check_graph(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Checker, strict shape inference, and a symbolic batch dimension on every input and output.

    Returns the model with inferred value_info. A failure here is a bug in the exporter, reported in one line.
    """
    try:
        if model.ByteSize() < _PROTOBUF_LIMIT:
            onnx.checker.check_model(model, full_check=True)
            model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise DDPMError(f"{source}: exported graph is invalid ({str(exc).splitlines()[0]})") from None
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].dim_param != BATCH_DIM:
            raise DDPMError(f"{source}: {value.name} has no symbolic batch dimension "
                            f"({[d.dim_param or d.dim_value for d in dims]}); the export specialised the batch")
    return model


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write atomically; a model over 2 GB goes with its weights in `<name>.data`, renamed into place first."""
    path = Path(path)
    if model.ByteSize() < _PROTOBUF_LIMIT:
        external_data_path(path).unlink(missing_ok=True)
        return atomic_write(path, lambda f: f.write(model.SerializeToString()))
    data = external_data_path(path)
    with tempfile.TemporaryDirectory(prefix=temp_prefix(path), dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        onnx.save_model(model, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        os.replace(Path(tmp) / data.name, data)
        os.replace(staged, path)
    return path


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise DDPMError(f"ONNX file {path} not found; export one with `ddpm-export SOURCE` first")
    try:
        return onnx.load(path)
    except Exception as exc:  # protobuf raises assorted types for foreign bytes
        raise DDPMError(f"{path} is not a readable ONNX file ({type(exc).__name__}); pass a file written by "
                        "ddpm-export") from None


def read_info(model: onnx.ModelProto, source: str) -> ModelInfo:
    return ModelInfo.from_metadata({p.key: p.value for p in model.metadata_props}, source)


def default_opset(model: onnx.ModelProto) -> int | None:
    """The model's version of the default ONNX domain ("" or "ai.onnx"), None if it imports none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
