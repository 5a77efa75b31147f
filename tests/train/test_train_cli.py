"""ddpm-train end to end on a tiny run, and every bad input as one error line, exit 2, nothing left behind."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from train.checkpoint import load_checkpoint  # noqa: E402
from train.cli import main  # noqa: E402
from train.model import PRESETS  # noqa: E402

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
    (["--out", "{tmp}/a_file/c.pt"], ["a_file is a file, not a folder"]),
    (["--out", "{tmp}/new/c.pt", "--preset", "huge"], ["unknown preset"]),  # no folder made for a bad run
    (["--steps", "0"], ["--steps"]),
    (["--steps", "ten"], ["ten"]),
    (["--resume"], ["nothing to resume"]),
    (["--device", "tpu"], ["unknown device"]),
    (["--sample-steps", "abc"], ["abc"]),
    (["--save-every", "-1"], ["--save-every"]),
    (["--lr-schedule", "step"], ["--lr-schedule", "step"]),
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
    assert proc.stderr.strip().splitlines() == [f"error: unknown preset 'nope'; use one of {', '.join(PRESETS)}"]


def test_preview_is_what_ddpm_run_samples_from_the_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from runtime.run.cli import main as ddpm_run

    out = tmp_path / "ckpt.pt"
    code, err = run(TINY + ["--steps", 12, "--seed", 4, "--sample-steps", 3, "--out", out], capsys)
    assert code == 0, err
    assert "speed: " in err and "CPU s/step" in err  # measured over steps 2-11, before the run ends
    ddpm_run([str(out), "--n", "64", "--sampler", "ddpm", "--steps", "3", "--seed", "4",
              "--out", str(tmp_path / "s.npz"),
              "--grid", str(tmp_path / "run.png")])
    preview = np.asarray(Image.open(out.with_name("ckpt.samples.png")))
    assert preview.shape == (8 * 30 + 2, 8 * 30 + 2) and preview.std() > 10  # 64 MNIST-sized images, borders
    assert np.array_equal(preview, np.asarray(Image.open(tmp_path / "run.png")))


@pytest.mark.parametrize("module", ["train.cli", "runtime.run.cli", "ddpm_export.cli", "evaluation.cli", "runtime.serving.cli"])
def test_every_cli_states_its_defaults_and_version(module: str) -> None:
    import importlib

    commands = [c for c in vars(importlib.import_module(module)).values() if isinstance(c, click.Command)]
    params = [param for command in commands for param in command.params]  # groups' subcommands are in vars too
    options = [p for p in params if isinstance(p, click.Option) and not p.is_flag
               and isinstance(p.default, (int, float, str, Path))]  # a value, not None or click's "unset"
    assert options
    for option in options:  # a default is shown by click or written into the help text
        assert option.show_default or "[default:" in (option.help or ""), option.name
    proc = subprocess.run([sys.executable, "-c", f"from {module} import main; main()", "--version"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith(importlib.metadata.version("ddpm-deploy")), proc
