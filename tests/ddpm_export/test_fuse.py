"""The fused FP16 export (ONNX Runtime's unet optimizer) on the CPU: the graphs are produced with the fusions, carry
our metadata, pass the ONNX checker, and their report says CUDA validation did not run. Running them needs CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")

from ddpm_export.fuse import FUSION, fuse_export, op_counts  # noqa: E402
from ddpm_export.onnx_io import read_info  # noqa: E402


def test_fused_graphs_hold_the_fusions_and_our_metadata(tiny_export_dir: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    for name in ("model.onnx", "model.step.onnx"):
        (export / name).write_bytes((tiny_export_dir / name).read_bytes())
    written = fuse_export(export, validate=True, max_batch=2)
    assert set(written) == {"fused_eps", "fused_step", "fused_validation"}
    plain = op_counts(onnx.load(export / "model.onnx"))
    for key in ("fused_eps", "fused_step"):
        model = onnx.load(written[key])
        onnx.checker.check_model(model)
        fused = op_counts(model)
        norms = fused.get("GroupNorm", 0) + fused.get("SkipGroupNorm", 0)
        assert norms >= 10 and "InstanceNormalization" not in fused and fused.get("NhwcConv", 0) == plain["Conv"]
        assert sum(fused.values()) < sum(plain.values())  # fewer, bigger kernels
        info = read_info(model, str(written[key]))
        assert info.precision == "fp16" and info.extra["fused"] == FUSION
        assert [i.name for i in model.graph.input][:2] == ["x_t", "t"]
        assert all(i.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 for i in model.graph.input)
    report = json.loads(written["fused_validation"].read_text())
    assert report["passed"] is None and "CUDA" in report["reason"]  # this machine's onnxruntime has no CUDA
