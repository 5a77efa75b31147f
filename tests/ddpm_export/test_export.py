"""Export pipeline on the tiny preset: graphs, metadata, FP16 precision islands, step graphs, validation report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import make_random_checkpoint
from ddpm_export import onnx_io
from ddpm_export.fp16 import convert_to_fp16
from ddpm_export.onnx_io import read_info, save_onnx
from ddpm_export.pipeline import export_all
from ddpm_export.trt_support import tensorrt_readiness
from ddpm_export.validate import failures, validate_export
from runtime.backends.onnxruntime_backend import open_session
from runtime.errors import DDPMError
from runtime.fileio import file_sha256
from runtime.sampling.schedule import DiffusionConfig, Schedule
from runtime.sampling.steps import DDPMCoefficients, ddpm_step
from train.checkpoint import load_checkpoint, random_checkpoint, save_checkpoint


def _inputs(batch: int, t: list[int], seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x_t": rng.standard_normal((batch, 1, 32, 32)).astype(np.float32), "t": np.array(t, dtype=np.int64)}


def test_every_graph_is_self_describing(tiny_export_dir: Path, tiny_checkpoint: Path) -> None:
    sha = file_sha256(tiny_checkpoint)
    expected = {"model.onnx": ("eps", "fp32", ("x_t", "t"), ("eps",)),
                "model.fp16.onnx": ("eps", "fp16", ("x_t", "t"), ("eps",)),
                "model.step.onnx": ("step", "fp32", ("x_t", "t", "noise"), ("x_prev",)),
                "model.fp16.step.onnx": ("step", "fp16", ("x_t", "t", "noise"), ("x_prev",))}
    for name, (kind, precision, inputs, outputs) in expected.items():
        model = onnx.load(tiny_export_dir / name)
        info = read_info(model, name)
        assert (info.kind, info.precision, info.inputs, info.outputs) == (kind, precision, inputs, outputs)
        assert info.source_sha256 == sha and info.image_shape == (1, 32, 32)
        assert info.diffusion == DiffusionConfig() and info.extra["max_batch"] == "4"
        assert [i.name for i in model.graph.input] == list(inputs)
        assert [o.name for o in model.graph.output] == list(outputs)
        for value in list(model.graph.input) + list(model.graph.output):
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
            assert value.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)


@pytest.mark.parametrize("batch", [1, 3, 6])
def test_fp32_graph_matches_eager_for_any_batch(tiny_export_dir: Path, tiny_checkpoint: Path, batch: int) -> None:
    feed = _inputs(batch, list(np.linspace(0, 999, batch).astype(int)))
    eps = open_session(tiny_export_dir / "model.onnx").run(["eps"], feed)[0]
    with torch.no_grad():
        ref = load_checkpoint(tiny_checkpoint).ema_model()(torch.from_numpy(feed["x_t"]), torch.from_numpy(feed["t"]))
    assert eps.shape == (batch, 1, 32, 32)
    assert np.abs(eps - ref.numpy()).max() <= 1e-4
    assert ref.std() > 0.05  # a non-trivial output, so the comparison means something


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return types


def test_fp16_graph_keeps_sensitive_ops_in_float32(tiny_export_dir: Path) -> None:
    model = onnx.load(tiny_export_dir / "model.fp16.onnx")
    types = _elem_types(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert any(n.op_type == "Conv" and types[n.input[1]] == onnx.TensorProto.FLOAT16 for n in model.graph.node)
    for node in model.graph.node:
        if node.op_type in ("InstanceNormalization", "Softmax", "Sin", "Cos"):
            assert types[node.input[0]] == onnx.TensorProto.FLOAT, node.name
    # the whole path from t to sin/cos stays exact: no float16 tensor on it (t * freq reaches 999 radians)
    seen, todo = set(), [n.input[0] for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    while todo:
        name = todo.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        assert types[name] != onnx.TensorProto.FLOAT16, name
        if name in producer:
            todo.extend(producer[name].input)
    assert "t" in seen


def test_fp16_stays_close_to_fp32_at_extreme_timesteps(tiny_export_dir: Path) -> None:
    fp32, fp16 = open_session(tiny_export_dir / "model.onnx"), open_session(tiny_export_dir / "model.fp16.onnx")
    for t in (0, 1, 998, 999):
        feed = _inputs(2, [t, t], seed=t)
        feed["x_t"] *= 5.0
        a, b = fp32.run(["eps"], feed)[0], fp16.run(["eps"], feed)[0]
        assert b.dtype == np.float32
        assert np.linalg.norm(b - a) / np.linalg.norm(a) <= 1e-2


def test_fp16_conversion_removes_lossy_round_trips(tiny_export_dir: Path) -> None:
    model = onnx.load(tiny_export_dir / "model.onnx")
    half = convert_to_fp16(model)
    onnx.checker.check_model(half, full_check=True)
    producer = {o: n for n in half.graph.node for o in n.output}
    for node in half.graph.node:  # no Cast(float32) directly reads a Cast(float16)
        if node.op_type == "Cast" and node.attribute[0].i == onnx.TensorProto.FLOAT and node.input[0] in producer:
            inner = producer[node.input[0]]
            assert not (inner.op_type == "Cast" and inner.attribute[0].i == onnx.TensorProto.FLOAT16)
    assert len(model.metadata_props) == len(half.metadata_props)  # the input model is left untouched


def _update_tables(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The initializers the step update Gathers by t: the schedule tables."""
    weights = {i.name: i for i in model.graph.initializer}
    return {n.input[0]: weights[n.input[0]] for n in model.graph.node
            if n.op_type == "Gather" and n.input[0] in weights and len(weights[n.input[0]].dims) == 1}


