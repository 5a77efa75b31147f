"""`ddpm-run` end to end on the exported tiny model: outputs, parity across backends, and user errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.run.cli import main
from runtime.sampling.noise import chain_noise

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: object) -> None:
    main([str(a) for a in args])


def fail_cli(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    """Run ddpm-run expecting a user error: exit status 2 and exactly one `error:` line on stderr."""
    with pytest.raises(SystemExit) as exc:
        run_cli(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_onnx_run_writes_npz_grid_and_summary(tiny_export_dir, tmp_path, capsys):
    out, grid = tmp_path / "s.npz", tmp_path / "g.png"
    run_cli(tiny_export_dir / "model.onnx", "--n", 5, "--steps", 20, "--out", out, "--grid", grid, "--threads", 1)
    summary = capsys.readouterr().out
    assert "5 images" in summary and "images/s" in summary
    with np.load(out) as f:
        pictures, samples = f["arr_0"], f["samples"]
    assert pictures.shape == (5, 32, 32, 1) and pictures.dtype == np.uint8
    assert samples.shape == (5, 1, 32, 32) and samples.dtype == np.float32
    np.testing.assert_array_equal(pictures[..., 0], np.clip(np.rint((samples[:, 0] + 1) * 127.5), 0, 255))
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "s.npz"]  # no temp files left behind


def _samples(path: Path) -> np.ndarray:
    with np.load(path) as f:
        return f["samples"]


@pytest.mark.slow
@pytest.mark.parametrize("chain", [["--sampler", "ddpm"], ["--sampler", "ddim", "--steps", "ddim50"]],
                         ids=["ddpm1000", "ddim50"])
def test_checkpoint_and_onnx_give_the_same_samples(tiny_checkpoint, tiny_export_dir, tmp_path, chain):
    """Same seed, FP32 on CPU: eager PyTorch and ONNX Runtime agree after the whole chain."""
    for name, model in (("pt", tiny_checkpoint), ("onnx", tiny_export_dir / "model.onnx")):
        run_cli(model, "--n", 2, *chain, "--seed", 3, "--out", tmp_path / f"{name}.npz", "--threads", 1)
    diff = np.abs(_samples(tmp_path / "pt.npz") - _samples(tmp_path / "onnx.npz")).max()
    assert diff <= 1e-3
    assert _samples(tmp_path / "pt.npz").std() > 0.1


def test_batch_size_does_not_change_samples(tiny_export_dir, tmp_path):
    model = tiny_export_dir / "model.onnx"  # exported with max_batch 4: n = 6 splits into 4 + 2 by default
    for b in ("1", "3", None):
        run_cli(model, "--n", 6, "--steps", "ddim10", "--sampler", "ddim", "--eta", 0.5, "--seed", 9,
                "--out", tmp_path / f"b{b}.npz", "--threads", 1, *(["--batch-size", b] if b else []))
    ref = _samples(tmp_path / "bNone.npz")
    for b in ("1", "3"):
        np.testing.assert_allclose(_samples(tmp_path / f"b{b}.npz"), ref, atol=1e-5)


def test_saved_noise_replays_the_run_and_matches_chain_noise(tiny_export_dir, tmp_path):
    model = tiny_export_dir / "model.onnx"
    noise = tmp_path / "noise.npy"
    run_cli(model, "--n", 3, "--steps", 10, "--seed", 4, "--out", tmp_path / "a.npz", "--save-noise", noise)
    np.testing.assert_array_equal(np.load(noise), chain_noise(4, 3, (1, 32, 32), 10))
    run_cli(model, "--n", 3, "--steps", 10, "--seed", 99, "--noise", noise, "--out", tmp_path / "b.npz")
    np.testing.assert_array_equal(_samples(tmp_path / "a.npz"), _samples(tmp_path / "b.npz"))


def test_fp16_graph_stays_close_to_fp32(tiny_export_dir, tmp_path):
    for precision in ("fp32", "fp16"):
        run_cli(tiny_export_dir / "model.onnx", "--n", 4, "--sampler", "ddim", "--steps", "ddim50",
                "--precision", precision, "--out", tmp_path / f"{precision}.npz", "--threads", 1)
    diff = np.abs(_samples(tmp_path / "fp16.npz") - _samples(tmp_path / "fp32.npz")).max()
    assert 0 < diff < 0.1  # 0 would mean the FP16 graph was not used


@pytest.mark.slow
def test_step_graph_runs_the_whole_update_like_the_host_loop(tiny_export_dir, tmp_path):
    """model.step.onnx with bound (ping-pong) buffers, two batch shapes, equals the eps graph + NumPy update."""
    for name in ("model.onnx", "model.step.onnx"):
        run_cli(tiny_export_dir / name, "--n", 3, "--sampler", "ddpm", "--batch-size", 2, "--out",
                tmp_path / f"{name}.npz", "--threads", 1)
    np.testing.assert_allclose(_samples(tmp_path / "model.step.onnx.npz"), _samples(tmp_path / "model.onnx.npz"),
                               atol=1e-5)


# --- user errors: one line, exit 2, no partial output ---------------------------------------------------------


def test_missing_unknown_and_corrupt_files(tiny_export_dir, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert "not found" in fail_cli(capsys, tmp_path / "nope.onnx", "--out", out)
    (tmp_path / "m.h5").write_bytes(b"x")
    assert "unknown model file type" in fail_cli(capsys, tmp_path / "m.h5", "--out", out)
    for name in ("bad.onnx", "bad.pt"):
        (tmp_path / name).write_bytes(b"\x00garbage" * 100)
        msg = fail_cli(capsys, tmp_path / name, "--out", out)
        assert "not a" in msg and name in msg
    assert not out.exists()


def test_onnx_without_ddpm_metadata(tiny_export_dir, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(tiny_export_dir / "model.onnx")
    del model.metadata_props[:]
    onnx.save(model, tmp_path / "foreign.onnx")
    assert "no ddpm-deploy metadata" in fail_cli(capsys, tmp_path / "foreign.onnx", "--out", tmp_path / "s.npz")


@pytest.mark.parametrize("args,message", [
    (["--n", "0"], "0 is not in the range x>=1"),
    (["--n", "-3"], "-3 is not in the range x>=1"),
    (["--sampler", "ddpm", "--steps", "ddim999"], "cannot take exactly 999"),
    (["--steps", "1001"], "cannot take 1001 steps"),
    (["--sampler", "ddpm", "--steps", "10,x"], "bad --steps '10,x'"),
    (["--steps", "ddim50"], "ddimK and section counts respace --sampler ddpm or ddim"),
    (["--batch-size", "5"], "--batch-size must lie in 1..4"),
    (["--sampler", "euler"], "'euler' is not one of"),
    (["--eta", "2", "--sampler", "ddim"], "eta must lie in"),
    (["--provider", "cuda"], None),  # this machine's onnxruntime has no CUDA provider
    (["--threads", "-1"], "-1 is not in the range x>=0"),
])
def test_bad_options(tiny_export_dir, tmp_path, capsys, args, message):
    import onnxruntime

    if args[:2] == ["--provider", "cuda"]:
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            pytest.skip("CUDA provider present")
        message = "needs onnxruntime-gpu"
    out = tmp_path / "s.npz"
    assert message in fail_cli(capsys, tiny_export_dir / "model.onnx", "--out", out, "--steps", "5", *args)
    assert list(tmp_path.iterdir()) == []


def test_grid_format_follows_its_extension_and_suffixes_match_in_any_case(tiny_export_dir, tmp_path, capsys):
    upper = tmp_path / "MODEL.ONNX"
    shutil.copy(tiny_export_dir / "model.onnx", upper)
    for bad in ("g.xyz", "g"):
        assert "Pillow writes no" in fail_cli(capsys, upper, "--n", 2, "--steps", 3, "--out", tmp_path / "s.npz",
                                              "--grid", tmp_path / bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MODEL.ONNX"]  # refused before sampling
    run_cli(upper, "--n", 2, "--steps", 3, "--out", tmp_path / "s.npz", "--grid", tmp_path / "g.JPG")
    jpeg = (tmp_path / "g.JPG").read_bytes()
    assert jpeg[:3] == b"\xff\xd8\xff"  # a JPEG, as the name says


def test_outputs_are_never_clobbered_or_left_partial(tiny_export_dir, tmp_path, capsys):
    model = tiny_export_dir / "model.onnx"
    existing = tmp_path / "s.npz"
    existing.write_bytes(b"keep me")
    assert "already exists; pass --force" in fail_cli(capsys, model, "--n", 1, "--steps", 3, "--out", existing)
    assert existing.read_bytes() == b"keep me"
    assert "does not exist" in fail_cli(capsys, model, "--n", 1, "--out", tmp_path / "no" / "s.npz")
    assert "is a directory" in fail_cli(capsys, model, "--n", 1, "--out", tmp_path, "--force")
    noise = tmp_path / "noise.npy"
    np.save(noise, np.zeros((3, 1, 1, 32, 32), np.float32))
    assert "needs float32 [6, 1, 1, 32, 32]" in fail_cli(capsys, model, "--n", 1, "--steps", 5, "--noise", noise,
                                                          "--out", tmp_path / "t.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noise.npy", "s.npz"]
    run_cli(model, "--n", 1, "--steps", 3, "--out", existing, "--force")
    assert _samples(existing).shape == (1, 1, 32, 32)


def test_step_graph_refuses_chains_it_cannot_run(tiny_export_dir, tmp_path, capsys):
    msg = fail_cli(capsys, tiny_export_dir / "model.step.onnx", "--steps", 50, "--out", tmp_path / "s.npz")
    assert "step graph" in msg and "model.onnx" in msg


# --- the lean install: no torch, onnx, onnxscript or polygraphy ------------------------------------------------

BLOCKER = """
import importlib, importlib.abc, pkgutil, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "onnx", "onnxscript", "polygraphy", "tensorrt"}:
            raise ImportError(f"{name} is blocked in the lean-runtime test")
