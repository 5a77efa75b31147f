"""The whole export: model source -> FP32 / FP16 eps and step ONNX -> validation report -> optional TensorRT plan.

The model comes from `train.sources` (our checkpoint, a diffusers folder, an improved-diffusion state dict); nothing
here asks which.

Outputs are staged in a hidden folder inside the output folder and renamed into place together after validation,
so an interrupted run leaves earlier outputs untouched and the report always describes the files beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from ddpm_export import engine as trt_engine
from ddpm_export.fp16 import convert_to_fp16
from ddpm_export.onnx_export import OutputSplit, check_opset, export_module, sample_inputs
from ddpm_export.onnx_io import check_graph, external_data_path, save_onnx, set_metadata
from ddpm_export.step_graph import compose_step_graph, export_update
from ddpm_export.trt_support import tensorrt_readiness
from ddpm_export.validate import Tolerances, failures, validate_export
from runtime.engine_info import sidecar_path
from runtime.errors import DDPMError
from runtime.fileio import blocking_file, check_writable, clear_stale_temps, file_sha256, publish, temp_prefix
from runtime.metadata import GRAPH_SUFFIXES, ModelInfo
from runtime.progress import progress
from runtime.resources import require_memory
from train.sources import SourceModel, load_source

FILENAMES = {key: "model" + GRAPH_SUFFIXES[graph] for key, graph in (
    ("onnx", ("eps", "fp32")), ("fp16", ("eps", "fp16")), ("step", ("step", "fp32")), ("fp16_step", ("step", "fp16")))}
FILENAMES.update(validation="validation.json", plan="model.fp16.plan")
GRAPHS = ("onnx", "fp16", "step", "fp16_step")


class ValidationFailed(DDPMError):
    """The exported graphs do not match the model within tolerance; the report says where."""

    exit_code = 1  # the export ran; bad input is 2


def check_batch_range(min_batch: int, opt_batch: int | None, max_batch: int) -> tuple[int, int, int]:
    """(min, opt, max) of the dynamic batch; opt defaults to max (the batch a sampler usually runs)."""
    if max_batch < 1:
        raise DDPMError(f"{{opt:max_batch}} must be >= 1, got {max_batch}")
    if not 1 <= min_batch <= max_batch:
        raise DDPMError(f"{{opt:min_batch}} must be between 1 and {{opt:max_batch}} ({max_batch}), got {min_batch}")
    opt = max_batch if opt_batch is None else opt_batch
    if not min_batch <= opt <= max_batch:
        raise DDPMError(f"{{opt:opt_batch}} must be between {{opt:min_batch}} ({min_batch}) and {{opt:max_batch}} ({max_batch}), "
                        f"got {opt}")
    return min_batch, opt, max_batch


def planned_outputs(out_dir: Path, fp16: bool, step_graph: bool, validate: bool, engine: bool) -> dict[str, Path]:
    keys = ["onnx"] + ["fp16"] * fp16 + ["step"] * step_graph + ["fp16_step"] * (fp16 and step_graph)
    keys += ["validation"] * validate
    out = {k: out_dir / FILENAMES[k] for k in keys}
    if engine:
        out["plan"] = out_dir / FILENAMES["plan"]
        out["plan_info"] = sidecar_path(out["plan"])
    return out


def _prepare_out_dir(out_dir: Path, targets: dict[str, Path], force: bool) -> None:
    """Create the folder and refuse (before any work) to clobber any of the outputs unasked."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DDPMError(f"{{opt:out_dir}} {out_dir} is a file; give a folder")
    if not out_dir.exists():
        if not out_dir.parent.is_dir():
            blocker = blocking_file(out_dir.parent)
            if blocker is not None:
                raise DDPMError(f"cannot create {out_dir}: {blocker} is a file, not a folder; choose another "
                                "{opt:out_dir}")
            raise DDPMError(f"cannot create {out_dir}: folder {out_dir.parent} does not exist; create it first")
        try:
            out_dir.mkdir()
        except OSError as exc:
            raise DDPMError(f"cannot create {out_dir}: {exc.strerror}; choose another {{opt:out_dir}}") from None
    existing = [p.name for p in targets.values() if p.exists()]
    if existing and not force:
        raise DDPMError(f"{out_dir} already holds {', '.join(existing)}; pass {{opt:force}} to overwrite or choose "
                        "another {opt:out_dir}")
    for path in targets.values():
        check_writable(path, force=True)


def _finish(model: onnx.ModelProto, info: ModelInfo, path: Path) -> Path:
    model = check_graph(set_metadata(model, info), path.name)
    return save_onnx(model, path)


