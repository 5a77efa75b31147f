"""`ddpm-export` command line: bad input gives one `error:` line and a non-zero exit, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddpm_export.cli import main
from runtime.fileio import file_sha256


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run([tmp_path / "nope.pt"], capsys)
    _assert_one_line_error(code, err, "not found")


@pytest.mark.parametrize("content", [b"not a checkpoint at all", None])
def test_foreign_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None) -> None:
    import torch

    path = tmp_path / "foreign.pt"
    if content is None:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)  # a real torch file, but not ours
    else:
        path.write_bytes(content)
    code, _, err = _run([path, "--out-dir", tmp_path / "out"], capsys)
    _assert_one_line_error(code, err, "ddpm-deploy checkpoint")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, needle", [(["--max-batch", "0"], "--max-batch"),
                                           (["--max-batch", "4", "--min-batch", "5"], "--min-batch"),
                                           (["--max-batch", "4", "--opt-batch", "9"], "--opt-batch"),
                                           (["--opset", "13"], "opset")])
def test_bad_numbers(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
                     needle: str) -> None:
    code, _, err = _run([tiny_checkpoint, "--out-dir", tmp_path / "out", "--no-validate", *flags], capsys)
    _assert_one_line_error(code, err, needle)
    assert not any((tmp_path / "out").glob("*.onnx"))


def test_unwritable_out_dir(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = _run([tiny_checkpoint, "--out-dir", blocker / "export"], capsys)
    _assert_one_line_error(code, err, "a_file is a file, not a folder")  # not "folder a_file does not exist"
    code, _, err = _run([tiny_checkpoint, "--out-dir", blocker], capsys)
    _assert_one_line_error(code, err, "is a file")


def test_engine_requested_without_tensorrt(tiny_checkpoint: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    code, _, err = _run([tiny_checkpoint, "--out-dir", tmp_path / "out", "--engine"], capsys)
    _assert_one_line_error(code, err, "--engine", "tensorrt")
    assert not (tmp_path / "out").exists()


def test_existing_outputs_need_force(tiny_checkpoint: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old")
    args = [tiny_checkpoint, "--out-dir", out, "--max-batch", "2", "--no-step-graph", "--no-validate"]
    code, _, err = _run(args, capsys)
    _assert_one_line_error(code, err, "model.onnx", "--force")
    assert (out / "model.onnx").read_bytes() == b"old" and not (out / "model.fp16.onnx").exists()

    code, stdout, err = _run([*args, "--force"], capsys)
    assert code == 0, err
    assert (out / "model.onnx").read_bytes() != b"old" and (out / "model.fp16.onnx").is_file()
    assert "fp16: " in stdout and "Traceback" not in err
    if "tensorrt package is not installed" in err:  # the skip line says how to build the engine later
        assert "ddpm-export build-engine" in err
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no staging folder left behind


def test_build_engine_errors(tiny_export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["build-engine", tmp_path / "missing.onnx"], capsys)
    _assert_one_line_error(code, err, "not found")
    before = file_sha256(tiny_export_dir / "model.step.onnx")
    code, _, err = _run(["build-engine", tiny_export_dir / "model.step.onnx", "--plan", tmp_path / "s.plan"], capsys)
    _assert_one_line_error(code, err, "step graph")
    assert file_sha256(tiny_export_dir / "model.step.onnx") == before and not (tmp_path / "s.plan").exists()
