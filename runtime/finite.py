"""The non-finite check: a NaN or inf never passes silently.

Arrays are checked with one float64 sum (any NaN or inf makes the sum non-finite; finite float32 values cannot
overflow a float64 sum), which is far cheaper than a model call.
"""

from __future__ import annotations

import numpy as np


def all_finite(x: np.ndarray) -> bool:
    """True when no element of x is NaN or inf (one pass, no temporary the size of x)."""
    return bool(np.isfinite(np.add.reduce(x, axis=None, dtype=np.float64)))
