"""The request format of `ddpm-serve` and of the generated Triton repository, declared once.

A request holds one row per image it wants: `seed` and `index` (INT64), and optional chain options `sampler`,
`steps`, `spacing` (BYTES) and `eta` (FP64) that default to the server's options. The answer is `image`, float32
[C, H, W] per row in model space: image `index` of `ddpm-run --seed seed` with the same chain. ddpm-serve, the
Triton repository writer and the client all derive their tensors from `INPUTS` and `OUTPUT`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from runtime.errors import DDPMError

MODEL_NAME = "ddpm"
OUTPUT = "image"


class Input(NamedTuple):
    name: str
    dtype: Any  # numpy dtype: np.int64, np.float64, or np.bytes_ for text
    optional: bool


INPUTS = (Input("seed", np.int64, False), Input("index", np.int64, False), Input("sampler", np.bytes_, True),
          Input("steps", np.bytes_, True), Input("spacing", np.bytes_, True), Input("eta", np.float64, True))
INPUT_NAMES = tuple(i.name for i in INPUTS)
TRITON_TYPES = {np.int64: "TYPE_INT64", np.float64: "TYPE_FP64", np.bytes_: "TYPE_STRING", np.float32: "TYPE_FP32"}


class Options(NamedTuple):
    """A row's chain options, with ddpm-run's meaning (None: the model's or the sampler's default)."""

    sampler: str
    steps: str | None
    spacing: str | None
    eta: float | None


class Row(NamedTuple):
    seed: int
    index: int
    options: Options


def text_column(request: dict[str, np.ndarray], name: str, n: int, default: str | None) -> list[str | None]:
    """A BYTES input as text per row; absent or empty values take `default` (the server's)."""
    if name not in request:
        return [default] * n
    values = request[name].reshape(-1)
    if len(values) != n:
        raise DDPMError(f"{name} has {len(values)} rows, seed has {n}; send one value per row")
    try:
        text = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
    except UnicodeDecodeError:
        raise DDPMError(f"{name} must be UTF-8 text") from None
    return [t.strip() or default for t in text]
