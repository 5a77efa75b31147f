"""GPU benchmark, one run on one device: the paper's CIFAR-10 UNet (random weights) sampled with a full DDPM chain.

    python benchmarks/gpu.py [--steps 1000] [--batches 1,8,64] [--work DIR]

Rows: eager PyTorch CUDA FP32, PyTorch CUDA autocast FP16, ONNX Runtime CUDA FP32, ONNX Runtime CUDA FP16, FP16
with a captured CUDA graph, FP16 + graph on the graphs of `ddpm-export --fuse` (ONNX Runtime's `unet` optimizer:
GroupNorm+SiLU and NHWC conv contrib ops), and, at the first batch size, the peer a user would pick instead:
torch.compile(mode="max-autotune") with CUDA graphs, FP16 autocast and FP32, through the same loop, its compile
time reported apart. Last, the batch-invariance figures: image i's max |difference| between batch sizes (same
seed) and between ONNX Runtime CUDA FP32 and eager CUDA FP32. The ONNX Runtime rows use the runtime's device-resident step graph when
the chain is the full DDPM chain (x_t never leaves the GPU; only t and the host-drawn noise are copied in per step).
Reports images/s, per-step latency, achieved TFLOP/s (12.44 GFLOP per image per forward) and its share of the FP16
matmul rate measured here with torch, and for the runtime rows the share of wall time the host spends outside the
device step (1 - the per-step time of steps fed pre-drawn noise x steps / the wall time of the real chain). Right
after the first batch size, a row runs the paper's 256 x 256 UNet (`lsun256` preset, google/ddpm-church-256's
structure, 114 M parameters) at batch 8 for 50 respaced DDPM steps (eps graph + host update). Needs torch with
CUDA, onnxruntime-gpu, and the export extras.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

# One forward per image, counted with torch.utils.flop_counter.FlopCounterMode (matmuls and convolutions, 2 per MAC):
GFLOP_PER_IMAGE = 12.44  # the 35.7M-parameter CIFAR-10 UNet at 32 x 32
GFLOP_PER_IMAGE_256 = 497.0  # the 114M-parameter lsun256 UNet at 256 x 256
DEVICE_ONLY_STEPS = 200  # steps timed with pre-drawn noise for the host share


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def fp16_matmul_tflops(torch) -> float:  # type: ignore[no-untyped-def]
    """Dense FP16 matmul rate of this GPU (8192^3, best of 10), the ceiling the model rows are compared with."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    return 2 * n**3 / best / 1e12


def prepare(work: Path, preset: str = "cifar10", image_size: int = 32) -> tuple[Path, Path]:
    """A random-weight checkpoint of `preset` and its export (FP32, FP16, FP32 and FP16 step graphs)."""
    from ddpm_export.pipeline import FILENAMES, export_all
    from train.checkpoint import random_checkpoint, save_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"{preset}.pt"
    if not ckpt.exists():
        save_checkpoint(ckpt, random_checkpoint(preset, channels=3, image_size=image_size))
    out = work / ("export" if preset == "cifar10" else f"export-{preset}")
    graphs = [out / FILENAMES[k] for k in ("onnx", "fp16", "step", "fp16_step")]
    if not all(p.exists() for p in graphs):
        export_all(ckpt, out, fp16=True, step_graph=True, max_batch=64, validate=False, engine=False, force=True)
    missing = [p.name for p in graphs if not p.exists()]
    if missing:
        fail(f"the export in {out} lacks {', '.join(missing)}; this ddpm-export version does not write the FP16 "
             "step graph, so the FP16 rows would not run the device step graph")
    return ckpt, graphs[0]


def fused_export(export: Path) -> Path:
    """The fused FP16 graphs of `ddpm-export --fuse` (`ddpm_export.fuse`), made once; returns the fused eps graph."""
    from ddpm_export.fuse import FUSED_DIR, fuse_export

    fused = export / FUSED_DIR / "model.fp16.onnx"
    return fused if fused.is_file() else fuse_export(export, validate=True)["fused_eps"]


