"""How digit-like are generated MNIST samples? Prints the share labelled with confidence >= 0.9 by a classifier
trained on real MNIST, and the class histogram, beside the same figures for 256 held-out real digits.

    python benchmarks/digit_quality.py samples.npz            # 'samples' N x C x H x W in [-1, 1] or 'arr_0' uint8 NHWC
    python benchmarks/digit_quality.py runs/mnist/ckpt.pt --steps 100   # sample 256 with the eager sampler first
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from runtime.cli_common import run_cli
from runtime.errors import DDPMError
from runtime.images import to_uint8
from evaluation.digit_quality import CONFIDENT, DigitQuality, classify, held_out_real


def load_images(path: Path, n: int, steps: str | None, seed: int) -> np.ndarray:
    """N x H x W x C uint8 from an .npz/.npy of samples, or sampled from a .pt checkpoint."""
    if path.suffix == ".pt":
        from train.checkpoint import load_checkpoint
        from train.sampler import sample_model

        ckpt = load_checkpoint(path)
        return to_uint8(sample_model(ckpt.ema_model(), ckpt.diffusion_config, n, steps, seed, progress=True))
    if not path.is_file():
        raise DDPMError(f"{path} not found; pass an .npz, .npy or .pt file")
    try:
        loaded = np.load(path, allow_pickle=False)
        arr = loaded if isinstance(loaded, np.ndarray) else loaded[
            "samples" if "samples" in loaded.files else "arr_0"]
    except (ValueError, OSError, KeyError) as exc:
        raise DDPMError(f"cannot read samples from {path} ({type(exc).__name__}); give an .npz with 'samples' "
                        "(float N x C x H x W in [-1, 1]) or 'arr_0' (uint8 N x H x W x C)") from None
    if arr.dtype == np.uint8:
        return arr[:n]
    if arr.ndim != 4:
        raise DDPMError(f"samples in {path} have shape {arr.shape}; need N x C x H x W")
    return to_uint8(arr[:n])


def row(name: str, q: DigitQuality) -> str:
    return f"{name:<18}{q.n:>5}{q.confident_fraction:>14.3f}  " + "".join(f"{c:>5}" for c in q.histogram)


@click.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--n", type=int, default=256, show_default=True, help="How many samples to score.")
@click.option("--steps", default=None, help="Sampling steps for a .pt source (default: the full chain).")
@click.option("--seed", type=int, default=0, show_default=True)
def report(source: Path, n: int, steps: str | None, seed: int) -> None:
    samples = DigitQuality.of(load_images(source, n, steps, seed))
    real_images, real_labels = held_out_real()
    real = DigitQuality.of(real_images)
    accuracy = float(np.mean(classify(real_images)[0] == real_labels))
    click.echo(f"{'':<18}{'n':>5}{f'conf>={CONFIDENT}':>14}  " + "".join(f"{d:>5}" for d in range(10)) + "  junk")
    click.echo(row("real (held-out)", real))
    click.echo(row(source.name[:17], samples))
    click.echo(f"classifier accuracy on the held-out real digits: {accuracy:.3f}")


if __name__ == "__main__":
    run_cli(report, "digit_quality.py")
