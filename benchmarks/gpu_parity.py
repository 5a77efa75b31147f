"""GPU parity, one run: ONNX Runtime CUDA vs eager PyTorch CUDA on the same weights, seed and full DDPM chain.

    python benchmarks/gpu_parity.py CKPT_OR_MODEL_FOLDER EXPORT_DIR [--n 8] [--steps 1000]

FP32 rows run with TF32 off on both sides (torch.backends flags; ONNX Runtime's `use_tf32=0`), so the only
difference left is kernel summation order. The FP16 row compares ONNX Runtime CUDA FP16 with FP32 (mean and max
|difference|). Prints a table; needs torch with CUDA, onnxruntime-gpu and the export extras.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np


@click.command()
@click.argument("model", type=click.Path(path_type=Path, exists=True))
@click.argument("export_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--n", type=int, default=8, show_default=True, help="images")
@click.option("--steps", default="1000", show_default=True, help="DDPM steps (as ddpm-run --steps)")
def main(model: Path, export_dir: Path, n: int, steps: str) -> None:
    import torch

    from runtime.backends import onnxruntime_backend, open_model
    from runtime.sampling import Chain, sample

    if not torch.cuda.is_available():
        click.echo("error: no CUDA GPU is visible", err=True)
        sys.exit(2)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    onnxruntime_backend.CUDA_OPTIONS["use_tf32"] = "0"
    eager = open_model(model, "cuda")
    chain = Chain.build(eager.info.diffusion, "ddpm", steps)
    ref = sample(eager, chain, n, seed=0)
    rows = [("torch CUDA FP32 (reference)", ref)]
    for name, precision in (("ORT CUDA FP32", "fp32"), ("ORT CUDA FP16", "fp16")):
        backend = open_model(export_dir / "model.onnx", "cuda", precision=precision)
        rows.append((f"{name} ({backend.description})", sample(backend, chain, n, seed=0)))
    click.echo(f"{torch.cuda.get_device_name(0)}; {chain.describe()}; n = {n}; TF32 off")
    click.echo(f"{'run':<90} {'max |diff|':>11} {'mean |diff|':>12}")
    for name, x in rows:
        d = np.abs(x.astype(np.float64) - ref)
        click.echo(f"{name:<90} {d.max():>11.3g} {d.mean():>12.3g}")


if __name__ == "__main__":
    main()
