"""Shared fixtures: small real checkpoints made on the spot (no training, no download)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from runtime.sampling.schedule import DiffusionConfig  # noqa: E402
from train.checkpoint import random_checkpoint, save_checkpoint  # noqa: E402


def make_random_checkpoint(path: Path, preset: str = "tiny", channels: int = 1, image_size: int = 32,
                           diffusion: DiffusionConfig | None = None, seed: int = 0) -> Path:
    """Write `train.checkpoint.random_checkpoint(...)` to `path`."""
    return save_checkpoint(path, random_checkpoint(preset, channels, image_size, diffusion, seed))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny preset, 1 x 32 x 32, linear schedule with T = 1000, random weights."""
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ddpm-export` run on `tiny_checkpoint`: model.onnx, model.fp16.onnx, model.step.onnx, model.fp16.step.onnx
    and a passing validation.json (batches 1..4), no TensorRT plan. Read-only: the whole session shares it."""
    from ddpm_export.pipeline import export_all

    out = tmp_path_factory.mktemp("export")
    export_all(tiny_checkpoint, out, fp16=True, step_graph=True, max_batch=4, validate=True, engine=False)
    return out


def cheap_model(path: Path, shape: tuple[int, int, int] = (1, 32, 32), metadata: bool = True) -> Path:
    """An eps graph that costs nothing to run: eps = 0.5 * x_t, with a free batch dimension (and, unless told
    otherwise, ddpm-deploy metadata)."""
    import onnx
    from onnx import TensorProto, helper

    from runtime.metadata import ModelInfo

    x = helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["B", *shape])
    t = helper.make_tensor_value_info("t", TensorProto.INT64, ["B"])
    eps = helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["B", *shape])
    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    graph = helper.make_graph([helper.make_node("Mul", ["x_t", "half"], ["eps"])], "cheap", [x, t], [eps], [half])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    info = ModelInfo(diffusion=DiffusionConfig(), image_shape=shape)
    for key, value in (info.to_metadata() if metadata else {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path
