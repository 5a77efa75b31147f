"""Export a torch module (the eps-UNet or the step graph) to ONNX with a symbolic batch dimension."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx
import torch

from ddpm_export.onnx_io import BATCH_DIM
from runtime.errors import DDPMError

MIN_OPSET = 18
SAMPLE_BATCH = 2  # a size-1 sample batch would be specialised to a constant


def check_opset(opset: int) -> None:
    """Refuse an opset the exporter or the installed onnx cannot write, before any work."""
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise DDPMError(f"{{opt:opset}} {opset} is out of range: the dynamo exporter needs >= {MIN_OPSET} and the "
                        f"installed onnx knows opsets up to {newest}")


def export_module(module: torch.nn.Module, inputs: dict[str, torch.Tensor], output_names: list[str],
                  opset: int) -> onnx.ModelProto:
    """Dynamo-export `module` called with `inputs` (in forward's argument order, batch >= 2) to an in-memory ONNX.

    The batch is declared with torch.export.Dim, so every input and output keeps a symbolic first dimension.
    """
    check_opset(opset)
    if any(v.shape[0] < 2 for v in inputs.values()):
        raise ValueError("export needs a sample batch >= 2 so the batch dimension stays symbolic")
    batch = torch.export.Dim(BATCH_DIM, min=1)
    module = module.eval()
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # e.g. "torchvision is not installed": noise, not a problem
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, tuple(inputs.values()), dynamo=True, opset_version=opset, optimize=True,
                input_names=list(inputs), output_names=output_names,
                dynamic_shapes=tuple({0: batch} for _ in inputs), verbose=False, report=False,
            )
    except Exception as exc:  # the exporter raises many types; each means this module/opset could not be exported
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DDPMError(f"torch.onnx.export failed at opset {opset} ({first[:200]}); try the default {{opt:opset}} "
                        f"{MIN_OPSET}") from None
    finally:
        exporter_log.setLevel(level)
    if program is None or program.model_proto is None:
        raise DDPMError("torch.onnx.export returned no model")
    return program.model_proto


class OutputSplit(torch.nn.Module):
    """The graph's outputs by name: a source module returns eps [B, C, H, W] or eps and v as [B, 2C, H, W]; the
    exported graph gives them as separate outputs ("eps", "v") so hosts need no channel arithmetic."""

    def __init__(self, module: torch.nn.Module, channels: int, outputs: tuple[str, ...]):
        super().__init__()
        self.module, self.channels, self.outputs = module, channels, outputs

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.module(x_t, t)
        if len(self.outputs) == 1:
            return out
        return out[:, :self.channels], out[:, self.channels:]


def sample_inputs(image_shape: tuple[int, int, int], num_timesteps: int, noise: bool = False,
                  batch: int = SAMPLE_BATCH) -> dict[str, torch.Tensor]:
    """Example inputs for tracing: x_t, t (int64 original indices) and, for the step graph, noise."""
    gen = torch.Generator().manual_seed(0)
    out = {"x_t": torch.randn(batch, *image_shape, generator=gen),
           "t": torch.linspace(0, num_timesteps - 1, batch).round().to(torch.int64)}
    if noise:
        out["noise"] = torch.randn(batch, *image_shape, generator=gen)
    return out