def export_all(source: SourceModel | str | os.PathLike, out_dir: str | os.PathLike, *, fp16: bool = True,
               step_graph: bool = True, max_batch: int = 64, opset: int = 18, validate: bool = True,
               engine: bool | None = None, force: bool = False, min_batch: int = 1,
               opt_batch: int | None = None) -> dict[str, Path]:
    """Export everything from a `SourceModel` (or a path `train.sources.load_source` opens); `engine`: None builds a
    TensorRT plan if TensorRT and a GPU are present, True requires it, False skips it. Returns the written files by
    key (onnx, fp16, step, validation, plan, plan_info)."""
    profile = check_batch_range(min_batch, opt_batch, max_batch)
    check_opset(opset)
    if engine and not fp16:
        raise DDPMError("{opt:engine} builds from the FP16 ONNX; drop {opt:no_fp16}")
    out_dir = Path(out_dir)
    if not isinstance(source, SourceModel):
        source = load_source(source)
    broken = [name for name, p in source.module.state_dict().items()
              if p.is_floating_point() and not bool(p.isfinite().all())]
    if broken:
        raise DDPMError(f"the model's weights hold NaN or inf ({len(broken)} tensors: {', '.join(broken[:3])}"
                        f"{', ...' if len(broken) > 3 else ''}); export a checkpoint from before the run diverged")
    engine_missing = trt_engine.missing_reason() if fp16 and engine is not False else None
    if engine and engine_missing:
        raise DDPMError(f"{{opt:engine}} was requested but {engine_missing}; run without {{opt:engine}} to export the ONNX "
                        "files only")
    base = source.info()
    if validate:  # the validation's largest case holds x_t, noise and a few outputs of the max batch
        require_memory(8 * max_batch * int(np.prod(base.image_shape)) * 4, f"validating {{opt:max_batch}} {max_batch}",
                       "lower {opt:max_batch}")
    targets = planned_outputs(out_dir, fp16, step_graph, validate, fp16 and engine is not False and not engine_missing)
    created = not out_dir.exists()
    _prepare_out_dir(out_dir, targets, force)
    try:
        return _export(source, base, out_dir, targets, replace=force, fp16=fp16, step_graph=step_graph,
                       max_batch=max_batch, opset=opset, validate=validate, engine=engine,
                       engine_missing=engine_missing, profile=profile)
    except BaseException:
        if created:  # a failed first export leaves no empty folder behind (a finished report keeps it)
            clear_stale_temps(out_dir)
            try:
                out_dir.rmdir()
            except OSError:
                pass
        raise


def _export(source: SourceModel, base: ModelInfo, out_dir: Path, targets: dict[str, Path], *, replace: bool,
            fp16: bool, step_graph: bool, max_batch: int, opset: int, validate: bool, engine: bool | None,
            engine_missing: str | None, profile: tuple[int, int, int]) -> dict[str, Path]:
    extra = {**base.extra, "max_batch": str(max_batch), "opset": str(opset), "exporter": "torch.onnx dynamo"}
    eps_info = dataclasses.replace(base, extra=extra)
    model = OutputSplit(source.module, base.image_shape[0], base.outputs)
    T = source.diffusion.num_timesteps
    stages = ["eps"] + ["fp16"] * fp16 + ["step"] * step_graph + ["validate"] * validate
    written: dict[str, Path] = {}
    start = time.perf_counter()
    clear_stale_temps(out_dir)
    with tempfile.TemporaryDirectory(prefix=temp_prefix(out_dir / "export"), dir=out_dir) as tmp, \
            progress(total=len(stages), desc="export", unit="stage") as bar:
        staged = Path(tmp)
        bar.set_postfix_str("FP32 eps graph")
        eps_model = export_module(model, sample_inputs(base.image_shape, T), list(base.outputs), opset)
        _finish(eps_model, eps_info, staged / FILENAMES["onnx"])
        bar.update()
        eps16_model = None
        if fp16:
            bar.set_postfix_str("FP16 eps graph")
            eps16_model = convert_to_fp16(eps_model)
            _finish(eps16_model, dataclasses.replace(eps_info, precision="fp16"), staged / FILENAMES["fp16"])
            bar.update()
        if step_graph:
            bar.set_postfix_str("step graphs")
            step_info = dataclasses.replace(eps_info, kind="step", inputs=("x_t", "t", "noise"),
                                            outputs=("x_prev",))
            update = export_update(source.diffusion, base.image_shape, opset)
            _finish(compose_step_graph(eps_model, update), step_info, staged / FILENAMES["step"])
            if eps16_model is not None:
                _finish(compose_step_graph(eps16_model, update), dataclasses.replace(step_info, precision="fp16"),
                        staged / FILENAMES["fp16_step"])
            bar.update()
        if validate:
            bar.set_postfix_str("validation")
            report = _validation_report(eps_info, model, staged, fp16, step_graph, max_batch)
            report["export_seconds"] = round(time.perf_counter() - start, 2)
            (staged / FILENAMES["validation"]).write_text(json.dumps(report, indent=2))
            bar.update()
        for key in (*GRAPHS, "validation"):
            if key in targets:
                for src in (staged / FILENAMES[key], external_data_path(staged / FILENAMES[key])):
                    if src.exists():  # without --force, a file another export wrote meanwhile is kept
                        publish(src, out_dir / src.name, replace)
                written[key] = targets[key]
    if validate and not report["passed"]:
        raise ValidationFailed(f"validation failed for {', '.join(failures(report))}; see "
                               f"{written['validation']}")
    if validate and not all(r["ready"] for r in report["tensorrt_readiness"].values()):
        tqdm.write(f"warning: not every graph is TensorRT-ready; see {written['validation']}")
    if "plan" in targets:
        written.update(trt_engine.build_engine(written["fp16"], targets["plan"], profile, force=True))
    elif fp16 and engine is None:
        tqdm.write(f"TensorRT engine skipped ({engine_missing}); build it later on a GPU host with "
                   f"`ddpm-export build-engine {written['fp16']}`")
    return written


def _validation_report(info: ModelInfo, model: Any, staged: Path, fp16: bool, step_graph: bool,
                       max_batch: int) -> dict[str, Any]:
    paths = {k: staged / FILENAMES[k] for k in GRAPHS}
    report = validate_export(info, model, paths["onnx"], paths["fp16"] if fp16 else None,
                             paths["step"] if step_graph else None, max_batch, Tolerances(),
                             fp16_step_path=paths["fp16_step"] if fp16 and step_graph else None)
    report["source_sha256"] = info.source_sha256
    report["files"] = {p.name: file_sha256(p) for p in paths.values() if p.exists()}
    report["tensorrt_readiness"] = {p.name: tensorrt_readiness(onnx.load(p, load_external_data=False))
                                    for p in paths.values() if p.exists()}
    return report
