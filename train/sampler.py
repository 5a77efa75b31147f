"""The eager reference sampler (torch): ancestral DDPM with the runtime's own tables and step formula.

Noise convention (the runtime's, `runtime.sampling.noise`): noise[0] is x_T, noise[1 + j] is the noise of the j-th step taken,
counting from the first (t = T-1) step; the last step's noise is drawn too and multiplied by a zero scale.
`sample_model` (the training preview, digit_quality.py) runs the runtime's own loop, so its samples at seed s are
exactly `ddpm-run ckpt.pt --seed s` with the same steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch

from runtime.errors import DDPMError
from runtime.progress import progress as progress_bar
from runtime.images import save_grid
from runtime.sampling.noise import SeededNoise
from runtime.sampling import Chain
from runtime.sampling import sample as runtime_sample
from runtime.sampling.schedule import DiffusionConfig, Schedule, is_learned
from runtime.sampling.steps import Clip, DDPMCoefficients, ddpm_step, split_output

# noise(i, shape) -> tensor; i = 0 for x_T, 1 + j for step j
NoiseFn = Callable[[int, tuple[int, ...]], Union[torch.Tensor, np.ndarray]]
Noise = Union[NoiseFn, np.ndarray, torch.Tensor, None]


def _noise_source(noise: Noise, steps: int, shape: tuple[int, ...]) -> NoiseFn:
    if noise is None:  # the runtime's seeded noise, seed 0
        source = SeededNoise(0, 0, shape[0], shape[1:])
        return lambda i, s: source.draw()
    if isinstance(noise, (np.ndarray, torch.Tensor)):
        arr = torch.as_tensor(noise, dtype=torch.float32)
        if tuple(arr.shape) != (steps + 1, *shape):
            raise DDPMError(f"injected noise has shape {tuple(arr.shape)}, need {(steps + 1, *shape)} "
                            "(steps + 1 draws of the sample shape)")
        return lambda i, s: arr[i]
    if callable(noise):
        return noise
    raise DDPMError("noise must be a callable or an array [K+1, N, C, H, W]")


@torch.no_grad()
def sample(model: torch.nn.Module, schedule: Schedule, shape: tuple[int, ...], variance_type: str = "fixed_large",
           clip_denoised: Clip = True, noise: Noise = None, progress: bool = False) -> torch.Tensor:
    """Draw samples of `shape` [N, C, H, W] by walking `schedule` (full or respaced) from x_T down to x_0.

    `model(x, t)` returns eps, or eps and v ([N, 2C, H, W]) for learned_range; `clip_denoised` is a bool or a bound.
    Tensors stay on the model's device; `noise` defaults to the runtime's seeded noise at seed 0."""
    device = next(model.parameters()).device
    K = len(schedule)
    draw = _noise_source(noise, K, tuple(shape))
    coeffs = DDPMCoefficients.tables(schedule, variance_type)
    x = torch.as_tensor(draw(0, tuple(shape)), dtype=torch.float32).to(device)
    for j, k in enumerate(progress_bar(range(K - 1, -1, -1), desc="sample", unit="step", show=progress)):
        t = torch.full((shape[0],), int(schedule.timesteps[k]), dtype=torch.long, device=device)
        eps, v = split_output(model(x, t), shape[1])
        z = torch.as_tensor(draw(1 + j, tuple(shape)), dtype=torch.float32).to(device)
        x = ddpm_step(x, eps, z, coeffs.row(k), clip_denoised, v if is_learned(variance_type) else None)
    return x


def sample_model(model: torch.nn.Module, diffusion: DiffusionConfig, n: int, steps: int | str | None = None,
                 seed: int = 0, progress: bool = False) -> np.ndarray:
    """n samples [n, C, H, W] float32 in [-1, 1] from a model with the checkpoint's schedule and variance: the
    runtime's loop and noise around the module, as the eager backend of `ddpm-run ckpt.pt --seed seed` runs it."""
    cfg = model.config
    device = next(model.parameters()).device

    def eps(x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x_t).to(device), torch.from_numpy(t).to(device)).float().cpu().numpy()

    chain = Chain.build(diffusion, "ddpm", steps)
    x = runtime_sample(eps, chain, n, image_shape=(cfg.in_channels, cfg.image_size, cfg.image_size), seed=seed,
                       progress=progress)
    return np.clip(x, -1.0, 1.0)


def save_sample_grid(path: str | Path, model: torch.nn.Module, diffusion: DiffusionConfig, n: int = 64,
                     steps: int | str | None = None, seed: int = 0) -> Path:
    """Sample n images and write them as one PNG grid (atomically)."""
    return save_grid(path, sample_model(model, diffusion, n, steps, seed, progress=True))