def test_fp16_step_graph_keeps_the_update_in_float32(tiny_export_dir: Path) -> None:
    """Float16 tables would put sqrt(1/ac) ~ 157 and sqrt(1/ac - 1) in x0 = a x_t - b eps with 3-digit precision."""
    model = onnx.load(tiny_export_dir / "model.fp16.step.onnx")
    types = _elem_types(model)
    tables = _update_tables(model)
    diffusion = read_info(model, "model.fp16.step.onnx").diffusion
    expected = DDPMCoefficients.tables(Schedule.from_config(diffusion), diffusion.variance_type)
    fixed_variance = ("sqrt_recip_ac", "sqrt_recipm1_ac", "mean_coef1", "mean_coef2", "noise_scale")
    assert len(tables) == len(fixed_variance)  # the learned-range tables are not in a fixed-variance graph
    assert {onnx.numpy_helper.to_array(w).astype(np.float64).tobytes() for w in tables.values()} == {
        np.asarray(getattr(expected, n), dtype=np.float32).astype(np.float64).tobytes() for n in fixed_variance}
    assert all(w.data_type == onnx.TensorProto.FLOAT for w in tables.values())
    downstream = set(tables)  # every tensor computed from the tables, up to x_prev: the update, all float32
    for node in model.graph.node:  # nodes are in topological order
        if downstream.intersection(node.input):
            downstream.update(node.output)
            assert all(types[o] == onnx.TensorProto.FLOAT for o in node.output), node.name
    assert "x_prev" in downstream and len(downstream) > 15
    assert any(types[n.input[1]] == onnx.TensorProto.FLOAT16 for n in model.graph.node if n.op_type == "Conv")


