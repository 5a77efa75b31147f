"""The JSON sidecar beside a TensorRT plan: what the engine is, and what it was built for.

A plan only runs on the TensorRT version and GPU compute capability that built it, so both are recorded here by
`ddpm_export` and checked by the runtime before deserialising, turning an opaque failure into a clear message.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import DDPMError
from runtime.fileio import atomic_write_bytes
from runtime.metadata import ModelInfo

SIDECAR_FORMAT = "ddpm-deploy/engine"


def sidecar_path(plan: str | os.PathLike) -> Path:
    """model.fp16.plan -> model.fp16.plan.json"""
    return Path(str(plan) + ".json")


@dataclass(frozen=True)
class EngineInfo:
    metadata: dict[str, str]  # ModelInfo.to_metadata() of the source ONNX
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor", e.g. "9.0"
    profile: dict[str, list[int]]  # input name -> [min, opt, max] batch
    onnx_sha256: str
    builder_optimization_level: int = 3
    extra: dict[str, Any] = field(default_factory=dict)

    def model_info(self, source: str) -> ModelInfo:
        return ModelInfo.from_metadata(self.metadata, source)

    @property
    def batch_range(self) -> tuple[int, int]:
        lo, _, hi = next(iter(self.profile.values()))
        return int(lo), int(hi)

    def save(self, plan: str | os.PathLike) -> Path:
        body = {"format": SIDECAR_FORMAT, **asdict(self)}
        return atomic_write_bytes(sidecar_path(plan), json.dumps(body, indent=2, sort_keys=True).encode())

    @classmethod
    def load(cls, plan: str | os.PathLike) -> "EngineInfo":
        path = sidecar_path(plan)
        if not path.is_file():
            raise DDPMError(f"engine {plan} has no sidecar {path.name}; rebuild it with `ddpm-export build-engine`")
        try:
            body = json.loads(path.read_text())
            if body.pop("format") != SIDECAR_FORMAT:
                raise ValueError("wrong format marker")
            return cls(**body)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise DDPMError(f"{path} is not a valid ddpm-deploy engine sidecar ({exc}); rebuild the engine") from None

    def check_compatible(self, tensorrt_version: str, compute_capability: str, gpu_name: str = "") -> None:
        """Refuse an engine built by another TensorRT version or for another GPU architecture."""
        if tensorrt_version != self.tensorrt_version:
            raise DDPMError(f"engine was built with TensorRT {self.tensorrt_version} but TensorRT {tensorrt_version} "
                            "is installed; rebuild it here with `ddpm-export build-engine MODEL.onnx`")
        if compute_capability != self.compute_capability:
            raise DDPMError(f"engine was built for {self.gpu_name} (compute capability {self.compute_capability}) "
                            f"but this GPU{' ' + gpu_name if gpu_name else ''} is {compute_capability}; rebuild it "
                            "on this GPU with `ddpm-export build-engine MODEL.onnx`")
