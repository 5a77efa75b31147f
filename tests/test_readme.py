"""README.md is a short guide whose commands run as written.

Every ```bash block runs, in order, with `bash -euo pipefail`, in a folder laid out like a checkout after the
quickstart: small random models stand in for the trained checkpoints (runs/mnist/ckpt.pt, runs/cifar10/ckpt.pt), the
downloaded diffusers folder (ddpm-cifar10-32/, also in a Hugging Face cache as google/ddpm-cifar10-32) and the
improved-diffusion state dict (model.pt + flags.json). A block preceded by
`<!-- not run in tests: REASON -->` is skipped (long runs, a GPU, a network, a server that runs until stopped); the
reason must be given, and the scripts such a block runs with `bash` must exist.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_LINES = 250
FIRST_DEPLOY_LINE = 100  # the first command that deploys the user's own model lies within these lines
SKIP = re.compile(r"^<!--\s*not run in tests:(.*)-->$")
FENCE = re.compile(r"^```(\S*)\s*$")
OUTPUT_OPTIONS = ("--out", "--out-dir", "--grid", "--json")  # what a command names as its output must exist after it
CANNOT_BUILD = 3  # examples/cpp/build.sh: this machine cannot supply a build input (tests/test_cpp_host.py)


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None  # the reason given in the marker before the block, None when it runs


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, each with the skip marker on the non-blank line before it."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        before = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
        marker = SKIP.match(before)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"README.md:{i + 1}: code block never closed"
        blocks.append(Block(i + 1, opening.group(1), "\n".join(lines[i + 1:end]), marker.group(1).strip()
                            if marker else None))
        i = end + 1
    return blocks


def commands(block: Block) -> list[list[str]]:
    """The block's commands as argument lists (continuation lines joined, comments dropped)."""
    return [shlex.split(line, comments=True) for line in block.text.replace("\\\n", " ").splitlines()
            if shlex.split(line, comments=True)]


def named_outputs(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in OUTPUT_OPTIONS]


def helpers_from(name: str):
    """A test module of another folder of tests/, for its helpers (pytest puts only this file's folder on sys.path)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, next(REPO.glob(f"tests/**/{name}.py")))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


TEXT = README.read_text()
BLOCKS = readme_blocks(TEXT)


def test_readme_is_a_short_guide_that_deploys_a_model_early():
    lines = TEXT.splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; keep it a guide of at most {MAX_LINES}"
    deploy = [b for b in BLOCKS if b.lang == "bash" and any(argv[0] == "ddpm-export" for argv in commands(b))]
    assert deploy and deploy[0].line <= FIRST_DEPLOY_LINE, "the first ddpm-export command comes too late"
    assert {b.lang for b in BLOCKS} <= {"bash", "text"}, "a command block without `bash` would escape this test"


def test_every_skipped_block_says_why_and_its_scripts_exist():
    markers = [i + 1 for i, line in enumerate(TEXT.splitlines()) if SKIP.match(line.strip())]
    skipped = [b for b in BLOCKS if b.skip is not None]
    assert len(markers) == len(skipped), "a skip marker must stand right before a ```bash block"
    for block in skipped:
        assert block.lang == "bash" and len(block.skip.split()) >= 2, f"README.md:{block.line}: give the reason"
        for argv in commands(block):
            if argv[0] == "bash":
                assert (REPO / argv[1]).is_file(), f"README.md:{block.line}: {argv[1]} does not exist"
    quickstart = [argv for b in skipped for argv in commands(b) if argv[0] == "bash"]
    assert ["bash", "examples/quickstart.sh"] in quickstart and ["bash", "tests/run.sh"] in quickstart


def test_links_point_at_files():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", TEXT):
        if "://" not in target:
            assert (REPO / target).exists(), f"README.md links to {target}, which does not exist"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where the README's commands find the files they name, made of small random models."""
    pytest.importorskip("torch")
    from safetensors.torch import load_file
    import torch

    from conftest import make_random_checkpoint
    diffusers = helpers_from("test_source_diffusers")

    root = tmp_path_factory.mktemp("checkout")
    (root / "runs" / "mnist").mkdir(parents=True)
    make_random_checkpoint(root / "runs" / "mnist" / "ckpt.pt", image_size=28)  # MNIST-sized, like the quickstart's
    (root / "runs" / "cifar10").mkdir()
    make_random_checkpoint(root / "runs" / "cifar10" / "ckpt.pt", channels=3, image_size=32)
    diffusers.write_pipeline(root / "ddpm-cifar10-32", diffusers.make_unet(diffusers.TINY),
                             diffusers.CIFAR10_32_SCHEDULER)
    diffusers._cache_with(root / "ddpm-cifar10-32", root / "hf-cache", "google/ddpm-cifar10-32")
    fixture = REPO / "tests" / "fixtures" / "improved_diffusion"
    torch.save(load_file(fixture / "model.safetensors"), root / "model.pt")
    shutil.copy(fixture / "flags.json", root / "flags.json")
    (root / "examples").symlink_to(REPO / "examples")
    return root


@pytest.mark.slow
def test_command_blocks_run_as_written(checkout: Path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHON=sys.executable, TQDM_DISABLE="1", HF_HUB_CACHE=str(checkout / "hf-cache"), HF_HUB_OFFLINE="1")
    runnable = [b for b in BLOCKS if b.lang == "bash" and b.skip is None]
    assert runnable, "README.md has no command block that runs"
    for block in runnable:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=checkout, env=env,
                              capture_output=True, text=True, timeout=600)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
        if proc.returncode == CANNOT_BUILD and "examples/cpp/build.sh" in block.text and not os.environ.get("CI"):
            warnings.warn(f"README.md:{block.line}: cannot build the C++ example on this machine:\n{tail}")
            continue
        assert proc.returncode == 0, f"README.md:{block.line} failed with status {proc.returncode}:\n{tail}"
        for argv in commands(block):
            for output in named_outputs(argv):
                assert (checkout / output).exists(), f"README.md:{block.line}: {' '.join(argv)} wrote no {output}"