sys.meta_path.insert(0, Blocker())
import runtime
for mod in pkgutil.walk_packages(runtime.__path__, "runtime."):
    importlib.import_module(mod.name)
from runtime.run.cli import main
main(sys.argv[1:])
"""


def test_runtime_imports_and_runs_without_torch_or_onnx(tiny_export_dir, tiny_checkpoint, tmp_path):
    def lean(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", BLOCKER, *map(str, args)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)

    done = lean(tiny_export_dir / "model.onnx", "--n", 8, "--steps", 50, "--out", "s.npz", "--grid", "g.png",
                "--threads", 1)
    assert done.returncode == 0, done.stderr
    assert _samples(tmp_path / "s.npz").shape == (8, 1, 32, 32) and (tmp_path / "g.png").is_file()
    refused = lean(tiny_checkpoint, "--n", 1, "--out", "t.npz")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        "error: tiny.pt is a PyTorch model and needs torch; install ddpm-deploy[torch] or pass an exported "
        ".onnx file"]
    assert not (tmp_path / "t.npz").exists()


def test_console_script_reports_errors_without_traceback(tmp_path):
    script = shutil.which("ddpm-run", path=str(Path(sys.executable).parent))
    assert script, "ddpm-run console script is not installed"
    done = subprocess.run([script, str(tmp_path / "missing.onnx")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: model file {tmp_path / 'missing.onnx'} not found"
