"""A catalogue of bad, careless and hostile inputs through every entry point (issues 16 and 25).

One row per case: the tool (ddpm-train, ddpm-export, ddpm-run, ddpm-eval, the C++ host ddpm_sample), the kind of problem
(1: cannot fit, 2: non-finite, 3: an artifact that lies or an option out of range, 4: a careless option, 5: what
a crash or another run left behind), the files to prepare, the arguments and the pattern of the one error line.
Each case asserts: non-zero exit, exactly one error line matching the pattern, no traceback, no file left behind
and every file that existed before (the user's and the shared fixtures) byte-for-byte untouched. Near-miss valid
inputs at the end must succeed. The Python tools run in-process; the models are tiny or one-node graphs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import re
import struct
import subprocess
import zipfile
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from ddpm_export.cli import main as export_main  # noqa: E402
from evaluation.cli import main as eval_main  # noqa: E402
from runtime.run.cli import main as run_main  # noqa: E402
from runtime.metadata import ModelInfo  # noqa: E402
from runtime.sampling.schedule import DiffusionConfig  # noqa: E402
from test_cpp_host import ddpm_sample  # noqa: E402,F401  (the fixture that builds the C++ host)
from train.checkpoint import load_checkpoint, random_checkpoint, save_checkpoint  # noqa: E402
from train.cli import main as train_main  # noqa: E402

SHAPE = (1, 8, 8)
T_GRAPH = 100  # timesteps of the one-node graphs (the C++ host walks them all)
STEPS = 4  # respaced steps of the Python runs that read a noise file
TINY = ["--preset", "tiny", "--batch-size", "2", "--sample-steps", "2"]
PROGRESS = re.compile(r"\d+%\||\r|it/s|step/s|s/step|^training a ")  # tqdm bars and ddpm-train's start line


# ---------------------------------------------------------------- artifacts (made once per module)

def graph_model(path: Path, kind: str = "eps", scale: float = 0.5, shape: tuple[int, int, int] = SHAPE,
                meta_shape: tuple[int, int, int] | None = None, T: int = T_GRAPH, pool: bool = False) -> Path:
    """A one-node ddpm-deploy graph: eps = scale * x_t ("eps"), or x_prev = scale * x_t ("step"). `meta_shape` makes
    the metadata lie about the image shape; `pool` makes the output a 2 x 2 average pool of x_t (half its size)."""
    x = helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["B", *shape])
    t = helper.make_tensor_value_info("t", TensorProto.INT64, ["B"])
    inputs = [x, t]
    if kind == "step":
        inputs.append(helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["B", *shape]))
    name = "x_prev" if kind == "step" else "eps"
    c, h, w = shape
    out = helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", c, *((h // 2, w // 2) if pool else (h, w))])
    k = helper.make_tensor("k", TensorProto.FLOAT, [], [scale])
    node = (helper.make_node("AveragePool", ["x_t"], [name], kernel_shape=[2, 2], strides=[2, 2]) if pool
            else helper.make_node("Mul", ["x_t", "k"], [name]))
    graph = helper.make_graph([node], kind, inputs, [out], [k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    info = ModelInfo(diffusion=DiffusionConfig(num_timesteps=T), image_shape=meta_shape or shape, kind=kind,
                     inputs=tuple(i.name for i in inputs), outputs=(name,))
    for key, value in info.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, tiny_export_dir: Path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad_inputs_art")
    mismatched = random_checkpoint()
    mismatched.model_config = dataclasses.replace(mismatched.model_config,
                                                  base_channels=mismatched.model_config.base_channels + 8)
    nan = random_checkpoint()
    next(iter(nan.ema.values()))[...] = float("nan")
    return {
        "ckpt": tiny_checkpoint, "onnx": tiny_export_dir / "model.onnx", "export": tiny_export_dir,
        "eps": graph_model(d / "eps.onnx"),
        "naneps": graph_model(d / "naneps.onnx", scale=float("nan")),
        "step": graph_model(d / "step.onnx", kind="step"),
        "nanstep": graph_model(d / "nanstep.onnx", kind="step", scale=float("inf")),
        "bigstep": graph_model(d / "bigstep.onnx", kind="step", shape=(3, 512, 512)),
        "lyingstep": graph_model(d / "lyingstep.onnx", kind="step", meta_shape=(3, 8, 8)),
        "lyingeps": graph_model(d / "lyingeps.onnx", pool=True),
        "bigeps": graph_model(d / "bigeps.onnx", shape=(3, 512, 512)),
        "mismatched": save_checkpoint(d / "mismatched.pt", mismatched),
        "nanckpt": save_checkpoint(d / "nanckpt.pt", nan),
        "noise": _npy(d / "noise.npy", np.zeros((STEPS + 1, 2, *SHAPE), np.float32)),
    }


def _npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


# ---------------------------------------------------------------- files a case prepares in its own folder

def noise_with(value: float, entry: int = 2, steps: int = STEPS) -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        noise = np.zeros((steps + 1, 2, *SHAPE), np.float32)
        noise[entry, 1, 0, 3, 3] = value
        np.save(tmp / "noise.npy", noise)
    return prep


def cifar(bad: bytes) -> Callable[[Path], None]:
    """data_batch_1 = `bad`, batches 2..5 valid (two images each)."""
    def prep(tmp: Path) -> None:
        (tmp / "cifar").mkdir()
        good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, protocol=2)
        for i in range(1, 6):
            (tmp / "cifar" / f"data_batch_{i}").write_bytes(bad if i == 1 else good)
    return prep


class _HugeArray:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (np.ndarray, ((10**6, 10**6),))


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os
        return (os.system, ("touch pwned",))


HUGE_BYTES = b"\x80\x04\x8e" + (10**13).to_bytes(8, "little") + b"abc"  # BINBYTES8 declaring 9 TiB


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels (PIL refuses at open, before decoding)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def folder_with(name: str, data: bytes) -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        (tmp / "pics").mkdir()
        (tmp / "pics" / name).write_bytes(data)
    return prep


def write(name: str, data: bytes = b"user data") -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    return prep


def partial_of_other_run(tmp: Path) -> None:
    (tmp / "s.npz.partial").mkdir()
    (tmp / "s.npz.partial" / "progress.json").write_text('{"done": 3, "n": 10, "key": {"seed": 99}}')


def ckpt_from(dataset: str) -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        ckpt = random_checkpoint()
        ckpt.data["dataset"] = dataset
        save_checkpoint(tmp / "c.pt", ckpt)
    return prep


def edited_export(tmp: Path) -> None:
    (tmp / "exp").mkdir()
    (tmp / "exp" / "model.onnx").write_bytes(b"someone's file")


def npz(arrays: dict[str, np.ndarray] | None = None, name: str = "d.npz", **more: Callable[[Path], None]) \
        -> Callable[[Path], None]:
    """`name` holding `arrays` (default: four uint8 8 x 8 grey images as arr_0), then the `more` preparations."""
    def prep(tmp: Path) -> None:
        np.savez(tmp / name, **(arrays if arrays is not None else {"arr_0": np.zeros((4, *SHAPE[1:], 1), np.uint8)}))
        for other in more.values():
            other(tmp)
    return prep


def npz_declaring_a_tib(tmp: Path) -> None:
    """d.npz whose arr_0 header declares 1 TiB of uint8 images; the file itself is tiny."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                   "shape": (2**28, 64, 64, 1)})
    with zipfile.ZipFile(tmp / "d.npz", "w") as z:
        z.writestr("arr_0.npy", header.getvalue() + b"\0" * 64)


