"""ddpm-train under torchrun on CPUs (gloo): only rank 0 writes, the result equals a one-process run with the same
global batch, a 2-rank run resumes in one process, and a killed rank fails the job without a broken checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from train.checkpoint import load_checkpoint  # noqa: E402
from train.cli import main  # noqa: E402

TINY = ["--preset", "tiny", "--batch-size", "4", "--sample-steps", "2", "--seed", "5"]
TOLERANCE = 1e-5

# Runs train.cli.main and records, per rank, which of the CLI's writers it called (in a folder outside the run's).
SPY = """
import json, os, sys
import train.cli as cli
calls = []
def spy(name, real):
    def wrapper(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)
    return wrapper
cli.save_checkpoint = spy("checkpoint", cli.save_checkpoint)
cli.save_sample_grid = spy("grid", cli.save_sample_grid)
try:
    cli.main(sys.argv[1:])
finally:
    with open(os.path.join(sys.argv[0] + ".rank" + os.environ["RANK"] + ".json"), "w") as f:
        json.dump(calls, f)
"""


def torchrun(script: Path | None, args: list[str], **popen) -> subprocess.Popen:
    """torchrun --standalone --nproc_per_node 2 [script | -m train.cli] args, from the repository root."""
    target = [str(script)] if script else ["-m", "train.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target,
           *[str(a) for a in args]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def train_in_process(args: list[str], capsys: pytest.CaptureFixture) -> None:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert exc.code == 0, capsys.readouterr().err
    capsys.readouterr()


def max_weight_difference(a: Path, b: Path) -> float:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.step == cb.step
    return max(float((ca.__dict__[part][k] - cb.__dict__[part][k]).abs().max())
               for part in ("model", "ema") for k in ca.__dict__[part])


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-rank run of 3 steps, every writer call recorded per rank."""
    folder = tmp_path_factory.mktemp("ddp")
    spy = folder / "spy.py"
    spy.write_text(SPY)
    proc = torchrun(spy, TINY + ["--steps", "3", "--save-every", "2", "--sample-every", "2",
                                 "--out", folder / "run" / "ckpt.pt"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return folder


def test_only_rank_0_writes(two_rank_run: Path) -> None:
    calls = {r: json.loads((two_rank_run / f"spy.py.rank{r}.json").read_text()) for r in (0, 1)}
    assert calls == {0: ["checkpoint", "grid", "checkpoint", "grid"], 1: []}  # step 2, then the end (step 3)
    assert sorted(p.name for p in (two_rank_run / "run").iterdir()) == ["ckpt.pt", "ckpt.samples.png"]


def test_two_ranks_equal_one_process_and_resume_across_world_sizes(two_rank_run: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    ddp = two_rank_run / "run" / "ckpt.pt"
    single = tmp_path / "single.pt"
    train_in_process(TINY + ["--steps", "3", "--out", single], capsys)
    assert load_checkpoint(ddp).train_config == load_checkpoint(single).train_config
    difference = max_weight_difference(ddp, single)
    print(f"2 ranks vs 1 process, max abs weight difference after 3 steps: {difference:.2e}")
    assert difference <= TOLERANCE  # two half-batch gradient means averaged instead of one mean: rounding only

    # 2 ranks -> 1 process: continue both runs to step 5 in this process; they stay together
    resumed = tmp_path / "resumed.pt"
    resumed.write_bytes(ddp.read_bytes())
    train_in_process(TINY + ["--steps", "5", "--out", resumed, "--resume"], capsys)
    train_in_process(TINY + ["--steps", "5", "--out", single, "--resume"], capsys)
    assert load_checkpoint(resumed).step == 5
    assert max_weight_difference(resumed, single) <= TOLERANCE


def _worker(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker process of `rank` (a child of the launcher with RANK in its environment)."""
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            if f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
    return None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
@pytest.mark.parametrize("rank", [1, 0])
def test_killed_rank_fails_the_job_and_leaves_a_whole_checkpoint(rank: int, tmp_path: Path) -> None:
    out = tmp_path / "ckpt.pt"
    proc = torchrun(None, TINY + ["--steps", "100000", "--save-every", "1", "--out", out])
    try:
        deadline = time.monotonic() + 240
        while not out.exists():  # periodic checkpoints are being written: the run is in the middle
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        worker = _worker(proc.pid, rank)
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, output
    # the survivor stops with one error line (torchrun's own report of the failed job follows it)
    assert "error: " in output and not any(line.startswith("[rank") for line in output.splitlines()), output
    assert 1 <= load_checkpoint(out).step < 100000  # the last periodic checkpoint, whole
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "ckpt.pt")
    if rank == 0:  # SIGKILL cannot be cleaned up after: at most the killed writer's temp file, never at --out
        assert all(name.startswith(".ckpt.pt.ddpm-tmp-") for name in left), left  # the next write clears it
    else:
        assert left == [], left  # the survivor (rank 0, the writer) removed its temp file on SIGTERM
