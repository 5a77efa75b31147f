"""The step graph, x_t, t, noise -> x_prev, as an eps graph joined to a small float32 update graph.

The update is `runtime.sampling.steps.ddpm_step` itself, traced with torch tensors, with the tables that
`DDPMCoefficients.tables` builds from the checkpoint's schedule: export adds no math of its own. Building the step
graph by composition lets the FP32 and FP16 step graphs share one update, kept in float32 either way: in float16,
x_0 = sqrt(1/ac) x_t - sqrt(1/ac - 1) eps (both coefficients near 157 at t = 999) loses x_0 to cancellation.
"""

from __future__ import annotations

import dataclasses

import onnx
import torch
from onnx import compose
from torch import nn

from ddpm_export.onnx_export import export_module, sample_inputs
from ddpm_export.onnx_io import default_opset
from runtime.errors import DDPMError
from runtime.metadata import eps_outputs
from runtime.sampling.schedule import DiffusionConfig, Schedule
from runtime.sampling.steps import DDPMCoefficients, ddpm_step

TABLES = tuple(f.name for f in dataclasses.fields(DDPMCoefficients))
UPDATE_PREFIX = "update/"  # on the update graph's inner names, so they never clash with the eps graph's


class UpdateModule(nn.Module):
    """Inputs x_t [B,C,H,W], t int64 [B] (original timestep indices), noise, eps [B,C,H,W] (and v for
    learned-variance models); output x_prev."""

    def __init__(self, diffusion: DiffusionConfig):
        super().__init__()
        self.clip = diffusion.clip_range if diffusion.clip_denoised else None
        tables = DDPMCoefficients.tables(Schedule.from_config(diffusion), diffusion.variance_type)
        for name in TABLES:  # float64 tables stored as float32 buffers (they become float32 ONNX initializers)
            self.register_buffer(name, torch.tensor(getattr(tables, name), dtype=torch.float32))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, eps: torch.Tensor,
                v: torch.Tensor | None = None) -> torch.Tensor:
        coeffs = DDPMCoefficients(*(torch.index_select(getattr(self, n), 0, t).reshape(-1, 1, 1, 1)
                                    for n in TABLES))
        return ddpm_step(x_t, eps, noise, coeffs, self.clip, v)


def export_update(diffusion: DiffusionConfig, image_shape: tuple[int, int, int], opset: int) -> onnx.ModelProto:
    """The update alone as ONNX: inputs x_t, t, noise, eps (and v); output x_prev; the tables as float32
    initializers."""
    inputs = sample_inputs(image_shape, diffusion.num_timesteps, noise=True)
    for name in eps_outputs(diffusion):  # eps (and v): only their shape and dtype are traced
        inputs[name] = torch.zeros_like(inputs["noise"])
    return export_module(UpdateModule(diffusion), inputs, ["x_prev"], opset)


def compose_step_graph(eps_model: onnx.ModelProto, update_model: onnx.ModelProto) -> onnx.ModelProto:
    """One model: the eps graph's x_t, t, eps (and v) feed the update graph; inputs x_t, t, noise; output x_prev."""
    if (eps_model.ir_version, default_opset(eps_model)) != (update_model.ir_version, default_opset(update_model)):
        raise DDPMError(f"cannot join the eps graph (IR {eps_model.ir_version}, opset {default_opset(eps_model)}) to "
                        f"the update graph (IR {update_model.ir_version}, opset {default_opset(update_model)}); "
                        "export both with the same torch and {opt:opset}")
    head = onnx.ModelProto()
    head.CopyFrom(eps_model)
    inputs = [i.name for i in head.graph.input]
    outputs = [o.name for o in head.graph.output]
    head.graph.output.extend(head.graph.input)  # merge_models joins outputs to inputs: pass x_t and t through
    tail = compose.add_prefix(update_model, UPDATE_PREFIX, rename_inputs=False, rename_outputs=False)
    try:
        merged = compose.merge_models(head, tail, io_map=[(n, n) for n in (*inputs, *outputs)])
    except ValueError as exc:
        raise DDPMError(f"cannot join the eps graph to the update graph ({str(exc).splitlines()[0]})") from None
    graph = merged.graph
    for value in [v for v in graph.value_info if v.name in inputs]:  # the pass-through outputs' leftovers
        graph.value_info.remove(value)
    opsets = {o.domain: o.version for o in merged.opset_import}  # merge_models lists shared domains twice
    del merged.opset_import[:]
    merged.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
    return merged
