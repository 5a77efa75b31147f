"""Eager PyTorch on a training checkpoint: the reference the exported graphs are checked against.

`train` (and with it torch) is imported here, inside the constructor, only when a `.pt` file is opened.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.backends import UNBOUNDED, EpsBackend
from runtime.errors import DDPMError
from runtime.fileio import file_sha256
from runtime.metadata import info_from_checkpoint_dict


class EagerBackend(EpsBackend):
    def __init__(self, path: Path, provider: str = "cpu", threads: int = 0):
        try:
            import torch

            from train.checkpoint import load_checkpoint
        except ImportError:
            raise DDPMError(f"{path.name} is a PyTorch checkpoint and needs torch; install ddpm-deploy[train] or "
                            "pass an exported .onnx file") from None
        if provider == "cuda" and not torch.cuda.is_available():
            raise DDPMError("--provider cuda needs a CUDA build of torch and a GPU; none found")
        if threads:
            torch.set_num_threads(threads)
        ckpt = load_checkpoint(path)
        self.torch = torch
        self.device = torch.device(provider)
        self.model = ckpt.ema_model(self.device)
        self.info = info_from_checkpoint_dict(ckpt.model_config.to_dict(), ckpt.diffusion_config, ckpt.data,
                                              file_sha256(path))
        self.batch_range = (1, UNBOUNDED)
        self.description = f"eager torch {provider} fp32 {path.name}"

    def _eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            eps = self.model(torch.from_numpy(x_t).to(self.device), torch.from_numpy(t).to(self.device))
        return eps.float().cpu().numpy()
