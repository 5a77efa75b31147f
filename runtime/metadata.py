"""What a model file says about itself: the contract between `ddpm_export` (writer) and the runtime (reader).

Stored as flat string key/values: ONNX `metadata_props` and the TensorRT plan's JSON sidecar carry the same dict,
and a C++ host reads it through ONNX Runtime's ModelMetadata API. Keys are prefixed "ddpm.".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import DDPMError
from runtime.sampling.schedule import DiffusionConfig

FORMAT = "ddpm-deploy/model"
FORMAT_VERSION = 1
KINDS = ("eps", "step")  # eps: x_t, t -> eps (and v) ; step: x_t, t, noise -> x_prev (one ancestral DDPM step)
PREFIX = "ddpm."
# The export's file family, "model" + suffix: written by ddpm_export, found again by the runtime from any member.
GRAPH_SUFFIXES = {("eps", "fp32"): ".onnx", ("eps", "fp16"): ".fp16.onnx", ("step", "fp32"): ".step.onnx",
                  ("step", "fp16"): ".fp16.step.onnx"}


def external_data_path(path: str | os.PathLike) -> Path:
    """model.onnx -> model.onnx.data: where a graph over 2 GB keeps its weights (ONNX external data)."""
    return Path(str(path) + ".data")


@dataclass(frozen=True)
class ModelInfo:
    diffusion: DiffusionConfig
    image_shape: tuple[int, int, int]  # C, H, W
    kind: str = "eps"
    precision: str = "fp32"  # of the graph's internals; inputs and outputs are always float32
    inputs: tuple[str, ...] = ("x_t", "t")
    outputs: tuple[str, ...] = ("eps",)
    data_range: tuple[float, float] = (-1.0, 1.0)
    parameterization: str = "eps"
    source_sha256: str = ""  # of the checkpoint the graph was exported from
    extra: dict[str, str] = field(default_factory=dict)  # further "ddpm.*" keys, kept verbatim

    def to_metadata(self) -> dict[str, str]:
        d = self.diffusion
        md = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "kind": self.kind,
            "precision": self.precision,
            "schedule": d.schedule,
            "num_timesteps": str(d.num_timesteps),
            "beta_start": repr(float(d.beta_start)),
            "beta_end": repr(float(d.beta_end)),
            "variance_type": d.variance_type,
            "clip_denoised": "true" if d.clip_denoised else "false",
            "clip_range": repr(float(d.clip_range)),
            "image_shape": ",".join(str(int(v)) for v in self.image_shape),
            "data_range": ",".join(repr(float(v)) for v in self.data_range),
            "parameterization": self.parameterization,
            "inputs": ",".join(self.inputs),
            "outputs": ",".join(self.outputs),
            "source_sha256": self.source_sha256,
        }
        md.update(self.extra)
        return {PREFIX + k: v for k, v in md.items()}

    @classmethod
    def from_metadata(cls, props: dict[str, str], source: str) -> "ModelInfo":
        """Parse metadata read from `source` (a path, for messages); a foreign model gives a one-line DDPMError."""
        md = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        if md.get("format") != FORMAT:
            raise DDPMError(f"{source} has no ddpm-deploy metadata; export it with `ddpm-export CKPT` first")
        if md.get("format_version") != str(FORMAT_VERSION):
            raise DDPMError(f"{source} has model format version {md.get('format_version')}, this runtime reads "
                            f"{FORMAT_VERSION}; re-export it with this ddpm-deploy version")
        try:
            diffusion = DiffusionConfig.from_dict({
                "schedule": md["schedule"], "num_timesteps": md["num_timesteps"], "beta_start": md["beta_start"],
                "beta_end": md["beta_end"], "variance_type": md["variance_type"],
                "clip_denoised": md["clip_denoised"], "clip_range": md.get("clip_range", "1.0")})
            shape = tuple(int(v) for v in md["image_shape"].split(","))
            lo, hi = (float(v) for v in md["data_range"].split(","))
            known = {"format", "format_version", "kind", "precision", "schedule", "num_timesteps", "beta_start",
                     "beta_end", "variance_type", "clip_denoised", "clip_range", "image_shape", "data_range", "parameterization",
                     "inputs", "outputs", "source_sha256"}
            info = cls(diffusion=diffusion, image_shape=shape,  # type: ignore[arg-type]
                       kind=md["kind"], precision=md["precision"], inputs=tuple(md["inputs"].split(",")),
                       outputs=tuple(md["outputs"].split(",")), data_range=(lo, hi),
                       parameterization=md["parameterization"], source_sha256=md.get("source_sha256", ""),
                       extra={k: v for k, v in md.items() if k not in known})
        except (KeyError, ValueError) as exc:
            raise DDPMError(f"{source} has incomplete ddpm-deploy metadata ({exc}); re-export it") from None
        if len(info.image_shape) != 3 or info.kind not in KINDS or info.parameterization != "eps":
            raise DDPMError(f"{source} has metadata this runtime does not understand "
                            f"(kind={info.kind}, image_shape={info.image_shape}); re-export it")
        if info.kind == "eps" and info.outputs != eps_outputs(info.diffusion):
            raise DDPMError(f"{source} declares outputs {','.join(info.outputs)} for {diffusion.variance_type} "
                            f"variance, which needs {','.join(eps_outputs(info.diffusion))}; re-export it")
        return info


def eps_outputs(diffusion: DiffusionConfig) -> tuple[str, ...]:
    """The eps graph's outputs: eps, and v for learned-variance models."""
    return ("eps", "v") if diffusion.learned_variance else ("eps",)