def nll_reports(*seeds: int) -> Callable[[Path], None]:
    """r<seed>.json: reports of `ddpm-eval nll --json` over the four images of d.npz with a one-node eps graph."""
    def prep(tmp: Path) -> None:
        npz()(tmp)
        graph_model(tmp / "m.onnx")
        for seed in seeds:
            eval_main(["nll", str(tmp / "m.onnx"), "--data", str(tmp / "d.npz"), "--steps", "2", "--seed", str(seed),
                       "--json", str(tmp / f"r{seed}.json"), "-q"])
    return prep


def torch_file(obj: object, name: str = "w.pth") -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        torch.save(obj, tmp / name)
    return prep


def sweep_record(settings: dict[str, object]) -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        (tmp / "sweep").mkdir()
        (tmp / "sweep" / "sweep.json").write_text(json.dumps({"settings": settings, "cells": [], "floor": []}))
    return prep


def shards(*seeds: int, keep: tuple[int, ...] = (0, 1)) -> Callable[[Path], None]:
    """Shards R of 2 (R in `keep`) of `ddpm-run --n 4` with a one-node eps graph; shard R uses seeds[R]."""
    def prep(tmp: Path) -> None:
        graph_model(tmp / "m.onnx")
        for r in keep:
            run_main([str(tmp / "m.onnx"), "--n", "4", "--batch-size", "2", "--sampler", "ddpm", "--steps", "2",
                      "--seed", str(seeds[r]), "--shard", f"{r}/2", "--out", str(tmp / "s.npz"), "-q"])
    return prep


# ---------------------------------------------------------------- the catalogue

class Case(NamedTuple):
    tool: str  # train | export | run | eval | cpp
    kind: int
    argv: list[str]
    pattern: str
    prep: Callable | None = None


def R(kind: int, argv: str, pattern: str, prep: Callable | None = None) -> Case:
    return Case("run", kind, argv.split(), pattern, prep)


def T(kind: int, argv: str, pattern: str, prep: Callable | None = None) -> Case:
    return Case("train", kind, [*TINY, *argv.split()], pattern, prep)


def E(kind: int, argv: str, pattern: str, prep: Callable | None = None) -> Case:
    return Case("export", kind, argv.split(), pattern, prep)


def C(kind: int, argv: str, pattern: str, prep: Callable | None = None) -> Case:
    return Case("cpp", kind, argv.split(), pattern, prep)


def V(kind: int, argv: str, pattern: str, prep: Callable | None = None) -> Case:
    return Case("eval", kind, argv.split(), pattern, prep)


