"""The shape of the code that the layout promises: only command modules know click, runtime/ has no import cycle,
and library messages name arguments (`{opt:name}`), never a command's `--flag`."""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "train", "ddpm_export", "evaluation")
# The command layer: each file declares a CLI (and cli_common holds what they share).
COMMANDS = {"runtime/cli_common.py", "runtime/run/cli.py", "runtime/serving/cli.py", "train/cli.py",
            "ddpm_export/cli.py", "evaluation/cli.py", "evaluation/sweep.py"}
# Messages about improved-diffusion's own flags (their scripts' --image_size ...), not ours.
THEIR_FLAGS = {"train/sources/improved_diffusion_source.py", "train/improved_unet.py"}


def _modules() -> dict[str, ast.Module]:
    return {str(f.relative_to(ROOT)): ast.parse(f.read_text()) for p in PACKAGES for f in (ROOT / p).rglob("*.py")}


def _imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_only_command_modules_import_click() -> None:
    users = {path for path, tree in _modules().items() if any(n.split(".")[0] == "click" for n in _imports(tree))}
    assert users <= COMMANDS, sorted(users - COMMANDS)


def test_runtime_has_no_import_cycle() -> None:
    def name(path: str) -> str:
        return path[:-3].replace("/", ".").removesuffix(".__init__")

    graph = {name(p): {m for m in _imports(t) if m.startswith("runtime")} for p, t in _modules().items()
             if p.startswith("runtime/")}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, " -> ".join(path[path.index(node):] + [node])
        if node in done:
            return
        for dep in graph.get(node, ()):
            visit(dep, path + [node])
        done.add(node)

    for module in graph:
        visit(module, [])


def _text(node: ast.AST) -> str:
    """The literal text of a message argument: f-string parts joined, their fields as {}; other expressions empty."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(v) if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp):
        return _text(node.left) + _text(node.right)
    return ""


def test_library_messages_name_no_flag() -> None:
    flag = re.compile(r"(?<![\w`=-])--[a-z][a-z-]+")
    found = []
    for path, tree in _modules().items():
        if path in COMMANDS or path in THEIR_FLAGS:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                    "DDPMError", "NonFiniteError", "ValidationFailed"):
                for text in map(_text, node.args):
                    if flag.search(re.sub(r"`[^`]*`", "", text)):
                        found.append(f"{path}:{node.lineno}: {text}")
    assert not found, "\n".join(found)
