"""Numerical validation of the exported graphs with Polygraphy's Comparator.

Comparisons on the same seeded inputs (batch sizes 1, 3 and the max; timesteps 0, T/2, T-1; x_t scaled x5 for
large activations): eager PyTorch vs FP32 ONNX Runtime, FP16 vs FP32 ONNX Runtime, each step graph vs NumPy
`runtime.sampling.steps.ddpm_step` applied to the output of the eps graph of its precision (checks the float32 update
exactly), and the FP16 step graph vs the FP32 one (the FP16 error as a sampler sees it).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy import comparator as pg_comparator
from polygraphy.comparator import Comparator
from polygraphy.logger import G_LOGGER

from runtime.backends.onnxruntime_backend import open_session
from runtime.metadata import ModelInfo
from runtime.progress import progress
from runtime.sampling.schedule import Schedule
from runtime.sampling.steps import DDPMCoefficients, ddpm_step

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class Tolerances:
    """eps is noise-like (zero mean, unit scale, many values near 0), so relative error per element is meaningless:
    absolute bounds decide (Polygraphy's rtol is set to 0), plus the relative L2 norm for FP16."""

    fp32_max_abs: float = 1e-4  # eager vs FP32 ONNX, worst element
    fp16_mean_abs: float = 1e-2  # FP16 vs FP32 ONNX, mean over elements
    fp16_rel_l2: float = 1e-2  # FP16 vs FP32 ONNX, ||a - b|| / ||b||
    step_max_abs: float = 1e-4  # step graph vs NumPy ddpm_step on the same precision's eps, worst element


@dataclass
class Case:
    name: str
    t: list[int]
    input_scale: float
    results: dict[str, dict[str, float | bool]] = field(default_factory=dict)


class FunctionRunner(BaseRunner):
    """A Polygraphy runner around a Python function (the eager torch model, the NumPy reference step)."""

    def __init__(self, name: str, fn: Callable[[Feed], Feed], inputs: dict[str, tuple[Any, list]]):
        super().__init__(name=name)
        self.fn, self.inputs = fn, inputs

    def activate_impl(self) -> None:
        pass

    def deactivate_impl(self) -> None:
        pass

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata()
        for name, (dtype, shape) in self.inputs.items():
            meta.add(name, dtype, shape)
        return meta

    def infer_impl(self, feed_dict: Feed) -> Feed:
        start = time.perf_counter()
        out = {k: np.array(v, dtype=np.float32, copy=True) for k, v in self.fn(feed_dict).items()}
        self.inference_time = time.perf_counter() - start
        return out


def make_cases(info: ModelInfo, max_batch: int, seed: int = 0) -> tuple[list[Case], list[Feed]]:
    """Seeded inputs covering batch 1, 3 and max, t = 0, T/2, T-1, and a large-activation case."""
    T = info.diffusion.num_timesteps
    rng = np.random.default_rng(seed)
    specs = [("b1_t0", [0], 1.0), ("b1_tmid", [T // 2], 1.0), ("b1_tlast", [T - 1], 1.0)]
    if max_batch >= 3:
        specs.append(("b3_mixed", [0, T // 2, T - 1], 1.0))
    if max_batch > 3:
        specs.append((f"b{max_batch}_spread", np.linspace(0, T - 1, max_batch).round().astype(int).tolist(), 1.0))
    specs.append(("x5_large", [0, T - 1][:max_batch] if max_batch >= 2 else [T - 1], 5.0))
    cases, feeds = [], []
    for name, t, scale in specs:
        shape = (len(t), *info.image_shape)
        feeds.append({"x_t": (scale * rng.standard_normal(shape)).astype(np.float32),
                      "t": np.asarray(t, dtype=np.int64),
                      "noise": rng.standard_normal(shape).astype(np.float32)})
        cases.append(Case(name, list(t), scale))
    return cases, feeds


def _rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm((a - ref).ravel()) / max(np.linalg.norm(ref.ravel()), 1e-12))


def _accuracy(results: Any, pair: tuple[int, int], atol: float, stat: str, output: str) -> dict[str, Any]:
    """Polygraphy's verdict and error statistics for one runner pair of one Comparator.run."""
    simple = getattr(pg_comparator, "SimpleCompareFunc", None) or pg_comparator.CompareFunc.simple  # < 0.53
    accuracy = Comparator.compare_accuracy(results, comparisons=[pair],
                                           compare_func=simple(atol=atol, rtol=0.0, check_error_stat=stat))[0]
    outcome = next(iter(accuracy.values()))[0][output]
    return {"max_abs": outcome.max_absdiff, "mean_abs": outcome.mean_absdiff, "passed": bool(outcome)}


def _fp16_accuracy(results: Any, pair: tuple[int, int], names: tuple[str, str], output: str,
                   tol: Tolerances) -> dict[str, Any]:
    """FP16 vs FP32: mean absolute error and relative L2 norm, both within the FP16 tolerances."""
    res = _accuracy(results, pair, tol.fp16_mean_abs, "mean", output)
    out16, ref = (results[name][0][output] for name in names)
    res["rel_l2"] = _rel_l2(out16, ref)
    res["passed"] = bool(res["passed"] and res["rel_l2"] <= tol.fp16_rel_l2)
    return res


def validate_export(info: ModelInfo, model: torch.nn.Module, onnx_path: Path, fp16_path: Path | None,
                    step_path: Path | None, max_batch: int, tol: Tolerances = Tolerances(), *,
                    fp16_step_path: Path | None = None) -> dict[str, Any]:
    """Run every comparison; return the report (JSON-ready) with per-case errors and an overall verdict.

    The FP16 step graph is compared only together with the FP16 eps graph and the FP32 step graph."""
    cases, feeds = make_cases(info, max_batch)
    image = list(info.image_shape)
    eps_inputs = {"x_t": (np.float32, ["batch", *image]), "t": (np.int64, ["batch"])}

    outputs = list(info.outputs)  # eps, and v for learned-variance models

    def eager(feed: Feed) -> Feed:
        with torch.no_grad():
            out = model(torch.from_numpy(feed["x_t"]), torch.from_numpy(feed["t"]))
        return dict(zip(outputs, (o.numpy() for o in (out if isinstance(out, tuple) else (out,)))))

    fp32_sess = open_session(onnx_path)
    coeff = DDPMCoefficients.tables(Schedule.from_config(info.diffusion), info.diffusion.variance_type)
    clip = info.diffusion.clip_range if info.diffusion.clip_denoised else None

    def numpy_step(eps_sess: ort.InferenceSession) -> Callable[[Feed], Feed]:
        def run(feed: Feed) -> Feed:
            out = [o.astype(np.float64) for o in eps_sess.run(outputs, {"x_t": feed["x_t"], "t": feed["t"]})]
            c = DDPMCoefficients(*(np.asarray(v)[feed["t"]].reshape(-1, 1, 1, 1) for v in asdict(coeff).values()))
            return {"x_prev": ddpm_step(feed["x_t"].astype(np.float64), out[0], feed["noise"].astype(np.float64), c,
                                        clip, out[1] if len(out) > 1 else None)}
        return run

    eps_runners: list[BaseRunner] = [FunctionRunner("pytorch-eager", eager, eps_inputs),
                                     OnnxrtRunner(fp32_sess, name="onnxrt-fp32")]
    fp16_sess = open_session(fp16_path) if fp16_path is not None else None
    if fp16_sess is not None:
        eps_runners.append(OnnxrtRunner(fp16_sess, name="onnxrt-fp16"))
    step_runners: list[BaseRunner] = []
    step_inputs = {**eps_inputs, "noise": (np.float32, ["batch", *image])}
    if step_path is not None:
        step_runners = [OnnxrtRunner(open_session(step_path), name="onnxrt-step"),
                        FunctionRunner("numpy-ddpm_step", numpy_step(fp32_sess), step_inputs)]
    if fp16_step_path is not None and fp16_sess is not None and step_runners:
        step_runners += [OnnxrtRunner(open_session(fp16_step_path), name="onnxrt-fp16-step"),
                         FunctionRunner("numpy-ddpm_step-fp16-eps", numpy_step(fp16_sess), step_inputs)]
    fp16_step = len(step_runners) == 4  # the FP16 pair follows the FP32 pair

    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        for case, feed in zip(progress(cases, desc="validating", unit="case", leave=False), feeds):
            eps_feed = {"x_t": feed["x_t"], "t": feed["t"]}
            results = Comparator.run(eps_runners, data_loader=[eps_feed])
            for name in outputs:  # eps checks keep their names; v's are suffixed
                tag = "" if name == "eps" else f"_{name}"
                case.results[f"eager_vs_fp32{tag}"] = _accuracy(results, (0, 1), tol.fp32_max_abs, "max", name)
                if fp16_sess is not None:
                    case.results[f"fp16_vs_fp32{tag}"] = _fp16_accuracy(
                        results, (1, 2), ("onnxrt-fp16", "onnxrt-fp32"), name, tol)
            if step_runners:
                results = Comparator.run(step_runners, data_loader=[feed])
                case.results["step_vs_numpy"] = _accuracy(results, (0, 1), tol.step_max_abs, "max", "x_prev")
            if fp16_step:
                case.results["fp16_step_vs_numpy"] = _accuracy(results, (2, 3), tol.step_max_abs, "max", "x_prev")
                case.results["fp16_step_vs_fp32_step"] = _fp16_accuracy(
                    results, (0, 2), ("onnxrt-fp16-step", "onnxrt-step"), "x_prev", tol)

    def worst(check: str, key: str) -> float | None:
        values = [c.results[check][key] for c in cases if check in c.results]
        return max(values) if values else None

    passed = all(r["passed"] for c in cases for r in c.results.values())
    return {
        "passed": passed,
        "tolerances": asdict(tol),
        "summary": {"eager_vs_fp32_max_abs": worst("eager_vs_fp32", "max_abs"),
                    "eager_vs_fp32_v_max_abs": worst("eager_vs_fp32_v", "max_abs"),
                    "fp16_vs_fp32_v_rel_l2": worst("fp16_vs_fp32_v", "rel_l2"),
                    "fp16_vs_fp32_rel_l2": worst("fp16_vs_fp32", "rel_l2"),
                    "fp16_vs_fp32_max_abs": worst("fp16_vs_fp32", "max_abs"),
                    "step_vs_numpy_max_abs": worst("step_vs_numpy", "max_abs"),
                    "fp16_step_vs_numpy_max_abs": worst("fp16_step_vs_numpy", "max_abs"),
                    "fp16_step_vs_fp32_step_rel_l2": worst("fp16_step_vs_fp32_step", "rel_l2"),
                    "fp16_step_vs_fp32_step_max_abs": worst("fp16_step_vs_fp32_step", "max_abs")},
        "cases": [asdict(c) for c in cases],
    }


def failures(report: dict[str, Any]) -> list[str]:
    """'case/check' names that failed, for the one-line error."""
    return [f"{c['name']}/{check}" for c in report["cases"] for check, r in c["results"].items() if not r["passed"]]


def validate_fused(info_path: Path, fused_path: Path, max_batch: int, tol: Tolerances = Tolerances()) -> dict[str, Any]:
    """The fused FP16 eps graph against the FP32 graph, both on ONNX Runtime's CUDA provider (the fused contrib ops
    run nowhere else), with the FP16 tolerances; without that provider the report says it was not run."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"passed": None, "reason": "not validated: needs onnxruntime-gpu and a CUDA GPU (the fused ops run on "
                                          "CUDA only)"}
    from ddpm_export.onnx_io import load_onnx, read_info

    info = read_info(load_onnx(info_path), str(info_path))
    cases, feeds = make_cases(info, max_batch)
    runners = [OnnxrtRunner(open_session(info_path, "cuda"), name="onnxrt-cuda-fp32"),
               OnnxrtRunner(open_session(fused_path, "cuda"), name="onnxrt-cuda-fused-fp16")]
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        for case, feed in zip(cases, feeds):
            results = Comparator.run(runners, data_loader=[{"x_t": feed["x_t"], "t": feed["t"]}])
            for name in info.outputs:
                case.results[f"fused_vs_fp32_{name}"] = _fp16_accuracy(
                    results, (0, 1), ("onnxrt-cuda-fused-fp16", "onnxrt-cuda-fp32"), name, tol)
    return {"passed": all(r["passed"] for c in cases for r in c.results.values()), "tolerances": asdict(tol),
            "cases": [asdict(c) for c in cases]}

