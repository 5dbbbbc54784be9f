"""Triton python backend: IMAGE_BYTES (encoded image) -> IMAGE uint8 [S, S, 3].

Uses dlheir.preprocess, the one definition of preprocessing. A request whose image
cannot be decoded gets its own error response; the other requests of the batch and
the server are unaffected.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from dlheir.preprocess import ImageDecodeError, preprocess


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.size = int(config["parameters"]["image_size"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "IMAGE_BYTES").as_numpy().reshape(-1)
            try:
                pixels = np.stack([preprocess(bytes(item), self.size) for item in data])
            except ImageDecodeError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"dlheir_preprocess: {exc}")))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("IMAGE", pixels)]))
        return responses
