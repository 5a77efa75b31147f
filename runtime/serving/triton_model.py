"""The `ddpm` Python-backend (BLS) model of a generated Triton repository; copied there as 1/model.py.

It imports the runtime modules copied beside it (`runtime.serving.triton_repo`) and uses the same request handling
and sampling loop as `ddpm-serve` (`runtime.serving.sampler.Sampler`); each eps evaluation is a BLS call to the
`ddpm_eps` model.
Unlike PyTriton, the Python backend answers each request on its own, so a bad request fails only itself.
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


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        here = Path(__file__).resolve().parent
        info = ModelInfo.from_metadata(json.loads((here / "model_info.json").read_text()), str(here))
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        eta = params.get("default_eta", "")
        self.sampler = Sampler(BlsEps(info), params.get("default_sampler", "ddpm"), params.get("default_steps") or None,
                               params.get("default_spacing") or None, float(eta) if eta else None)

    def execute(self, requests: list[Any]) -> list[Any]:
        valid, rows, responses = [], [], [None] * len(requests)
        for i, request in enumerate(requests):
            arrays = {name: tensor.as_numpy() for name in INPUT_NAMES
                      if (tensor := pb_utils.get_input_tensor_by_name(request, name)) is not None}
            try:
                rows.append(self.sampler.rows(arrays))
                valid.append(i)
            except DDPMError as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        try:
            images = self.sampler.run(rows) if rows else []
        except DDPMError as exc:
            images = []
            for i in valid:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        for i, out in zip(valid, images):
            responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT, out)])
        return responses