OUT = "--out {tmp}/s.npz --sampler ddpm --steps 2 --threads 1"
NLL = "nll {eps} --data {tmp}/d.npz --steps 2 --threads 1"
QUALITY = "quality {tmp}/s.npz --ref {tmp}/d.npz --inception-weights {tmp}/w.pth"
FLOAT_NAN = {"arr_0": np.full((4, 8, 8, 1), np.nan, np.float32)}
CASES: dict[str, Case] = {
    # ddpm-run
    "run-n-beyond-disk": R(1, "{eps} --n 10000000000 " + OUT, r"not enough disk space for 10000000000 images"),
    "run-batch-beyond-model": R(1, "{onnx} --n 8 --batch-size 5 " + OUT, r"--batch-size must lie in 1\.\.4"),
    "run-batch-beyond-memory": R(1, "{bigeps} --n 100000 --batch-size 100000 " + OUT,
                                 r"a batch of 100000 images needs at least [\d.]+ TiB of memory"),
    "run-save-noise-beyond-memory": R(1, "{bigeps} --n 1000000 --save-noise {tmp}/n.npy " + OUT,
                                      r"--save-noise for 1000000 images needs at least [\d.]+ TiB of memory"),
    "run-eta-nan": R(2, "{eps} --sampler ddim --eta nan " + OUT, r"--eta.*'nan' is not a finite number"),
    "run-eta-inf": R(2, "{eps} --sampler ddim --eta inf " + OUT, r"--eta.*'inf' is not a finite number"),
    "run-noise-nan": R(2, "{eps} --n 2 --steps 4 --noise {tmp}/noise.npy --out {tmp}/s.npz",
                       r"noise file .*noise\.npy holds NaN or inf in entry 2 of 5 \(the noise of step 2\)",
                       noise_with(float("nan"))),
    "run-noise-inf-xT": R(2, "{eps} --n 2 --steps 4 --noise {tmp}/noise.npy --out {tmp}/s.npz",
                          r"holds NaN or inf in entry 0 of 5 \(x_T\)", noise_with(float("-inf"), entry=0)),
    "run-onnx-outputs-nan": R(2, "{naneps} --n 3 " + OUT,
                              r"sampling produced NaN or inf at step 1 of 2 \(t=\d+\).*; nothing was written"),
    "run-ckpt-nan-weights": R(2, "{nanckpt} --n 1 " + OUT, r"sampling produced NaN or inf at step 1 of 2 "),
    "run-metadata-lies": R(3, "{lyingstep} --n 1 --out {tmp}/s.npz", r"do not fit its metadata"),
    "run-eps-shape-lies": R(3, "{lyingeps} --n 1 " + OUT, r"eps tensor\(float\) \['B', 1, 4, 4\].*metadata"),
    "run-ckpt-config-lies": R(3, "{mismatched} --n 1 " + OUT, r"checkpoint weights do not fit its model_config"),
    "run-noise-wrong-shape": R(3, "{eps} --n 3 --steps 4 --noise {noise} --out {tmp}/s.npz",
                               r"holds float32 \[5, 2, 1, 8, 8\], this run needs float32 \[5, 3, 1, 8, 8\]"),
    "run-noise-not-npy": R(3, "{eps} --n 2 --steps 4 --noise {tmp}/n.npy --out {tmp}/s.npz",
                           r"n\.npy is not a readable \.npy noise file", write("n.npy", b"not numpy")),
    "run-steps-beyond-T": R(3, "{eps} --n 1 --steps 5000 --out {tmp}/s.npz", r"5000"),
    "run-eta-out-of-range": R(3, "{eps} " + OUT + " --sampler ddim --eta 1.5", r"eta must lie in \[0, 1\], got 1\.5"),
    "run-onnx-garbage": R(3, "{tmp}/m.onnx --n 1 " + OUT, r"m\.onnx", write("m.onnx", b"\x00garbage" * 10)),
    "run-ckpt-garbage": R(3, "{tmp}/m.pt --n 1 " + OUT, r"m\.pt is not a ddpm-deploy checkpoint",
                          write("m.pt", b"garbage")),
    "run-seed-overflow": R(4, "{eps} --seed 100000000000000000000 " + OUT,
                           r"--seed.*100000000000000000000 is not in the range 0<=x<=9223372036854775807"),
    "run-seed-negative": R(4, "{eps} --seed -1 " + OUT, r"--seed.*-1 is not in the range"),
    "run-out-not-npz": R(4, "{eps} --n 1 --steps 2 --out {tmp}/samples.bin",
                         r"--out .*samples\.bin would hold an npz archive .*give it the \.npz extension"),
    "run-out-under-a-file": R(4, "{eps} --n 1 --steps 2 --out {tmp}/passwd/s.npz",
                              r"passwd is a file, not a folder", write("passwd")),
    "run-out-missing-folder": R(4, "{eps} --n 1 --steps 2 --out {tmp}/no/s.npz", r"folder .*/no does not exist"),
    "run-out-exists": R(4, "{eps} --n 1 " + OUT, r"s\.npz already exists; pass --force", write("s.npz")),
    "run-out-is-dir": R(4, "{eps} --n 1 --steps 2 --out {tmp}/d --force", r"d is a directory", write("d/x")),
    "run-save-noise-not-npy": R(4, "{eps} --n 1 --save-noise {tmp}/n.bin " + OUT, r"--save-noise .*\.npy extension"),
    "run-n-zero": R(4, "{eps} --n 0 " + OUT, r"0 is not in the range x>=1"),
    "run-grid-is-out": R(4, "{eps} --n 1 --grid {tmp}/s.npz " + OUT, r"must be different files"),
    "run-noise-and-save-noise": R(4, "{eps} --noise {noise} --save-noise {tmp}/n.npy " + OUT, r"exclude each other"),
    "run-steps-text": R(4, "{eps} --n 1 --steps many --out {tmp}/s.npz", r"many"),
    "run-model-missing": R(4, "{tmp}/none.onnx " + OUT, r"none\.onnx not found"),
    "run-provider-unknown": R(4, "{eps} --provider tpu " + OUT, r"'tpu' is not one of"),
    "run-partial-of-other-run": R(5, "{eps} --n 10 --out {tmp}/s.npz --sampler ddpm --steps 2",
                                  r"holds an unfinished run with other settings", partial_of_other_run),
    "run-shard-past-count": R(4, "{eps} --n 4 --shard 2/2 " + OUT, r"--shard 2/2: shard R of W needs 0 <= R < W"),
    "run-shard-text": R(4, "{eps} --n 4 --shard half " + OUT, r"--shard 'half' is neither R/W"),
    "run-model-folder-not-diffusers": R(3, "{tmp}/m --n 1 " + OUT, r"m has no config\.json; a diffusers model folder",
                                        write("m/notes.txt")),
    "run-hub-id-not-cached": R(4, "no-such-org/no-such-model --n 1 " + OUT,
                               r"no-such-org/no-such-model is neither a local path nor a model in the Hugging Face"),
    "run-merge-missing-shard": R(5, "merge {tmp}/s.shard0-of-2.npz --out {tmp}/m.npz",
                                 r"1 of 2 shards are missing: 1/2 \(images 2\.\.3\); pass all 2 shard files",
                                 shards(3, 3, keep=(0,))),
    "run-merge-other-runs": R(5, "merge {tmp}/s.shard0-of-2.npz {tmp}/s.shard1-of-2.npz --out {tmp}/m.npz",
                              r"come from different seeds: 3 vs 4", shards(3, 4)),
    "run-merge-not-a-shard": R(3, "merge {tmp}/d.npz --out {tmp}/m.npz", r"d\.npz is not a shard \(it has no run_key\)",
                               npz()),
    # ddpm-train
    "train-batch-beyond-memory": T(1, "--steps 1 --batch-size 1000000000000 --out {tmp}/c.pt",
                                   r"--batch-size 1000000000000 needs at least [\d.]+ TiB of memory"),
    "train-cifar-declares-9TiB": T(1, "--dataset cifar10 --data-dir {tmp}/cifar --steps 1 --out {tmp}/c.pt",
                                   r"data_batch_1 is not a plain CIFAR-10 batch \(it declares 9\.1 TiB of data",
                                   cifar(HUGE_BYTES)),
    "train-cifar-huge-ndarray": T(1, "--dataset cifar10 --data-dir {tmp}/cifar --steps 1 --out {tmp}/c.pt",
                                  r"data_batch_1 .*declares a [\d.]+ TiB array",
                                  cifar(pickle.dumps({b"data": _HugeArray()}, protocol=2))),
    "train-png-bomb": T(1, "--dataset folder --data-dir {tmp}/pics --steps 1 --out {tmp}/c.pt",
                        r"bomb\.png is too large to decode safely.*1600000000 pixels",
                        folder_with("bomb.png", png_header(40000, 40000))),
    "train-png-over-pil-warning": T(1, "--dataset folder --data-dir {tmp}/pics --steps 1 --out {tmp}/c.pt",
                                    r"big\.png is too large to decode safely",
                                    folder_with("big.png", png_header(12000, 12000))),
    "train-lr-inf": T(2, "--steps 1 --lr inf --out {tmp}/c.pt", r"--lr.*'inf' is not a finite number"),
    "train-lr-nan": T(2, "--steps 1 --lr nan --out {tmp}/c.pt", r"--lr.*'nan' is not a finite number"),
    "train-ema-nan": T(2, "--steps 1 --ema-decay nan --out {tmp}/c.pt", r"--ema-decay.*not a finite number"),
    "train-lr-negative": T(2, "--steps 1 --lr -1 --out {tmp}/c.pt", r"--lr must be > 0"),
    "train-cifar-malicious": T(3, "--dataset cifar10 --data-dir {tmp}/cifar --steps 1 --out {tmp}/c.pt",
                               r"refusing to load global", cifar(pickle.dumps(_Evil(), protocol=2))),
    "train-cifar-no-data": T(3, "--dataset cifar10 --data-dir {tmp}/cifar --steps 1 --out {tmp}/c.pt",
                             r"has no N x 3072 'data' array", cifar(pickle.dumps({b"x": 1}, protocol=2))),
    "train-png-corrupt": T(3, "--dataset folder --data-dir {tmp}/pics --steps 1 --out {tmp}/c.pt",
                           r"cannot read image .*bad\.png", folder_with("bad.png", b"\x89PNG broken")),
    "train-resume-other-dataset": T(3, "--steps 5 --resume --out {tmp}/c.pt",
                                    r"was trained on 'random', not 'mnist'", ckpt_from("random")),
    "train-resume-foreign": T(3, "--steps 5 --resume --out {tmp}/c.pt", r"not a ddpm-deploy checkpoint",
                              write("c.pt", b"PK\x03\x04 not a zip")),
    "train-seed-overflow": T(4, "--steps 1 --seed 100000000000000000000 --out {tmp}/c.pt",
                             r"--seed.*is not in the range 0<=x<=9223372036854775807"),
    "train-seed-negative": T(4, "--steps 1 --seed -5 --out {tmp}/c.pt", r"--seed.*-5 is not in the range"),
    "train-out-not-pt": T(4, "--steps 1 --out {tmp}/c.bin", r"--out .*c\.bin would hold a PyTorch checkpoint.*\.pt"),
    "train-out-exists": T(4, "--steps 1 --out {tmp}/c.pt", r"c\.pt already exists; pass --force", write("c.pt")),
    "train-out-under-a-file": T(4, "--steps 1 --out {tmp}/f/c.pt", r"f is a file, not a folder", write("f")),
    "train-out-is-a-folder": T(4, "--steps 1 --out {tmp}/d", r"--out .*d is a folder; give the checkpoint's file "
                               r"path, e.g. --out .*d/ckpt\.pt", write("d/x")),
    "train-steps-zero": T(4, "--steps 0 --out {tmp}/c.pt", r"--steps must be >= 1, got 0"),
    "train-dataset-unknown": T(4, "--steps 1 --dataset imagenet --out {tmp}/c.pt", r"unknown dataset 'imagenet'"),
    "train-data-dir-missing": T(4, "--steps 1 --dataset folder --data-dir {tmp}/none --out {tmp}/c.pt",
                                r"data directory .*none does not exist"),
    "train-resume-nothing": T(5, "--steps 2 --resume --out {tmp}/c.pt", r"nothing to resume"),
    "train-resume-and-force": T(5, "--steps 2 --resume --force --out {tmp}/c.pt", r"pass only one",
                                ckpt_from("mnist")),
    # ddpm-export
    "export-max-batch-beyond-memory": E(1, "{ckpt} --out-dir {tmp}/exp --max-batch 100000000",
                                        r"validating --max-batch 100000000 needs at least [\d.]+ TiB"),
    "export-triton-eta-nan": E(2, "triton-repo {export} --out {tmp}/repo --eta nan", r"'nan' is not a finite number"),
    "export-nan-weights": E(2, "{nanckpt} --out-dir {tmp}/exp", r"the model's weights hold NaN or inf \(1 tensors"),
    "export-ckpt-config-lies": E(3, "{mismatched} --out-dir {tmp}/exp",
                                 r"checkpoint weights do not fit its model_config"),
    "export-opset-99": E(3, "{ckpt} --out-dir {tmp}/exp --opset 99", r"--opset 99 is out of range"),
    "export-batch-range": E(3, "{ckpt} --out-dir {tmp}/exp --min-batch 5 --max-batch 2",
                            r"--min-batch must be between 1 and --max-batch \(2\), got 5"),
    "export-engine-without-tensorrt": E(3, "{ckpt} --out-dir {tmp}/exp --engine", r"--engine was requested but"),
    "export-garbage-source": E(3, "{tmp}/x.pt --out-dir {tmp}/exp", r"x\.pt is not a ddpm-deploy checkpoint",
                               write("x.pt", b"text")),
    "export-out-dir-is-file": E(4, "{ckpt} --out-dir {tmp}/f", r"--out-dir .*f is a file; give a folder", write("f")),
    "export-out-dir-no-parent": E(4, "{ckpt} --out-dir {tmp}/no/exp", r"folder .*/no does not exist"),
    "export-outputs-exist": E(4, "{ckpt} --out-dir {tmp}/exp --no-validate",
                              r"exp already holds model\.onnx; pass --force", edited_export),
    "export-source-missing": E(4, "{tmp}/none.pt --out-dir {tmp}/exp", r"none\.pt"),
    "export-out-dir-under-a-file": E(4, "{ckpt} --out-dir {tmp}/f/exp",
                                     r"cannot create .*exp: .*f is a file, not a folder; choose another --out-dir",
                                     write("f")),
    "export-fused-is-a-file": E(4, "{ckpt} --out-dir {tmp}/exp --fuse --no-validate",
                                r"exp/fused is a file, where the fused graphs' folder goes", write("exp/fused")),
    "export-fused-outputs-exist": E(5, "{ckpt} --out-dir {tmp}/exp --fuse --no-validate",
                                    r"exp/fused already holds model\.fp16\.onnx; pass --force",
                                    write("exp/fused/model.fp16.onnx")),
    "export-to-diffusers-out-exists": E(5, "to-diffusers {ckpt} --out {tmp}/d", r"d already exists", write("d/x")),
    "export-to-diffusers-garbage": E(3, "to-diffusers {tmp}/x.pt --out {tmp}/d", r"x\.pt is not a ddpm-deploy "
                                     "checkpoint", write("x.pt", b"text")),
    "export-triton-max-calls-below-default": E(4, "triton-repo {export} --out {tmp}/repo --steps 20 "
                                               "--max-model-calls 5", r"--max-model-calls 5 is below the 20 model "
                                               "calls of the default chain"),
    # ddpm-eval
    "eval-npz-declares-a-TiB": V(1, NLL, r"d\.npz is not a readable samples \.npz with arr_0 \(arr_0 declares "
                                 r"268435456 images, more than the file holds", npz_declaring_a_tib),
    "eval-samples-declare-a-TiB": V(1, "quality {tmp}/d.npz --ref mnist", r"arr_0 declares 268435456 images",
                                    npz_declaring_a_tib),
    "eval-png-bomb": V(1, "nll {eps} --data folder --data-dir {tmp}/pics --steps 2",
                       r"bomb\.png is too large to decode safely", folder_with("bomb.png", png_header(40000, 40000))),
    "eval-mixes-beyond-model": V(1, "interpolate {onnx} --data {tmp}/d.npz --pairs 1 --mixes 9 --out {tmp}/i.png",
                                 r"--mixes 9 exceeds this model's largest batch 4",
                                 npz({"arr_0": np.zeros((2, 32, 32, 1), np.uint8)})),
    "eval-model-outputs-nan": V(2, "nll {naneps} --data {tmp}/d.npz --steps 2 --json {tmp}/r.json",
                                r"NaN or inf", npz()),
    "eval-npz-nan": V(2, NLL, r"d\.npz needs arr_0 as uint8 N x H x W x C", npz(FLOAT_NAN)),
    "eval-samples-nan": V(2, QUALITY, r"s\.npz needs arr_0 as uint8",
                          npz(FLOAT_NAN, "s.npz", ref=npz(), weights=write("w.pth"))),
    "eval-npz-float": V(3, NLL, r"d\.npz needs arr_0 as uint8", npz({"arr_0": np.zeros((4, 8, 8, 1), np.float32)})),
    "eval-npz-3d": V(3, NLL, r"d\.npz needs arr_0 as uint8 N x H x W x C",
                     npz({"arr_0": np.zeros((4, 8, 8), np.uint8)})),
    "eval-npz-channels": V(3, NLL, r"3-channel images, the model takes 1 channels",
                           npz({"arr_0": np.zeros((4, 8, 8, 3), np.uint8)})),
    "eval-npz-larger-images": V(3, NLL, r"has 16 x 16 images, the model takes 8 x 8",
                                npz({"arr_0": np.zeros((4, 16, 16, 1), np.uint8)})),
    "eval-npz-no-arr0": V(3, NLL, r"d\.npz is not a readable samples \.npz with arr_0",
                          npz({"images": np.zeros((4, 8, 8, 1), np.uint8)})),
    "eval-npz-corrupt": V(3, NLL, r"d\.npz is not a readable samples \.npz", write("d.npz", b"PK\x03\x04 broken")),
    "eval-inception-not-weights": V(3, QUALITY, r"w\.pth is not a loadable weights file",
                                    npz(name="s.npz", ref=npz(), weights=write("w.pth", b"not weights"))),
    "eval-inception-foreign-weights": V(3, QUALITY, r"w\.pth does not hold the FID Inception weights",
                                        npz(name="s.npz", ref=npz(),
                                            weights=torch_file({"fc.weight": torch.zeros(2)}))),
    "eval-merge-not-a-report": V(3, "nll-merge {tmp}/a.json {tmp}/b.json", r"a\.json is not a report of ddpm-eval nll",
                                 write("a.json", b'{"bits": 1}')),
    "eval-data-missing": V(4, "nll {eps} --data {tmp}/none.npz --steps 2", r"data file .*none\.npz not found"),
    "eval-data-unknown": V(4, "nll {eps} --data imagenet --steps 2", r"unknown data 'imagenet'"),
    "eval-folder-without-dir": V(4, "nll {eps} --data folder --steps 2", r"--data folder needs --data-dir PATH"),
    "eval-n-beyond-data": V(4, NLL + " --n 10", r"--n 10 is more than the 4 images of .*d\.npz; use --n 4 or less",
                            npz()),
    "eval-first-past-end": V(4, NLL + " --first 4", r"--first 4 skips all 4 images of .*d\.npz; use --first 3",
                             npz()),
    "eval-n-after-first": V(4, NLL + " --first 2 --n 3", r"--n 3 is more than the 2 images .* after the first 2",
                            npz()),
    "eval-json-unwritable": V(4, NLL + " --json /sys/ddpm-eval-report.json", r"cannot write /sys/ddpm-eval-report"
                              r"\.json: folder /sys is not writable", npz()),
    "eval-json-under-a-file": V(4, NLL + " --json {tmp}/f/r.json", r"f is a file, not a folder",
                                npz(more=write("f"))),
    "eval-json-is-a-folder": V(4, NLL + " --json {tmp}/r", r"r is a directory; give a file path",
                               npz(more=write("r/x"))),
    "eval-shard-without-json": V(4, NLL + " --shard 0/2", r"--shard needs --json", npz()),
    "eval-json-exists": V(5, NLL + " --json {tmp}/r.json", r"r\.json already exists; pass --force",
                          npz(more=write("r.json"))),
    "eval-merge-other-evaluation": V(5, "nll-merge {tmp}/r0.json {tmp}/r1.json", r"r0\.json and .*r1\.json come "
                                     r"from different evaluations \(seed differ\)", nll_reports(0, 1)),
    "eval-merge-twice": V(5, "nll-merge {tmp}/r0.json {tmp}/r0.json", r"overlaps", nll_reports(0)),
    "eval-sweep-other-model": V(5, "sweep {eps} --ref mnist --cell ddpm:2 --n 2 --seeds 0 --out-dir {tmp}/sweep",
                                r"sweep\.json holds a sweep with other settings .*; pass --force to start over",
                                sweep_record({"model": "/elsewhere/other.onnx", "ref": "mnist", "n": 2})),
    "eval-sweep-record-corrupt": V(5, "sweep {eps} --ref mnist --cell ddpm:2 --n 2 --seeds 0 --out-dir {tmp}/sweep",
                                   r"sweep\.json is not a sweep record; pass --force", write("sweep/sweep.json",
                                                                                               b"{not json")),
    "eval-sweep-model-missing": V(4, "sweep {tmp}/none.onnx --ref mnist --out-dir {tmp}/sweep",
                                  r"none\.onnx not found"),
    "eval-sweep-one-image": V(4, "sweep {eps} --ref mnist --n 1 --out-dir {tmp}/sweep", r"--n must be >= 2"),
    "eval-sweep-bad-cell": V(4, "sweep {eps} --ref mnist --cell ddpm --out-dir {tmp}/sweep", r"bad --cell 'ddpm'; "
                             "write SAMPLER:STEPS"),
    "eval-interpolate-out-exists": V(5, "interpolate {onnx} --data {tmp}/d.npz --pairs 1 --mixes 2 "
                                     "--out {tmp}/i.png", r"i\.png already exists; pass --force",
                                     npz({"arr_0": np.zeros((2, 32, 32, 1), np.uint8)}, more=write("i.png"))),
    # the C++ host
    "cpp-n-beyond-range": C(1, "{step} --n 2000000 --out {tmp}/s.npy", r"--n expects an integer in \[1, 1048576\]"),
    "cpp-n-beyond-memory": C(1, "{bigstep} --n 1048576 --out {tmp}/s.npy",
                             r"1048576 images need at least [\d.]+ GiB of memory"),
    "cpp-noise-nan": C(2, "{step} --noise {tmp}/noise.npy --out {tmp}/s.npy",
                       r"noise\.npy holds NaN or inf in entry 2 \(the noise of step 2\)",
                       noise_with(float("nan"), steps=T_GRAPH)),
    "cpp-graph-outputs-inf": C(2, "{nanstep} --n 2 --out {tmp}/s.npy",
                               r"sampling produced NaN or inf at step 1 of 100 \(t=99\).*nothing was written"),
    "cpp-seed-overflow": C(4, "{step} --seed 100000000000000000000 --out {tmp}/s.npy",
                           r"--seed expects an integer in \[0, 9223372036854775807\]"),
    "cpp-metadata-lies": C(3, "{lyingstep} --out {tmp}/s.npy", r"do not fit its metadata image shape 3,8,8"),
    "cpp-eps-graph": C(3, "{eps} --out {tmp}/s.npy", r"graph of kind 'eps'"),
    "cpp-noise-wrong-shape": C(3, "{step} --noise {tmp}/n.npy --out {tmp}/s.npy", r"has shape \[5,2,1,4,4\]",
                               lambda tmp: np.save(tmp / "n.npy", np.zeros((5, 2, 1, 4, 4), np.float32))),
    "cpp-model-missing": C(4, "{tmp}/none.onnx --out {tmp}/s.npy", r"model file not found"),
    "cpp-out-not-npy": C(4, "{step} --out {tmp}/s.bin", r"--out .*s\.bin would hold a \.npy array"),
    "cpp-out-under-a-file": C(4, "{step} --out {tmp}/f/s.npy", r"f is a file, not a folder", write("f")),
    "cpp-grid-png": C(4, "{step} --out {tmp}/s.npy --grid {tmp}/g.png", r"--grid must name a \.pgm or \.ppm"),
    "cpp-threads-negative": C(4, "{step} --out {tmp}/s.npy --threads -1", r"--threads expects an integer"),
    "cpp-out-exists": C(5, "{step} --out {tmp}/s.npy", r"s\.npy already exists; pass --force", write("s.npy")),
    "cpp-grid-exists": C(5, "{step} --out {tmp}/s.npy --grid {tmp}/g.pgm", r"g\.pgm already exists",
                         write("g.pgm")),
}


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file and folder under `folders`, with the SHA-256 of each file."""
    seen = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return seen


def expand(argv: list[str], tmp: Path, art: dict[str, Path]) -> list[str]:
    values = {"tmp": str(tmp), **{k: str(v) for k, v in art.items()}}
    return [a.format(**values) for a in argv]


def run_tool(tool: str, argv: list[str], capsys: pytest.CaptureFixture[str], binary: Path | None) -> tuple[int, str]:
    if tool == "cpp":
        assert binary is not None
        proc = subprocess.run([str(binary), *argv], capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stderr
    main = {"train": train_main, "export": export_main, "run": run_main, "eval": eval_main}[tool]
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def error_line(tool: str, err: str) -> str:
    """The single error line of stderr; anything else must be progress output."""
    prefix = "ddpm_sample: error: " if tool == "cpp" else "error: "
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(prefix)]
    assert "Traceback" not in err, err
    assert len(errors) == 1, err
    assert all(ln in errors or PROGRESS.search(ln) for ln in lines), err
    return errors[0]


@pytest.fixture
def host(request: pytest.FixtureRequest) -> Path | None:
    """The C++ host for cpp rows only (built once; skipped where build.sh cannot build it)."""
    return request.getfixturevalue("ddpm_sample") if "cpp" in request.node.callspec.id else None


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_bad_input(name: str, art: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch, host: Path | None) -> None:
    case = CASES[name]
    monkeypatch.chdir(tmp_path)  # default outputs land here, where they are looked for
    if case.prep is not None:
        case.prep(tmp_path)
    shared = (art["ckpt"].parent, art["export"], art["eps"].parent)
    before = snapshot(tmp_path, *shared)
    code, err = run_tool(case.tool, expand(case.argv, tmp_path, art), capsys, host)
    assert code != 0, err
    line = error_line(case.tool, err)
    assert re.search(case.pattern, line), line
    assert snapshot(tmp_path, *shared) == before, "a file was left behind, changed or removed"


def test_catalogue_covers_every_tool_and_kind() -> None:
    counts = {(c.tool, c.kind) for c in CASES.values()}
    assert len(CASES) >= 100
    assert {tool for tool, _ in counts} == {"train", "export", "run", "eval", "cpp"}
    assert {kind for _, kind in counts} == {1, 2, 3, 4, 5}
    for tool in ("train", "run", "eval", "cpp"):
        assert {k for t, k in counts if t == tool} == {1, 2, 3, 4, 5}, tool


# ---------------------------------------------------------------- near misses: valid inputs that must work

def test_near_misses_of_ddpm_run_succeed(art: dict[str, Path], tmp_path: Path) -> None:
    user = {tmp_path / "S.NPZ.tmp": b"mine", tmp_path / ".S.NPZ.tmp": b"mine too"}
    for path, data in user.items():
        path.write_bytes(data)
    run_main([str(art["eps"]), "--n", "2", "--steps", "3", "--seed", str(2**63 - 1), "--out", str(tmp_path / "S.NPZ")])
    run_main([str(art["eps"]), "--n", "2", "--sampler", "ddim", "--eta", "1", "--steps", "2",
              "--out", str(tmp_path / "S.NPZ"), "--force", "--save-noise", str(tmp_path / "n.npy")])
    run_main([str(art["eps"]), "--n", "2", "--sampler", "ddpm", "--steps", "2", "--noise", str(tmp_path / "n.npy"),
              "--out", str(tmp_path / "t.npz")])
    with np.load(tmp_path / "S.NPZ") as f:
        assert f["samples"].shape == (2, *SHAPE) and np.isfinite(f["samples"]).all()
    assert all(path.read_bytes() == data for path, data in user.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".S.NPZ.tmp", "S.NPZ", "S.NPZ.tmp", "n.npy",
                                                                 "t.npz"])


def test_near_misses_of_ddpm_train_and_export_succeed(art: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "c.pt"
    train_main([*TINY, "--steps", "1", "--lr", "1e-3", "--ema-decay", "0", "--seed", str(2**63 - 1),
                "--out", str(out)])
    assert load_checkpoint(out).step == 1
    export_main([str(out), "--no-fp16", "--no-step-graph", "--no-validate", "--max-batch", "1", "--opset", "18"])
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["model.onnx"]


def test_near_misses_of_the_cpp_host_succeed(ddpm_sample: Path, art: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "s.npy.tmp").write_bytes(b"the user's own file")
    (tmp_path / "s.npy").write_bytes(b"old result")
    args = [str(art["step"]), "--n", "2", "--seed", str(2**63 - 1), "--out", str(tmp_path / "s.npy"), "--force"]
    proc = subprocess.run([str(ddpm_sample), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "s.npy").shape == (2, *SHAPE)
    assert (tmp_path / "s.npy.tmp").read_bytes() == b"the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npy", "s.npy.tmp"]


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c.pt"
    code, err = run_tool("train", [*TINY, "--steps", "6", "--lr", "1e30", "--warmup", "0", "--save-every", "1",
                                   "--out", str(out)], capsys, None)
    line = error_line("train", err)
    assert code == 2
    match = re.search(r"(the training loss became|the (EMA )?weights hold) .* at step (\d+): the run diverged.*"
                      r"c\.pt keeps the last good checkpoint \(step (\d+)\); continue it with --resume", line)
    assert match, line
    kept = load_checkpoint(out)
    assert kept.step == int(match.group(4)) < int(match.group(3)) <= 6
    assert all(bool(torch.isfinite(v).all()) for v in kept.ema.values() if v.is_floating_point())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no preview grid of garbage, no temp file
