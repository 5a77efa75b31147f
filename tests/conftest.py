"""Shared fixtures: small real checkpoints made on the spot (no training, no download)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from runtime.schedule import DiffusionConfig  # noqa: E402
from train.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from train.model import UNet, preset_config  # noqa: E402


def make_random_checkpoint(path: Path, preset: str = "tiny", channels: int = 1, image_size: int = 32,
                           diffusion: DiffusionConfig | None = None, seed: int = 0) -> Path:
    """A checkpoint whose EMA weights are random everywhere (zero-initialised layers too), so eps is non-trivial."""
    torch.manual_seed(seed)
    model = UNet(preset_config(preset, image_size, channels))
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.05)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = Checkpoint(model_config=model.config, diffusion_config=diffusion or DiffusionConfig(), ema=state,
                      model=state, data={"dataset": "random", "image_size": image_size, "channels": channels,
                                         "data_range": [-1.0, 1.0]})
    return save_checkpoint(path, ckpt)


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
