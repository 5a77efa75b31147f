"""`ddpm-run` on large n: bounded memory, resume after SIGKILL with identical samples, disk check, Fig. 6 output.

Most tests use a one-node ONNX eps graph (eps = 0.5 x_t, with ddpm-deploy metadata) so that 20,000 images cost
seconds: what is measured is the runtime's output path, not the model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import cheap_model
from runtime.run.cli import main

onnx = pytest.importorskip("onnx")

REPO = Path(__file__).resolve().parents[2]
SHAPE = (1, 32, 32)
# Runs ddpm-run in a child and prints its peak RSS (KiB) last; the exit status is ddpm-run's.
RSS_RUNNER = ("import resource, sys\nfrom runtime.run.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
              "    print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n")


@pytest.fixture(scope="module")
def cheap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cheap_model(tmp_path_factory.mktemp("cheap") / "cheap.onnx")


def child(*args: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", RSS_RUNNER, *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def peak_rss_mb(*args: object) -> float:
    proc = child(*args)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return int(out.strip().splitlines()[-1].split()[1]) / 1024


def _samples(path: Path) -> np.ndarray:
    with np.load(path) as f:
        return f["samples"]


def test_memory_stays_one_batch_for_20000_images(cheap, tmp_path):
    """20,000 images hold 80 MB of float32 samples (+ 20 MB uint8); the run's peak RSS stays within a few MB of a
    one-batch run's."""
    common = ["--steps", 3, "--batch-size", 500, "--threads", 1]
    small = peak_rss_mb(cheap, "--n", 500, "--out", tmp_path / "small.npz", *common)
    big = peak_rss_mb(cheap, "--n", 20000, "--out", tmp_path / "big.npz", *common)
    data_mb = 20000 * int(np.prod(SHAPE)) * 5 / 2**20
    print(f"peak RSS: n=500 {small:.1f} MB, n=20000 {big:.1f} MB (samples + pictures: {data_mb:.0f} MB)")
    assert big - small < 25, (small, big)
    with np.load(tmp_path / "big.npz", mmap_mode="r") as f:
        pictures, samples = f["arr_0"], f["samples"]
        assert pictures.shape == (20000, 32, 32, 1) and samples.shape == (20000, *SHAPE)
        np.testing.assert_array_equal(samples[:500], _samples(tmp_path / "small.npz"))
        tail = samples[-7:]
        np.testing.assert_array_equal(pictures[-7:, ..., 0], np.clip(np.rint((tail[:, 0] + 1) * 127.5), 0, 255))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npz", "small.npz"]


def test_killed_run_resumes_to_identical_samples(cheap, tmp_path, capsys):
    args = ["--n", 6000, "--steps", 3, "--batch-size", 10, "--seed", 4, "--threads", 1]
    out = tmp_path / "s.npz"
    progress = tmp_path / "s.npz.partial" / "progress.json"
    proc = child(cheap, *args, "--out", out)
    deadline = time.time() + 300
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = json.loads(progress.read_text())["done"]
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= 50:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert 50 <= done < 6000 and not out.exists(), "the run should have been killed part-way"
    main([str(a) for a in (cheap, *args, "--out", out)])
    assert "resuming" in capsys.readouterr().out
    main([str(a) for a in (cheap, *args, "--batch-size", 64, "--out", tmp_path / "whole.npz")])
    np.testing.assert_array_equal(_samples(out), _samples(tmp_path / "whole.npz"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "whole.npz"]


def fail(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_run_that_cannot_fit_the_disk_is_refused_before_sampling(cheap, tmp_path, capsys, monkeypatch):
    import runtime.run.store as streaming

    monkeypatch.setattr(streaming.shutil, "disk_usage", lambda path: SimpleNamespace(free=1 << 20))
    message = fail(capsys, cheap, "--n", 1000, "--out", tmp_path / "s.npz")
    assert "not enough disk space for 1000 images" in message and "1.0 MiB free" in message
    assert "3.9 MiB partial file" in message and "4.9 MiB final .npz" in message
    assert list(tmp_path.iterdir()) == []


def test_a_partial_run_of_other_settings_needs_force(cheap, tmp_path, capsys):
    out = tmp_path / "s.npz"
    partial = tmp_path / "s.npz.partial"
    partial.mkdir()
    (partial / "progress.json").write_text(json.dumps({"done": 3, "n": 10, "key": {"seed": 99}}))
    assert "holds an unfinished run with other settings" in fail(capsys, cheap, "--n", 10, "--steps", 3,
                                                                 "--out", out)
    main([str(a) for a in (cheap, "--n", 10, "--steps", 3, "--out", out, "--force")])
    assert _samples(out).shape == (10, *SHAPE) and not partial.exists()


def test_progressive_figure_is_the_run_and_deterministic(tiny_checkpoint, tmp_path):
    """Fig. 6: the last column is the predicted x_0 at t = 0, i.e. the run's own final samples."""
    from runtime.backends import open_model
    from runtime.run.progressive import progressive
    from runtime.sampling.noise import SeededNoise
    from runtime.sampling import Chain, sample

    backend = open_model(tiny_checkpoint, threads=1)
    chain = Chain.build(backend.info.diffusion, "ddpm", "20")
    frames = progressive(backend, chain, SeededNoise(5, 0, 3, (1, 32, 32)), every=4)
    assert frames.shape == (3, 6, 1, 32, 32)  # k = 19, 15, 11, 7, 3 and the last step
    final = sample(backend, chain, 3, seed=5)
    np.testing.assert_allclose(frames[:, -1], final, atol=1e-6)
    assert np.abs(frames[:, 0] - frames[:, -1]).max() > 0.1

    args = [tiny_checkpoint, "--n", 2, "--steps", 20, "--progressive", 5, "--threads", 1]
    for name in ("a", "b"):
        main([str(a) for a in (*args, "--out", tmp_path / f"{name}.npz")])
    a, b = tmp_path / "a.progressive.png", tmp_path / "b.progressive.png"
    assert a.read_bytes() == b.read_bytes()
    from PIL import Image

    with Image.open(a) as img:  # 2 rows x 5 columns (k = 19, 14, 9, 4, 0) of 32 x 32, 2 pixels apart
        assert img.size == (2 + 5 * 34, 2 + 2 * 34)
