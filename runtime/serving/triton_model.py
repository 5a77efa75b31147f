"""The `ddpm` Python-backend model of ddpm-serve and of a generated Triton repository; copied there as 1/model.py.

It samples with the request handling and loop of `runtime.serving.sampler.Sampler`, around one of two backends: in a
repository of `ddpm-export triton-repo`, each eps evaluation is a BLS call to the `ddpm_eps` model (and the runtime
modules it imports are copied beside it); under ddpm-serve, the config's `source` parameter names the model, opened
in this process with `runtime.backends.open_model`.

Each request of a model batch is checked on its own and a bad one is answered alone with one line (INVALID_ARG: HTTP
400, gRPC INVALID_ARGUMENT), so it never fails the good requests merged with it; those are then sampled together.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton's Python backend (a package walk, a linter): defined, never run
    pb_utils = None

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime.errors import DDPMError  # noqa: E402
from runtime.metadata import ModelInfo  # noqa: E402
from runtime.sampling import Chain, Stepper  # noqa: E402
from runtime.serving.sampler import Sampler  # noqa: E402
from runtime.serving.schema import INPUT_NAMES, OUTPUT  # noqa: E402

EPS_MODEL = "ddpm_eps"


class BlsEps:
    """The backend the sampler sees: eps(x_t, t) is an inference request to the eps-graph model."""

    def __init__(self, info: ModelInfo):
        self.info = info
        self.description = f"Triton BLS -> {EPS_MODEL}"

    def eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        request = pb_utils.InferenceRequest(
            model_name=EPS_MODEL, requested_output_names=list(self.info.outputs),
            inputs=[pb_utils.Tensor(self.info.inputs[0], np.ascontiguousarray(x_t, dtype=np.float32)),
                    pb_utils.Tensor(self.info.inputs[1], np.ascontiguousarray(t, dtype=np.int64).reshape(-1, 1))])
        response = request.exec()
        if response.has_error():
            raise DDPMError(f"{EPS_MODEL} failed: {response.error().message()}")
        outs = [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.info.outputs]
        return np.concatenate(outs, axis=1)  # eps, then v for learned-variance models

    def stepper(self, chain: Chain) -> Stepper:
        return chain.stepper(self.eps)


def _backend(params: dict[str, str], here: Path) -> Any:
    """ddpm-serve's model opened here (`source` and how to open it), else the repository's BLS backend."""
    if not params.get("source"):
        return BlsEps(ModelInfo.from_metadata(json.loads((here / "model_info.json").read_text()), str(here)))
    from runtime.backends import open_model

    return open_model(params["source"], params["provider"], precision=params["precision"],
                      threads=int(params["threads"]), **json.loads(params.get("source_options") or "{}"))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        eta, max_model_calls = params.get("default_eta", ""), params.get("max_model_calls", "")
        backend = _backend(params, Path(__file__).resolve().parent)
        self.sampler = Sampler(backend, params.get("default_sampler", "ddpm"), params.get("default_steps") or None,
                               params.get("default_spacing") or None, float(eta) if eta else None,
                               int(max_model_calls) if max_model_calls else None)

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request: a refusal for each bad one, the images of the others sampled together. Nothing
        is raised into Triton, which would answer with a traceback."""
        valid, rows, responses = [], [], [None] * len(requests)
        for i, request in enumerate(requests):
            arrays = {name: tensor.as_numpy() for name in INPUT_NAMES
                      if (tensor := pb_utils.get_input_tensor_by_name(request, name)) is not None}
            try:
                rows.append(self.sampler.rows(arrays))
                valid.append(i)
            except DDPMError as exc:
                responses[i] = _error(str(exc), pb_utils.TritonError.INVALID_ARG)
            except Exception as exc:  # noqa: BLE001 (a request this code did not foresee fails alone)
                responses[i] = _error(f"cannot read the request: {type(exc).__name__}: {exc}")
        try:
            images = self.sampler.run(rows) if rows else []
        except Exception as exc:  # noqa: BLE001 (the model failed: a broken graph, NaN weights, a lost eps model)
            images = []
            for i in valid:
                responses[i] = _error(f"sampling failed on the server: {exc}")
        for i, out in zip(valid, images):
            responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT, out)])
        return responses


def _error(message: str, code: Any = None) -> Any:
    """An error response of one line (INTERNAL unless `code` says otherwise)."""
    line = (message.strip().splitlines() or [""])[0]
    error = pb_utils.TritonError(line) if code is None else pb_utils.TritonError(line, code)
    return pb_utils.InferenceResponse(error=error)
