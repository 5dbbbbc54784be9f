"""Triton python backend running model.onnx (beside this file, in the version folder) with ONNX Runtime.

Requests of a dynamic batch are concatenated into one ORT call, then split again.
Execution providers: TensorRT and CUDA when this ORT build has them, CPU otherwise.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from dlheir.contract import CODE, IMAGE, PROBS

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        threads = int(params.get("intra_op_threads", {}).get("string_value", "0"))
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        providers = [p for p in PREFERRED_PROVIDERS if p in available]
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.outputs = [PROBS, CODE]

    def execute(self, requests):
        batches = [pb_utils.get_input_tensor_by_name(r, IMAGE).as_numpy() for r in requests]
        probs, codes = self.session.run(self.outputs, {IMAGE: np.concatenate(batches)})
        responses, start = [], 0
        for batch in batches:
            end = start + len(batch)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor(PROBS, probs[start:end]),
                pb_utils.Tensor(CODE, codes[start:end]),
            ]))
            start = end
        return responses
