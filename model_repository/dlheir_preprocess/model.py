"""Triton python backend: IMAGE_BYTES (encoded image) -> IMAGE uint8 [S, S, 3].

Uses dlheir.preprocess, the one definition of preprocessing, with the pixel limit of
config.pbtxt's ``max_pixels`` parameter (dlheir.preprocess.DEFAULT_MAX_PIXELS when absent;
0 leaves only Pillow's own decompression-bomb limit). Each request is handled on its own:
whatever goes wrong with one of its images (not an image, truncated, corrupt, too large,
or any exception Pillow raises) fails that request alone with a one-line message; the
other requests of the batch and the server are unaffected. Unexpected exceptions are
logged with their traceback here, never sent to the client.
"""

import json
import logging

import numpy as np
import triton_python_backend_utils as pb_utils

from dlheir.contract import IMAGE, IMAGE_BYTES, IMAGE_SIZE_PARAM, MAX_PIXELS_PARAM
from dlheir.preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError, preprocess

log = logging.getLogger("dlheir_preprocess")


class RequestError(Exception):
    """One request's failure; its message (one line) is what the client sees."""


def _parameter(config: dict, key: str, default: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.size = int(_parameter(config, IMAGE_SIZE_PARAM, "0"))
        self.max_pixels = int(_parameter(config, MAX_PIXELS_PARAM, str(DEFAULT_MAX_PIXELS))) or None

    def _pixels(self, request) -> np.ndarray:
        data = pb_utils.get_input_tensor_by_name(request, IMAGE_BYTES).as_numpy().reshape(-1)
        out = np.empty((len(data), self.size, self.size, 3), dtype=np.uint8)
        for i, item in enumerate(data):
            label = f"image {i + 1} of {len(data)}"
            where = f"{label}: " if len(data) > 1 else ""
            try:
                out[i] = preprocess(bytes(item), self.size, self.max_pixels)
            except ImageDecodeError as exc:
                raise RequestError(f"{where}{exc.reason}") from None
            except Exception:
                log.exception("unexpected error decoding %s", label)
                raise RequestError(f"{where}internal error while decoding the image") from None
        return out

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                pixels = self._pixels(request)
            except RequestError as exc:
                message = " ".join(str(exc).split())
            except Exception:  # noqa: BLE001 - one request's failure must not fail the batch
                log.exception("unexpected error in a request")
                message = "internal error"
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(IMAGE, pixels)]))
                continue
            responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"dlheir_preprocess: {message}")))
        return responses
