"""One process vs two: wall time of the same `ddpm-run -n N` as one process and as two torchrun shards merged.

    python -m benchmarks.shards [MODEL] -n 64 --steps 10 --batch-size 8

Without MODEL a random-weights `tiny` model (1 x 32 x 32) is exported to ONNX in a temp folder. Both sides are timed
as a user runs them, from the command's start to its output file (interpreter and model loading included): the
single run with --threads equal to the cores given, each of the two shards with half of them, then `ddpm-run merge`.
The merged file is checked to equal the single run's, array by array.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from runtime.cli_common import run_cli
from runtime.errors import DDPMError

REPO = Path(__file__).resolve().parents[1]


def _random_model(folder: Path) -> Path:
    """A random-weights tiny model exported to FP32 ONNX."""
    from ddpm_export.pipeline import export_all
    from train.checkpoint import random_checkpoint, save_checkpoint

    ckpt = save_checkpoint(folder / "tiny.pt", random_checkpoint("tiny", 1, 32))
    return export_all(ckpt, folder / "export", fp16=False, step_graph=False, validate=False, engine=False)["onnx"]


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise DDPMError(f"{' '.join(cmd[:6])} ... failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return seconds


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("-n", "n", type=int, default=64, show_default=True, help="images of the run")
@click.option("--steps", default="10", show_default=True, help="ddpm-run --steps")
@click.option("--sampler", default="ddpm", show_default=True, help="ddpm-run --sampler")
@click.option("--batch-size", type=int, default=8, show_default=True, help="ddpm-run --batch-size (both sides)")
@click.option("--cores", type=int, default=os.cpu_count() or 2, show_default=True,
              help="threads of the single run; each shard gets half")
def benchmark(model: Path | None, n: int, steps: str, sampler: str, batch_size: int, cores: int) -> None:
    """Print single-process and 2-process wall time for the same N side by side."""
    if n < 2 or batch_size < 1 or cores < 2:
        raise DDPMError("need -n >= 2, --batch-size >= 1 and --cores >= 2")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = model or _random_model(folder)
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(cores // 2)}
        args = [str(model), "-n", str(n), "--steps", steps, "--sampler", sampler, "--batch-size", str(batch_size),
                "--quiet"]
        run = [sys.executable, "-m", "runtime.run.cli"]
        single = _timed([*run, *args, "--threads", str(cores), "--out", str(folder / "single.npz")], env)
        shards = _timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         "-m", "runtime.run.cli", *args, "--threads", str(cores // 2), "--shard", "auto",
                         "--out", str(folder / "s.npz")], env)
        merge = _timed([*run, "merge", *map(str, sorted(folder.glob("s.shard*-of-2.npz"))), "--out",
                        str(folder / "merged.npz")], env)
        with np.load(folder / "single.npz") as a, np.load(folder / "merged.npz") as b:
            same = all(np.array_equal(a[k], b[k]) for k in ("arr_0", "samples"))
    click.echo(f"{n} images, {sampler} {steps} steps, batch {batch_size}, {model.name}, {cores} cores")
    click.echo(f"{'':<28}{'wall s':>8}{'images/s':>10}")
    click.echo(f"{'1 process':<28}{single:>8.2f}{n / single:>10.2f}")
    click.echo(f"{'2 processes (torchrun)':<28}{shards:>8.2f}{n / shards:>10.2f}")
    click.echo(f"{'2 processes + merge':<28}{shards + merge:>8.2f}{n / (shards + merge):>10.2f}")
    click.echo(f"speed-up {single / (shards + merge):.2f}x; merged arrays equal the single run's: {same}")


if __name__ == "__main__":
    run_cli(benchmark, "benchmarks.shards")
