"""torchvision beside a CPU-only torch build.

PyPI's torchvision wheels are CUDA builds: next to a CPU-only torch (what this project installs on CPU machines)
their C++ detection ops (nms, roi_align, ...) cannot load, and torchvision then fails at import while registering
those ops' fake kernels; diffusers and pytorch-fid import torchvision when it is installed, and fail with it. None of
our paths uses those ops, so where (and only where) that import fails, the registration of their fake kernels is
skipped and torchvision imports. With a matching torch and torchvision nothing is changed.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any
from unittest import mock


def make_torchvision_importable() -> None:
    if importlib.util.find_spec("torchvision") is None or "torchvision" in sys.modules:
        return
    import torch

    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    register_fake = torch.library.register_fake

    def skip_torchvision_ops(op: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(op, str) and op.startswith("torchvision::"):
            return lambda fn: fn
        return register_fake(op, *args, **kwargs)

    with mock.patch.object(torch.library, "register_fake", skip_torchvision_ops):
        import torchvision  # noqa: F401,F811
