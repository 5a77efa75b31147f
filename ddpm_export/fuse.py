"""The fused FP16 graphs: ONNX Runtime's own `unet` transformer optimizer applied to our export, for CUDA.

On a GPU the plain graph spends more time in its many small normalisation, Cast and elementwise kernels than in its
convolutions. onnxruntime.transformers' `unet` optimizer turns each GroupNorm pattern (+ SiLU) into one GroupNorm or
SkipGroupNorm contrib op and each Conv into an NHWC conv. The FP32 graphs are fused first (our FP16 graph keeps the
normalisations in float32 behind Casts, which hides the pattern), then converted with our own FP16 rules
(`ddpm_export.fp16`). The contrib ops exist on CUDA only: the fused graphs are validated there against the FP32 graph
when ONNX Runtime has the CUDA provider, and the report says so when it has not.

Written to `<export>/fused/` as `model.fp16.onnx` (+ `model.fp16.step.onnx`), the names of the runtime's file family,
so `ddpm-run <export>/fused/model.fp16.onnx --provider cuda` runs them with the device step graph.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import onnx

from ddpm_export.fp16 import convert_to_fp16
from ddpm_export.onnx_io import load_onnx, read_info, save_onnx, set_metadata
from runtime.errors import DDPMError
from runtime.fileio import atomic_write_bytes
from runtime.metadata import GRAPH_SUFFIXES

FUSED_DIR = "fused"
FUSION = "onnxruntime-unet"  # the metadata's `ddpm.fused`: which optimizer made the graph


def _drop_float_casts(graph: onnx.GraphProto) -> None:
    """Remove the unnamed Cast-to-float nodes the optimizer puts before each NhwcConv: no-ops in an FP32 graph, but
    the FP16 converter would retype their outputs to float16 and leave `to=float`, which no runtime loads."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    drop = [n for n in graph.node if n.op_type == "Cast" and not n.name
            and next(a.i for a in n.attribute if a.name == "to") == onnx.TensorProto.FLOAT
            and all(c.op_type == "NhwcConv" for c in consumers.get(n.output[0], []))]
    for cast in drop:
        for c in consumers.get(cast.output[0], []):
            c.input[:] = [cast.input[0] if i == cast.output[0] else i for i in c.input]
        graph.node.remove(cast)


def fuse_graph(fp32_path: Path) -> onnx.ModelProto:
    """The fused FP16 model of one FP32 graph, with that graph's metadata (precision fp16, fused marked)."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    info = read_info(load_onnx(fp32_path), str(fp32_path))
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notes (e.g. on the graph's producer name) are not for our users
    try:
        fused = optimizer.optimize_model(str(fp32_path), model_type="unet", opt_level=0, use_gpu=True,
                                         optimization_options=FusionOptions("unet")).model
    finally:
        quiet.setLevel(level)
    _drop_float_casts(fused.graph)
    if not any(o.domain == "com.microsoft" for o in fused.opset_import):
        fused.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    for i, node in enumerate(fused.graph.node):  # the FP16 rules address nodes by name
        node.name = node.name or f"fused_{node.op_type}_{i}"
    half = convert_to_fp16(fused)
    extra = {**info.extra, "fused": FUSION}
    return set_metadata(half, dataclasses.replace(info, precision="fp16", extra=extra))


FUSED_FILES = tuple("model" + GRAPH_SUFFIXES[(kind, "fp16")] for kind in ("eps", "step")) + ("validation.json",)


def check_fused_outputs(export_dir: Path, force: bool) -> None:
    """Refuse, before the export runs, a `fused` that is not a folder and fused outputs that would be overwritten
    unasked."""
    out = Path(export_dir) / FUSED_DIR
    if out.exists() and not out.is_dir():
        raise DDPMError(f"{out} is a file, where the fused graphs' folder goes; move it or choose another "
                        "{opt:out_dir}")
    existing = [name for name in FUSED_FILES if (out / name).exists()]
    if existing and not force:
        raise DDPMError(f"{out} already holds {', '.join(existing)}; pass {{opt:force}} to overwrite or choose "
                        "another {opt:out_dir}")


def fuse_export(export_dir: Path, *, validate: bool = True, max_batch: int = 4) -> dict[str, Path]:
    """Write the fused FP16 eps (and step, where the export has one) graphs into `<export_dir>/fused/` and, with
    `validate`, their report; returns what was written."""
    export_dir = Path(export_dir)
    out = export_dir / FUSED_DIR
    out.mkdir(exist_ok=True)
    written: dict[str, Path] = {}
    for kind in ("eps", "step"):
        source = export_dir / ("model" + GRAPH_SUFFIXES[(kind, "fp32")])
        if not source.is_file():
            if kind == "eps":
                raise DDPMError(f"{export_dir} holds no model.onnx to fuse; export the model first")
            continue
        written[f"fused_{kind}"] = save_onnx(fuse_graph(source), out / ("model" + GRAPH_SUFFIXES[(kind, "fp16")]))
    if validate:
        from ddpm_export.validate import validate_fused

        report = validate_fused(export_dir / "model.onnx", written["fused_eps"], max_batch)
        written["fused_validation"] = atomic_write_bytes(out / "validation.json",
                                                         (json.dumps(report, indent=2) + "\n").encode())
    return written


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each type: what the fusion changed."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
