"""A small tritonclient wrapper for `ddpm-serve` (HTTP or gRPC): images by (seed, index), readiness, batch stats.

One request carries one row per image (`runtime.serving.schema`), at most the server's `max_batch` rows. One client per
thread: tritonclient's clients are not thread-safe.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from runtime.errors import DDPMError
from runtime.serving.schema import INPUTS, MODEL_NAME, OUTPUT

PROTOCOLS = ("http", "grpc")


def _tritonclient(protocol: str) -> tuple[Any, Any]:
    """tritonclient's module for `protocol`, and tritonclient.utils."""
    if protocol not in PROTOCOLS:
        raise DDPMError(f"unknown protocol {protocol!r}; use http or grpc")
    try:
        import tritonclient.utils as utils

        if protocol == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
    except ImportError:
        raise DDPMError("the ddpm-serve client needs tritonclient: pip install 'ddpm-deploy[serve]'") from None
    return module, utils




class ImageClient:
    """Images from a running ddpm-serve at `url` (host:port of its HTTP or gRPC endpoint)."""

    def __init__(self, url: str, protocol: str = "http", model_name: str = MODEL_NAME, timeout_s: float = 300.0):
        self.tc, self.utils = _tritonclient(protocol)
        self.protocol, self.model_name = protocol, model_name
        if protocol == "http":
            self.client = self.tc.InferenceServerClient(url=url, network_timeout=timeout_s,
                                                        connection_timeout=timeout_s)
        else:
            self.client = self.tc.InferenceServerClient(url=url)
        self.timeout_s = timeout_s
        self._max_batch: int | None = None

    def _call(self, name: str, **kwargs: Any) -> Any:
        if self.protocol == "grpc":
            kwargs["as_json"] = True
        return getattr(self.client, name)(**kwargs)

    def ready(self) -> bool:
        """Server up and the model loaded (/v2/health/ready and /v2/models/NAME/ready)."""
        try:
            return bool(self.client.is_server_ready() and self.client.is_model_ready(self.model_name))
        except Exception:  # connection refused while starting: not ready yet
            return False

    @property
    def max_batch(self) -> int:
        if self._max_batch is None:
            config = self._call("get_model_config", model_name=self.model_name)
            config = config.get("config", config)  # gRPC wraps the config in {"config": ...}
            self._max_batch = int(config["max_batch_size"])
        return self._max_batch

    def request(self, seeds: Sequence[int], indices: Sequence[int], sampler: str | None = None,
                steps: str | int | None = None, spacing: str | None = None, eta: float | None = None) -> np.ndarray:
        """One inference request: row i is image indices[i] of seed seeds[i]; float32 [n, C, H, W]."""
        n = len(indices)
        values = {"seed": seeds, "index": indices, "sampler": sampler, "steps": steps, "spacing": spacing, "eta": eta}
        arrays: dict[str, np.ndarray] = {}
        for spec in INPUTS:
            value = values[spec.name]
            if value is None:
                continue
            if spec.dtype is np.bytes_:
                arrays[spec.name] = np.full((n, 1), str(value).encode(), dtype=object)
            else:
                arrays[spec.name] = np.array(np.broadcast_to(np.asarray(value, dtype=spec.dtype), (n,))).reshape(n, 1)
        return self.infer(arrays)

    def infer(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Send named arrays as they are (Triton types from their dtypes) and return the images."""
        inputs = []
        for name, array in arrays.items():
            tensor = self.tc.InferInput(name, list(array.shape), self.utils.np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [self.tc.InferRequestedOutput(OUTPUT)]
        kwargs: dict[str, Any] = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            result = self.client.infer(self.model_name, inputs, outputs=outputs, **kwargs)
        except self.utils.InferenceServerException as exc:
            line = (str(exc.message() or exc).strip().splitlines() or [""])[0]  # the server's one-line reason
            raise DDPMError(f"server refused the request: {line}") from exc
        return result.as_numpy(OUTPUT)

    def batch_sizes(self) -> dict[int, int]:
        """How many model batches of each size the server has executed (Triton's statistics)."""
        stats = self._call("get_inference_statistics", model_name=self.model_name)
        counts: dict[int, int] = {}
        for model in stats.get("model_stats", []):
            for entry in model.get("batch_stats", []):
                counts[int(entry["batch_size"])] = int(entry["compute_infer"]["count"])
        return counts

    def close(self) -> None:
        self.client.close()
