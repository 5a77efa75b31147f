"""What kill -9 and a second writer leave behind (issue 16, kind 5), through the real entry points.

A killed run is simulated at its most exposed moment: in the child process `os.fsync` of the named temp file blocks,
so the run stops with that file (and any staging folder) fully written but not yet renamed into place, and is then
killed with SIGKILL.
The normal run that follows must remove what the dead one left and give the result of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from runtime.run.cli import main as run_main  # noqa: E402
from runtime.fileio import TEMP_TAG  # noqa: E402
from test_bad_inputs import TINY, art  # noqa: E402,F401  (art: the shared one-node graphs)
from test_cpp_host import ddpm_sample  # noqa: E402,F401
from train.checkpoint import load_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Runs a CLI's main(argv) with os.fsync blocking forever on files whose path holds argv[2]: the run hangs right
# before renaming that file into place.
STUCK = """
import importlib, os, sys, time
real, pattern = os.fsync, sys.argv[2]
def fsync(fd):
    if pattern in os.readlink(f"/proc/self/fd/{fd}"):
        time.sleep(3600)
    real(fd)
os.fsync = fsync
module, func = sys.argv[1].split(":")
getattr(importlib.import_module(module), func)(sys.argv[3:])
"""


def temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if TEMP_TAG in p.name]


def kill_when_stuck(tmp: Path, entry: str, target: str, *args: object) -> list[Path]:
    """Start `entry` (module:function) with `args`, SIGKILL it once it writes the temp file of `target` (a file
    name); return the temp files and folders it left."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    pattern = f".{target}{TEMP_TAG}"
    proc = subprocess.Popen([sys.executable, "-c", STUCK, entry, pattern, *map(str, args)], cwd=tmp, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not any(pattern in p.name for p in temps(tmp)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # let the blocked fsync be reached
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    left = temps(tmp)
    assert left, f"the run ended before writing a temp file: {err[-2000:]}"
    return left


def test_killed_checkpoint_save_leaves_nothing_after_the_next_run(tmp_path: Path) -> None:
    from train.cli import main as train_main

    args = [*TINY, "--steps", "2", "--save-every", "1", "--out"]
    left = kill_when_stuck(tmp_path, "train.cli:main", "c.pt", *args, tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists() and all(p.name.startswith(".c.pt" + TEMP_TAG) for p in left)
    train_main([*args, str(tmp_path / "c.pt")])
    (tmp_path / "ref").mkdir()
    train_main([*args, str(tmp_path / "ref" / "c.pt")])
    assert temps(tmp_path) == []
    got, ref = load_checkpoint(tmp_path / "c.pt"), load_checkpoint(tmp_path / "ref" / "c.pt")
    assert got.step == ref.step == 2
    assert all(torch.equal(got.ema[k], ref.ema[k]) for k in ref.ema)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.samples.png", "ref"]


@pytest.mark.slow
def test_killed_export_leaves_nothing_after_the_next_run(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from ddpm_export.cli import main as export_main

    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(tiny_checkpoint.read_bytes())
    args = [ckpt, "--no-fp16", "--max-batch", "2"]
    left = kill_when_stuck(tmp_path, "ddpm_export.cli:main", "model.onnx", *args)
    assert any(p.is_dir() and p.parent == tmp_path / "export" for p in left)  # the staging folder
    export_main(list(map(str, args)))
    assert temps(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["model.onnx", "model.step.onnx",
                                                                       "validation.json"]


def test_killed_write_of_out_leaves_nothing_after_the_next_run(art: dict[str, Path], tmp_path: Path) -> None:
    args = [art["eps"], "--n", "3", "--steps", "3", "--seed", "5", "--out"]
    left = kill_when_stuck(tmp_path, "runtime.run.cli:main", "s.npz", *args, tmp_path / "s.npz")
    assert (tmp_path / "s.npz.partial").is_dir() and any(p.name.startswith(".s.npz" + TEMP_TAG) for p in left)
    run_main([*map(str, args), str(tmp_path / "s.npz")])
    run_main([*map(str, args), str(tmp_path / "ref.npz")])
    assert temps(tmp_path) == []
    with np.load(tmp_path / "s.npz") as got, np.load(tmp_path / "ref.npz") as ref:
        np.testing.assert_array_equal(got["samples"], ref["samples"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz", "s.npz"]


def test_cpp_host_clears_temps_of_dead_runs_and_keeps_the_rest(ddpm_sample: Path, art: dict[str, Path],
                                                               tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".s.npy{TEMP_TAG}{dead.pid}-Ab12Cd"  # what a run killed while writing leaves
    live = tmp_path / f".s.npy{TEMP_TAG}{os.getpid()}-Xy34Zw"  # a live run's temp file
    users = [tmp_path / "s.npy.tmp", tmp_path / ".s.npy.tmp"]
    for p in (stale, live, *users):
        p.write_bytes(b"x")
    proc = subprocess.run([str(ddpm_sample), str(art["step"]), "--n", "2", "--out", str(tmp_path / "s.npy")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and live.exists() and all(p.read_bytes() == b"x" for p in users)
    assert np.load(tmp_path / "s.npy").shape == (2, 1, 8, 8)


def test_two_runs_writing_the_same_out_one_wins(art: dict[str, Path], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "s.npz"
    cmd = [sys.executable, "-c", "import sys; from runtime.run.cli import main; main(sys.argv[1:])", str(art["eps"]),
           "--n", "4000", "--steps", "8", "--batch-size", "50", "--threads", "1", "--out", str(out)]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    loser = next(err for code, err in results if code)
    assert "Traceback" not in loser
    assert any(s in loser for s in ("another ddpm-run is writing", "already exists", "written by another run")), loser
    with np.load(out) as f:
        assert f["samples"].shape == (4000, 1, 8, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]
