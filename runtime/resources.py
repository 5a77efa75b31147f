"""What a request needs versus what the machine has: refuse impossible sizes before allocating anything."""

from __future__ import annotations

import os

from runtime.errors import DDPMError


def human(nbytes: float) -> str:
    """A byte count in binary units (B, KiB, ... TiB), the one size format of every message."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    raise AssertionError("unreachable")


def available_memory() -> int:
    """Bytes of memory available now (Linux: MemAvailable, else free pages); very large when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def require_memory(nbytes: int, what: str, hint: str) -> None:
    """One-line refusal when `what` needs more memory than is available."""
    have = available_memory()
    if nbytes > have:
        raise DDPMError(f"{what} needs at least {human(nbytes)} of memory, {human(have)} is available; {hint}")
