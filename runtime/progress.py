"""Progress bars under one policy for every command: drawn on a terminal, never into logs or pipes (no cursor
codes there), and never under `--quiet` or TQDM_DISABLE."""

from __future__ import annotations

import os
from typing import Any, Iterable

from tqdm import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence every bar of this process (the commands' --quiet)."""
    global _quiet
    _quiet = quiet


def progress(iterable: Iterable[Any] | None = None, *, show: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar, or a silent one when `show` is false, --quiet or TQDM_DISABLE is set, or stderr is no terminal."""
    off = _quiet or not show or os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")
    return tqdm(iterable, disable=True if off else None, **kwargs)  # None: tqdm stays silent off a terminal