@pytest.mark.parametrize("batch", [1, 3])
def test_fp16_step_graph_matches_numpy_step_on_its_eps(tiny_export_dir: Path, batch: int) -> None:
    step16 = open_session(tiny_export_dir / "model.fp16.step.onnx")
    eps16 = open_session(tiny_export_dir / "model.fp16.onnx")
    step32 = open_session(tiny_export_dir / "model.step.onnx")
    diffusion = read_info(onnx.load(tiny_export_dir / "model.fp16.step.onnx"), "step").diffusion
    tables = DDPMCoefficients.tables(Schedule.from_config(diffusion), diffusion.variance_type)
    for t in (0, 500, 999):
        feed = _inputs(batch, [t] * batch, seed=t)
        feed["x_t"] *= 3.0
        feed["noise"] = np.random.default_rng(t + 1).standard_normal(feed["x_t"].shape).astype(np.float32)
        x16 = step16.run(["x_prev"], feed)[0]
        assert x16.dtype == np.float32 and x16.shape == (batch, 1, 32, 32)
        eps = eps16.run(["eps"], {"x_t": feed["x_t"], "t": feed["t"]})[0].astype(np.float64)
        c = DDPMCoefficients(*(np.asarray(v)[feed["t"]].reshape(-1, 1, 1, 1) for v in vars(tables).values()))
        ref = ddpm_step(feed["x_t"].astype(np.float64), eps, feed["noise"].astype(np.float64), c, True)
        assert np.abs(x16 - ref).max() <= 1e-4, t
        x32 = step32.run(["x_prev"], feed)[0]
        assert 0 < np.linalg.norm(x16 - x32) / np.linalg.norm(x32) <= 1e-2, t  # FP16 UNet inside, so not equal


def test_validation_report_passes_and_records_errors(tiny_export_dir: Path) -> None:
    report = json.loads((tiny_export_dir / "validation.json").read_text())
    assert report["passed"] and not failures(report)
    ts = {t for case in report["cases"] for t in case["t"]}
    batches = {len(case["t"]) for case in report["cases"]}
    assert {0, 500, 999} <= ts and {1, 3, 4} <= batches
    assert any(case["input_scale"] == 5.0 for case in report["cases"])
    summary = report["summary"]
    assert 0 < summary["eager_vs_fp32_max_abs"] <= 1e-4
    assert 0 < summary["fp16_vs_fp32_rel_l2"] <= 1e-2
    assert summary["step_vs_numpy_max_abs"] <= 1e-4 and summary["fp16_step_vs_numpy_max_abs"] <= 1e-4
    assert 0 < summary["fp16_step_vs_fp32_step_rel_l2"] <= 1e-2
    assert all("fp16_step_vs_numpy" in case["results"] for case in report["cases"])
    assert set(report["tensorrt_readiness"]) == {"model.onnx", "model.fp16.onnx", "model.step.onnx",
                                                 "model.fp16.step.onnx"}
    assert all(r["ready"] for r in report["tensorrt_readiness"].values())
    assert report["files"]["model.onnx"] == file_sha256(tiny_export_dir / "model.onnx")


def test_validation_detects_a_model_that_differs(tiny_export_dir: Path, tiny_checkpoint: Path) -> None:
    ckpt = load_checkpoint(tiny_checkpoint)
    model = ckpt.ema_model()
    with torch.no_grad():
        model.conv_out.bias.add_(1e-3)  # a shift far below what eyes see, far above the 1e-4 tolerance
    info = read_info(onnx.load(tiny_export_dir / "model.onnx"), "model.onnx")
    report = validate_export(info, model, tiny_export_dir / "model.onnx", None, None, max_batch=1)
    assert not report["passed"]
    assert all(c["results"]["eager_vs_fp32"]["max_abs"] == pytest.approx(1e-3, rel=0.05) for c in report["cases"])
    assert "b1_t0/eager_vs_fp32" in failures(report)


