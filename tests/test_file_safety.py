"""What a crash or a race leaves behind, and artifacts that lie: temp files, no-replace renames, honest messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from runtime.backends import open_model
from runtime.errors import DDPMError
from runtime.fileio import TEMP_TAG, atomic_write, atomic_write_bytes, check_writable, clear_stale_temps


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # exited and reaped: no process has this pid (until the kernel reuses it)


def test_stale_temps_of_dead_processes_are_cleared_others_kept(tmp_path: Path) -> None:
    stale_file = tmp_path / f".out.npz{TEMP_TAG}{dead_pid()}-x1y2"
    stale_dir = tmp_path / f".export{TEMP_TAG}{dead_pid()}-abcd"
    live = tmp_path / f".out.npz{TEMP_TAG}{os.getpid()}-zz"
    users = [tmp_path / "out.npz.tmp", tmp_path / ".out.npz.abc.tmp", tmp_path / ".hidden"]
    stale_file.write_bytes(b"half")
    stale_dir.mkdir()
    (stale_dir / "model.onnx").write_bytes(b"half")
    for p in (live, *users):
        p.write_bytes(b"keep")
    atomic_write_bytes(tmp_path / "other.bin", b"data")
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and all(p.read_bytes() == b"keep" for p in users)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "other.bin", *(p.name for p in users)])
    assert clear_stale_temps(tmp_path) == []


def test_no_replace_refuses_a_file_that_appeared_meanwhile(tmp_path: Path) -> None:
    target = tmp_path / "samples.npz"

    def write(f) -> None:  # type: ignore[no-untyped-def]
        target.write_bytes(b"the other run's result")  # a concurrent writer finishes first
        f.write(b"ours")

    with pytest.raises(DDPMError, match="appeared while this run was writing it"):
        atomic_write(target, write, replace=False)
    assert target.read_bytes() == b"the other run's result"
    assert [p.name for p in tmp_path.iterdir()] == ["samples.npz"]  # our temp file is gone too
    atomic_write(target, write, replace=True)  # --force
    assert target.read_bytes() == b"ours"


def test_messages_give_the_true_reason(tmp_path: Path) -> None:
    a_file = tmp_path / "passwd"
    a_file.write_text("x")
    with pytest.raises(DDPMError, match=r"passwd is a file, not a folder"):
        check_writable(a_file / "s.npz")
    with pytest.raises(DDPMError, match=r"folder .*missing does not exist"):
        check_writable(tmp_path / "missing" / "s.npz")
    with pytest.raises(DDPMError, match="is a directory"):
        check_writable(tmp_path, force=True)


def _edit_metadata(src: Path, dst: Path, **changes: str) -> Path:
    model = onnx.load(src)
    for prop in model.metadata_props:
        key = prop.key.removeprefix("ddpm.")
        if key in changes:
            prop.value = changes[key]
    onnx.save(model, dst)
    return dst


def test_onnx_whose_metadata_lies_about_the_image_is_refused(tiny_export_dir: Path, tmp_path: Path) -> None:
    lying = _edit_metadata(tiny_export_dir / "model.onnx", tmp_path / "model.onnx", image_shape="3,32,32")
    with pytest.raises(DDPMError, match=r"x_t tensor\(float\) \['batch', 1, 32, 32\].*do not fit its metadata"):
        open_model(lying)


def test_export_refusals_leave_no_folder(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from ddpm_export.pipeline import export_all

    with pytest.raises(DDPMError, match="opset 99 is out of range"):
        export_all(tiny_checkpoint, tmp_path / "a", opset=99)
    with pytest.raises(DDPMError, match=r"validating max_batch 100000000 needs at least [0-9.]+ TiB of memory, [0-9.]+ GiB is available"):
        export_all(tiny_checkpoint, tmp_path / "b", max_batch=100_000_000)
    assert list(tmp_path.iterdir()) == []
