"""Checks shared by every entry point: option types that refuse what cannot be meant, and the non-finite check.

A NaN or inf never passes silently: options refuse them at parse time, and arrays are checked with one float64 sum
(any NaN or inf makes the sum non-finite; finite float32 values cannot overflow a float64 sum), which is far cheaper
than a model call.
"""

from __future__ import annotations

import math
from pathlib import Path

import click
import numpy as np

from runtime.errors import DDPMError

SEED_MAX = 2**63 - 1  # what torch.manual_seed, numpy's SeedSequence and the C++ host (int64) all accept
SEED = click.IntRange(0, SEED_MAX)


class NonFiniteError(DDPMError):
    """A NaN or inf appeared where only finite numbers make sense (a broken model, noise file or learning rate)."""


class FiniteFloat(click.ParamType):
    """A float option that refuses nan and inf (click's FLOAT takes them)."""

    name = "float"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE = FiniteFloat()


def all_finite(x: np.ndarray) -> bool:
    """True when no element of x is NaN or inf (one pass, no temporary the size of x)."""
    return bool(np.isfinite(np.add.reduce(x, axis=None, dtype=np.float64)))


def require_suffix(path: Path, suffixes: tuple[str, ...], option: str, what: str) -> None:
    """Refuse an output name whose extension promises another format than the one written."""
    if path.suffix.lower() not in suffixes:
        raise DDPMError(f"{option} {path} would hold {what}; give it the {' or '.join(suffixes)} extension")