@pytest.fixture(scope="module")
def cosine_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Step graph of a checkpoint with non-default diffusion settings: tables must follow the checkpoint."""
    root = tmp_path_factory.mktemp("cosine")
    diffusion = DiffusionConfig(schedule="cosine", num_timesteps=100, variance_type="fixed_small",
                                clip_denoised=False)
    ckpt = make_random_checkpoint(root / "cos.pt", diffusion=diffusion, seed=3)
    export_all(ckpt, root / "out", fp16=False, step_graph=True, max_batch=2, engine=False)
    return root / "out"


def test_step_graph_follows_the_checkpoints_schedule(cosine_export: Path) -> None:
    assert json.loads((cosine_export / "validation.json").read_text())["passed"]
    step, eps_sess = open_session(cosine_export / "model.step.onnx"), open_session(cosine_export / "model.onnx")
    diffusion = read_info(onnx.load(cosine_export / "model.step.onnx"), "step").diffusion
    tables = DDPMCoefficients.tables(Schedule.from_config(diffusion), diffusion.variance_type)
    feed = _inputs(3, [0, 50, 99])
    rng = np.random.default_rng(7)
    n1, n2 = (rng.standard_normal((3, 1, 32, 32)).astype(np.float32) for _ in range(2))
    x1 = step.run(["x_prev"], {**feed, "noise": n1})[0]
    x2 = step.run(["x_prev"], {**feed, "noise": n2})[0]
    scale = tables.noise_scale[feed["t"]].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(x1 - x2, scale * (n1 - n2), atol=1e-5)  # noise scale per t, zero at t = 0
    assert np.array_equal(x1[0], x2[0])
    eps = eps_sess.run(["eps"], feed)[0]
    c = {k: getattr(tables, k)[feed["t"]].reshape(-1, 1, 1, 1) for k in ("sqrt_recip_ac", "sqrt_recipm1_ac",
                                                                          "mean_coef1", "mean_coef2")}
    x0 = c["sqrt_recip_ac"] * feed["x_t"] - c["sqrt_recipm1_ac"] * eps  # no clipping in this checkpoint
    assert np.abs(x0).max() > 1.0  # so clipping would have changed the result
    np.testing.assert_allclose(x1, c["mean_coef1"] * x0 + c["mean_coef2"] * feed["x_t"] + scale * n1, atol=1e-4)


def test_readiness_flags_unsupported_ops_and_dynamic_dims() -> None:
    from onnx import helper

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "h"])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "h"])
    nodes = [helper.make_node("Unique", ["x"], ["u"]), helper.make_node("Relu", ["x"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    report = tensorrt_readiness(model)
    assert not report["ready"]
    assert report["unsupported_ops"] == ["Unique"]
    assert set(report["non_batch_dynamic_io"]) == {"x", "y"}


def test_large_models_are_saved_with_external_data(tiny_export_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_io, "_PROTOBUF_LIMIT", 1000)  # treat the tiny model as "over 2 GB"
    path = save_onnx(onnx.load(tiny_export_dir / "model.onnx"), tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx.data").stat().st_size > 100_000  # the weights went there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]  # no temp left behind
    feed = _inputs(2, [0, 999])
    np.testing.assert_array_equal(open_session(path).run(["eps"], feed)[0],
                                  open_session(tiny_export_dir / "model.onnx").run(["eps"], feed)[0])


def test_existing_outputs_are_never_half_overwritten(tiny_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "model.step.onnx").write_bytes(b"keep me")
    with pytest.raises(DDPMError, match="pass force to overwrite"):
        export_all(tiny_checkpoint, tmp_path, max_batch=2, engine=False)
    assert (tmp_path / "model.step.onnx").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.step.onnx"]


def test_patch_stem_model_exports_and_validates(tmp_path: Path) -> None:
    """The quickstart's `fast` preset (2 x 2 pixel patches folded into channels) traces to graphs that pass the
    same validation and give eager's eps, at MNIST's own 28 x 28."""
    ckpt = save_checkpoint(tmp_path / "fast.pt", random_checkpoint("fast", 1, 28))
    files = export_all(ckpt, tmp_path / "export", fp16=True, step_graph=True, max_batch=3, engine=False)
    assert json.loads(files["validation"].read_text())["passed"]
    rng = np.random.default_rng(2)
    feed = {"x_t": rng.standard_normal((3, 1, 28, 28)).astype(np.float32), "t": np.array([0, 400, 999])}
    eps = open_session(files["onnx"]).run(["eps"], feed)[0]
    with torch.no_grad():
        ref = load_checkpoint(ckpt).ema_model()(torch.from_numpy(feed["x_t"]), torch.from_numpy(feed["t"])).numpy()
    assert ref.std() > 0.05 and np.abs(eps - ref).max() <= 1e-4
