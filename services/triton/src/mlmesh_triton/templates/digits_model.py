"""Triton python backend: multinomial logistic regression on 8x8 digit images.

Inputs: "pixels" FP32 [batch, 64] (0..16, as in scikit-learn's digits data).
Output: "probabilities" FP32 [batch, 10], equal to scikit-learn's
predict_proba for the exported model. Weights: weights.npz beside this file.
"""

import os
import sys

# The models' own environment (numpy<2), named by the runner; Triton's stub
# embeds the system Python and would not see it otherwise.
sys.path[:0] = [p for p in os.environ.get("MLMESH_TRITON_PYTHONPATH", "").split(":") if p]

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.join(args["model_repository"], args["model_version"])
        weights = np.load(os.path.join(here, "weights.npz"))
        self.coef = weights["coef"].astype(np.float64)
        self.intercept = weights["intercept"].astype(np.float64)

    def execute(self, requests):
        # Dynamic batching hands us several requests: one matrix product for all.
        batches = [pb_utils.get_input_tensor_by_name(r, "pixels").as_numpy() for r in requests]
        sizes = [len(b) for b in batches]
        x = np.concatenate(batches).astype(np.float64)
        scores = x @ self.coef.T + self.intercept
        scores -= scores.max(axis=1, keepdims=True)
        probabilities = np.exp(scores)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        probabilities = probabilities.astype(np.float32)
        responses = []
        start = 0
        for size in sizes:
            out = pb_utils.Tensor("probabilities", probabilities[start : start + size])
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start += size
        return responses
