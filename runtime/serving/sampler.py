"""The request handling behind both servers: request rows -> one `run_chain` per distinct chain -> images.

Triton batch rows are images. Each request's rows are checked on their own (`Sampler.rows`), so the Triton model
(`runtime.serving.triton_model`) refuses a bad request alone; the rows of the good requests of a model batch are then
grouped by chain options and each group runs through `runtime.sampling.run_chain` with the noise of `SeededNoise` for
each (seed, index). Noise is per image and the update is elementwise, so an image is bit-identical to image `index`
of `ddpm-run --seed seed` with the same chain, whatever batch it was merged into. No sampling logic of its own: the
chain and the loop are `runtime.sampling`'s.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from runtime.errors import DDPMError
from runtime.sampling import DEFAULT_SAMPLER, Chain, RULES, run_chain
from runtime.sampling.noise import SeededNoise
from runtime.serving.schema import Options, Row, text_column

CHAIN_CACHE = 16  # distinct chains kept built
# Most model calls per image a request's chain may take, unless the server says otherwise: a request for a far longer
# chain than the server's default (all 1,000 DDPM steps, say) would hold the model for everyone merged with it.
DEFAULT_MAX_CALLS = 250


def call_limit(default_calls: int, max_model_calls: int | None) -> int:
    """The most model calls per image a request may ask for: `max_model_calls`, else DEFAULT_MAX_CALLS or the
    server's default chain when that is longer. The default chain must fit."""
    if max_model_calls is None:
        return max(DEFAULT_MAX_CALLS, default_calls)
    if max_model_calls < default_calls:
        raise DDPMError(f"{{opt:max_model_calls}} {max_model_calls} is below the {default_calls} model calls of the "
                        "default chain; raise it or choose fewer default steps")
    return max_model_calls


class RowsNoise:
    """The chain noise of arbitrary (seed, index) images: each row is `SeededNoise(seed, index, 1)`."""

    def __init__(self, rows: list[tuple[int, int]], image_shape: tuple[int, int, int]):
        self.sources = [SeededNoise(seed, index, 1, image_shape) for seed, index in rows]

    def draw(self) -> np.ndarray:
        return np.concatenate([source.draw() for source in self.sources])


class Sampler:
    """Requests -> grouped rows -> one `run_chain` per chain -> responses, around any backend."""

    def __init__(self, backend: Any, sampler: str = DEFAULT_SAMPLER, steps: str | None = None,
                 spacing: str | None = None, eta: float | None = None, max_model_calls: int | None = None):
        self.backend = backend
        self.shape = tuple(backend.info.image_shape)
        self.default = Options(sampler.lower(), steps, spacing, eta)
        self.chains: OrderedDict[Options, Chain] = OrderedDict()
        # A bad server default fails at start, not on the first request.
        self.max_model_calls = call_limit(len(self.chain(self.default)), max_model_calls)

    def chain(self, options: Options) -> Chain:
        """The chain for `options`, built once and kept (least recently used dropped)."""
        if options in self.chains:
            self.chains.move_to_end(options)
            return self.chains[options]
        chain = Chain.build(self.backend.info.diffusion, options.sampler, options.steps, options.eta,
                            spacing=options.spacing)
        self.chains[options] = chain
        if len(self.chains) > CHAIN_CACHE:
            self.chains.popitem(last=False)
        return chain

    def rows(self, request: dict[str, np.ndarray]) -> list[Row]:
        """The rows of one request (name -> array); bad values and chains longer than `max_model_calls` raise
        DDPMError, naming the row of a request of several. Absent or empty options take the server's defaults; the
        server's eta applies to rows whose rule uses eta."""
        seeds, indices = request["seed"].reshape(-1), request["index"].reshape(-1)
        n = len(seeds)
        if len(indices) != n:
            raise DDPMError(f"index has {len(indices)} rows, seed has {n}; send one value per row")
        sampler = text_column(request, "sampler", n, self.default.sampler)
        steps = text_column(request, "steps", n, self.default.steps)
        spacing = text_column(request, "spacing", n, self.default.spacing)
        eta = request["eta"].reshape(-1) if "eta" in request else [None] * n
        out = []
        for i in range(n):
            seed, index = int(seeds[i]), int(indices[i])
            where = f"row {i + 1} of {n}: " if n > 1 else ""
            if seed < 0 or index < 0:
                raise DDPMError(f"{where}seed and index must be >= 0, got seed={seed} index={index}")
            name = (sampler[i] or "").lower()
            rule = RULES.get(name)
            row_eta = float(eta[i]) if eta[i] is not None else self.default.eta if rule and rule.uses_eta else None
            options = Options(name, steps[i], spacing[i] and spacing[i].lower(), row_eta)
            try:
                calls = len(self.chain(options))  # unknown sampler, bad steps, spacing or eta: refused here
            except DDPMError as exc:
                raise DDPMError(f"{where}{exc}") from None
            if calls > self.max_model_calls:
                raise DDPMError(f"{where}this chain takes {calls} model calls per image and this server allows "
                                f"{self.max_model_calls}; ask for fewer steps")
            out.append(Row(seed, index, options))
        return out

    def run(self, per_request: list[list[Row]]) -> list[np.ndarray]:
        """The images of every request's rows: one `run_chain` per distinct chain over all requests."""
        flat = [row for rows in per_request for row in rows]
        groups: dict[Options, list[int]] = {}
        for i, row in enumerate(flat):
            groups.setdefault(row.options, []).append(i)
        images = np.empty((len(flat), *self.shape), dtype=np.float32)
        for options, where in groups.items():
            chain = self.chain(options)
            noise = RowsNoise([(flat[i].seed, flat[i].index) for i in where], self.shape)
            images[where] = run_chain(self.backend.stepper(chain), chain, noise)
        starts = np.cumsum([0] + [len(rows) for rows in per_request])
        return [images[a:b] for a, b in zip(starts[:-1], starts[1:])]