def time_eager(ckpt: Path, batch: int, steps: int, autocast: bool,
               compile_mode: str | None = None) -> tuple[float, np.ndarray, float]:
    """Wall seconds of one chain with the eager reference sampler (tensors stay on the GPU), its samples (seed 0),
    and the seconds the warm-up took (with `compile_mode`: torch.compile's compilation, reported apart)."""
    import torch

    from runtime.sampling.noise import SeededNoise
    from runtime.sampling import Chain
    from train.checkpoint import load_checkpoint
    from train.sampler import sample

    loaded = load_checkpoint(ckpt)
    model = loaded.ema_model("cuda")
    if compile_mode is not None:  # the peer a user would pick: PyTorch's own compiler (CUDA graphs in max-autotune)
        model = torch.compile(model, mode=compile_mode, fullgraph=True)
    chain = Chain.build(loaded.diffusion_config, "ddpm", str(steps))
    size = loaded.model_config.image_size
    shape = (batch, 3, size, size)
    source = SeededNoise(0, 0, batch, shape[1:])
    with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=autocast):
        warm = time.perf_counter()
        for _ in range(3):  # warm-up: cuDNN algorithm selection, or compilation and CUDA graph capture
            model(torch.zeros(shape, device="cuda"), torch.zeros(batch, dtype=torch.long, device="cuda"))
        torch.cuda.synchronize()
        start = time.perf_counter()
        x = sample(model, chain.schedule, shape, chain.variance_type, chain.clip, lambda i, s: source.draw())
        torch.cuda.synchronize()
    return time.perf_counter() - start, x.float().cpu().numpy(), start - warm


def time_onnxruntime(onnx_path: Path, batch: int, steps: int, precision: str,
                     cuda_graph: bool) -> tuple[float, float, str, np.ndarray]:
    """Wall seconds of one chain through the runtime (after a 3-step warm-up that captures CUDA graphs), the share of
    it spent outside the device step, which path ran, and the samples (seed 0)."""
    from runtime.backends import open_model
    from runtime.sampling.noise import SeededNoise
    from runtime.sampling import Chain, sample

    backend = open_model(onnx_path, "cuda", precision=precision, cuda_graph=cuda_graph)
    chain = Chain.build(backend.info.diffusion, "ddpm", str(steps))
    stepper = backend.stepper(chain)
    warm = SeededNoise(1, 0, batch, backend.info.image_shape)
    state = stepper.start(warm.draw())
    for k in range(len(chain) - 1, len(chain) - 4, -1):
        state = stepper.step(state, k, np.full(batch, chain.schedule.timesteps[k], np.int64), warm.draw())
    stepper.finish(state)
    start = time.perf_counter()
    samples = sample(backend, chain, batch, seed=0, batch_size=batch)
    wall = time.perf_counter() - start
    x, noise = warm.draw(), warm.draw()  # steps with noise already drawn: the device step alone, on the
    ks = list(reversed(range(len(chain))))[:DEVICE_ONLY_STEPS]  # first steps (it is the same at every step)
    ts = {k: np.full(batch, chain.schedule.timesteps[k], np.int64) for k in ks}
    start = time.perf_counter()
    state = stepper.start(x)
    for k in ks:
        state = stepper.step(state, k, ts[k], noise)
    stepper.finish(state)
    device = (time.perf_counter() - start) * len(chain) / len(ks)
    path = "device step graph" if backend.step_graph_fits(chain) else "eps graph + host update"
    return wall, max(0.0, 1.0 - device / wall), path, samples


