"""Progress bars: drawn on a terminal, silenced by --quiet (every command) and TQDM_DISABLE, never written into logs
or pipes (no cursor codes)."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _stderr_on_a_terminal(args: list[str], env: dict[str, str] | None = None) -> str:
    """Run a command with stderr on a pseudo-terminal; what it drew there."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=follower, env={**os.environ, **(env or {})})
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the other side closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=120) == 0
    return b"".join(chunks).decode(errors="replace")


def _run(model: Path, out: Path) -> list[str]:
    return [str(BIN / "ddpm-run"), str(model), "--n", "2", "--sampler", "ddpm", "--steps", "3", "--threads", "1",
            "--out", str(out), "--force"]


def test_bars_on_a_terminal_and_not_when_quiet(tiny_export_dir: Path, tmp_path: Path) -> None:
    model, out = tiny_export_dir / "model.onnx", tmp_path / "s.npz"
    assert "sampling" in _stderr_on_a_terminal(_run(model, out))
    assert "sampling" not in _stderr_on_a_terminal(_run(model, out) + ["--quiet"])
    assert "sampling" not in _stderr_on_a_terminal(_run(model, out), {"TQDM_DISABLE": "1"})


def test_no_bars_and_no_cursor_codes_in_a_log(tiny_export_dir: Path, tmp_path: Path) -> None:
    done = subprocess.run(_run(tiny_export_dir / "model.onnx", tmp_path / "s.npz"), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "\x1b[" not in done.stderr and "sampling" not in done.stderr


@pytest.mark.parametrize("command", [["ddpm-train"], ["ddpm-export"], ["ddpm-export", "export"], ["ddpm-run"],
                                     ["ddpm-serve"], ["ddpm-eval", "nll"], ["ddpm-eval", "quality"],
                                     ["ddpm-eval", "sweep"], ["ddpm-eval", "interpolate"]])
def test_every_command_takes_quiet(command: list[str]) -> None:
    done = subprocess.run([str(BIN / command[0]), *command[1:], "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--quiet" in done.stdout
