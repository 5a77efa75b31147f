"""Eager PyTorch on any model source (our checkpoint, a diffusers folder, an improved-diffusion state dict): the
reference the exported graphs are checked against.

`train` (and with it torch) is imported here, inside the constructor, only when such a model is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.base import UNBOUNDED, EpsBackend
from runtime.errors import DDPMError


class EagerBackend(EpsBackend):
    def __init__(self, path: Path, provider: str = "cpu", threads: int = 0, **source_options: Any):
        try:
            import torch

            from train.sources import load_source
        except ImportError:
            raise DDPMError(f"{path.name} is a PyTorch model and needs torch; install ddpm-deploy[torch] or "
                            "pass an exported .onnx file") from None
        if provider == "cuda" and not torch.cuda.is_available():
            raise DDPMError("{opt:provider} cuda needs a CUDA build of torch and a GPU; none found")
        if threads:
            torch.set_num_threads(threads)
        source = load_source(path, **source_options)
        self.torch = torch
        self.device = torch.device(provider)
        self.model = source.module.to(self.device).eval()
        self.info = source.info()
        self.batch_range = (1, UNBOUNDED)
        self.description = f"eager torch {provider} fp32 {path.name} ({source.source})"

    def _eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(x_t).to(self.device), torch.from_numpy(t).to(self.device))
        return out.float().cpu().numpy()
