"""ddpm-train end to end on a tiny run, and every bad input as one error line, exit 2, nothing left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from train.checkpoint import load_checkpoint  # noqa: E402
from train.cli import main  # noqa: E402

TINY = ["--preset", "tiny", "--batch-size", "4", "--sample-steps", "2"]


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0]


def test_train_then_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "runs" / "ckpt.pt"  # the folder is created
    code, err = run(TINY + ["--steps", 2, "--out", out], capsys)
    assert code == 0, err
    assert load_checkpoint(out).step == 2 and (out.parent / "ckpt.samples.png").is_file()
    code, err = run(TINY + ["--steps", 3, "--out", out, "--resume"], capsys)
    assert code == 0, err
    ckpt = load_checkpoint(out)
    assert ckpt.step == 3 and ckpt.train_config["batch_size"] == 4
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt.pt", "ckpt.samples.png"]  # no temp files

    before = out.read_bytes()
    code, err = run(TINY + ["--steps", 3, "--out", out], capsys)
    assert_one_line_error(code, err, "already exists", "--force")
    assert out.read_bytes() == before


@pytest.mark.parametrize("args, words", [
    (["--dataset", "folder", "--data-dir", "{tmp}/missing"], ["does not exist"]),
    (["--dataset", "cifar10"], ["--data-dir"]),
    (["--dataset", "imagenet"], ["unknown dataset"]),
    (["--preset", "huge"], ["unknown preset"]),
    (["--out", "{tmp}/a_file/c.pt"], ["cannot create folder"]),
    (["--out", "{tmp}/new/c.pt", "--preset", "huge"], ["unknown preset"]),  # no folder made for a bad run
    (["--steps", "0"], ["--steps"]),
    (["--steps", "ten"], ["ten"]),
    (["--resume"], ["nothing to resume"]),
    (["--device", "tpu"], ["unknown device"]),
    (["--sample-steps", "abc"], ["abc"]),
    (["--save-every", "-1"], ["--save-every"]),
])
def test_bad_input(args: list[str], words: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = {"--steps": "1", "--out": str(tmp_path / "c.pt"), "--preset": "tiny"}
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    made = []
    if any("a_file" in a for a in args):
        (tmp_path / "a_file").write_text("a file, not a folder")
        made = [tmp_path / "a_file"]
    for k, v in base.items():
        if k not in args:
            args += [k, v]
    code, err = run(args, capsys)
    assert_one_line_error(code, err, *words)
    assert list(tmp_path.iterdir()) == made


@pytest.mark.parametrize("content", [b"just some text\n", None])
def test_foreign_checkpoint_for_resume(content: bytes | None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "c.pt"
    if content is None:
        torch.save({"weights": torch.zeros(3)}, out)
    else:
        out.write_bytes(content)
    before = out.read_bytes()
    code, err = run(TINY + ["--steps", 2, "--out", out, "--resume"], capsys)
    assert_one_line_error(code, err, "not", "checkpoint")
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", "from train.cli import main; main()", "--preset", "nope",
                           "--steps", "1", "--out", str(tmp_path / "c.pt")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unknown preset 'nope'; use one of cifar10, small, tiny"]