@click.command()
@click.option("--steps", type=int, default=1000, show_default=True, help="DDPM steps; 1000 uses the device step graph.")
@click.option("--batches", default="1,8,64", show_default=True)
@click.option("--work", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder for the checkpoint and export (default: a temporary folder).")
def main(steps: int, batches: str, work: Path | None) -> None:
    try:
        import torch
    except ImportError:
        fail("this benchmark needs torch with CUDA (pip install ddpm-deploy[export] with a CUDA torch build)")
    if not torch.cuda.is_available():
        fail("no CUDA GPU is visible; run this benchmark on a machine with an NVIDIA GPU")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        fail("onnxruntime has no CUDAExecutionProvider; install onnxruntime-gpu")
    sizes = [int(b) for b in batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, onnx_path = prepare(work or Path(tmp))
        peak = fp16_matmul_tflops(torch)
        click.echo(f"device: {torch.cuda.get_device_name(0)}; FP16 matmul {peak:.1f} TFLOP/s; DDPM {steps} steps")
        click.echo(f"{'config':<26} {'batch':>5} {'images/s':>9} {'ms/step':>8} {'TFLOP/s':>8} {'of FP16':>8} "
                   f"{'host':>6}  path")

        def row(name: str, batch: int, n_steps: int, seconds: float, host: float | None, path: str,
                gflop: float = GFLOP_PER_IMAGE) -> None:
            tflops = gflop * batch * n_steps / seconds / 1e3
            share = f"{100 * host:>5.1f}%" if host is not None else f"{'-':>6}"
            click.echo(f"{name:<26} {batch:>5} {batch / seconds:>9.2f} {1e3 * seconds / n_steps:>8.2f} "
                       f"{tflops:>8.2f} {100 * tflops / peak:>7.1f}% {share}  {path}")

        try:
            fused: Path | None = fused_export(onnx_path.parent)
        except Exception as exc:  # the experiment must not cost the measured rows
            fused = None
            click.echo(f"fused graphs not made ({type(exc).__name__}: {str(exc)[:300]}); that row is skipped")
        finals: dict[tuple[str, int], np.ndarray] = {}  # (row name, batch) -> samples, for batch invariance

        def torch_row(name: str, batch: int, autocast: bool, mode: str | None = None) -> None:
            try:
                seconds, finals[(name, batch)], warm = time_eager(ckpt, batch, steps, autocast, mode)
            except Exception as exc:  # a failing row (a compile) must not cost the rest
                click.echo(f"{name:<26} {batch:>5} failed: {type(exc).__name__}: {str(exc)[:300]}")
                return
            row(name, batch, steps, seconds, None,
                "eager" if mode is None else f"{mode} + CUDA graphs; compiling took {warm:.0f} s")

        for i, batch in enumerate(sizes):
            samples: dict[str, np.ndarray] = {}  # per row name, at this batch size
            torch_row("torch eager FP32", batch, False)
            torch_row("torch autocast FP16", batch, True)
            for name, graph_path, precision, graph in (
                    ("ORT CUDA FP32", onnx_path, "fp32", False), ("ORT CUDA FP16", onnx_path, "fp16", False),
                    ("ORT CUDA FP16 + graph", onnx_path, "fp16", True),
                    ("ORT FP16 fused + graph", fused, "fp16", True)):
                if graph_path is None:
                    continue
                try:
                    wall, host, path, x = time_onnxruntime(graph_path, batch, steps, precision, graph)
                    plain = samples.get("ORT CUDA FP16 + graph") if graph_path == fused else None
                    if plain is not None:  # same seed: what the fusion moves
                        d = np.abs(x - plain)
                        path += f"; vs FP16 + graph: max |diff| {d.max():.3g}, mean {d.mean():.2g}"
                    samples[name] = finals[(name, batch)] = x
                    row(name, batch, steps, wall, host, path)
                except Exception as exc:  # a failing row (the fused one is an experiment) must not cost the rest
                    click.echo(f"{name:<26} {batch:>5} failed: {type(exc).__name__}: {str(exc)[:300]}")
            if i == 0:  # the compiler peer at the first (most important) batch size: compiling takes minutes
                torch_row("torch.compile FP16", batch, True, "max-autotune")
                torch_row("torch.compile FP32", batch, False, "max-autotune")
            if i == 0:  # the 256 x 256 row right after the first (most important) batch size
                big_ckpt, big_onnx = prepare(work or Path(tmp), "lsun256", 256)
                gflop = GFLOP_PER_IMAGE_256
                row("256x256 torch eager FP32", 8, 50, time_eager(big_ckpt, 8, 50, False)[0], None, "eager", gflop)
                row("256x256 ORT CUDA FP16", 8, 50, *time_onnxruntime(big_onnx, 8, 50, "fp16", False)[:3], gflop)
        batch_invariance(finals, sizes)


def batch_invariance(finals: dict[tuple[str, int], np.ndarray], sizes: list[int]) -> None:
    """Same seed, image i: the max |difference| between batch sizes of one row, and between ONNX Runtime CUDA FP32
    and eager CUDA FP32 at each batch (on the CPU both are 0 bit for bit; a GPU may pick other kernels per shape)."""
    click.echo("batch invariance (max |diff| of the images two runs share, same seed):")
    for name in dict.fromkeys(n for n, _ in finals):
        done = [b for b in sizes if (name, b) in finals]
        for a, b in zip(done, done[1:]):
            k = min(a, b)
            d = np.abs(finals[(name, a)][:k] - finals[(name, b)][:k]).max()
            click.echo(f"  {name:<26} batch {a} vs {b}: {d:.3g}")
    for b in sizes:
        if ("ORT CUDA FP32", b) in finals and ("torch eager FP32", b) in finals:
            d = np.abs(finals[("ORT CUDA FP32", b)] - finals[("torch eager FP32", b)]).max()
            click.echo(f"  ORT CUDA FP32 vs torch eager FP32, batch {b}: {d:.3g}")


if __name__ == "__main__":
    main()
