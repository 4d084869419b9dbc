"""Triton python backend: digitclip, images of digits into MiniLM's text space.

Input: "image" BYTES [batch, 1], each the file bytes of a PNG or JPEG (at most
1 MiB and 4096x4096 pixels) showing ONE digit drawn LIGHT on a DARK background
(bright ink, black paper), roughly centred in a roughly square frame, like
scikit-learn's 8x8 digits; it is turned to grayscale and shrunk to 8x8 by area
averaging. Dark ink on white paper must be inverted by the caller.
Output: "embedding" FP32 [batch, 384], L2-normalized, comparable by cosine with
the minilm model's embeddings of texts such as "a handwritten seven".

A request holding an image that is not such a file fails alone, with
INVALID_ARGUMENT and the reason; the other requests of the batch are answered.
Decoding and the image tower live in digitimages.py beside this file (shared
with the build and with callers); the tower's weights in weights.npz.
"""

import os
import sys

# The models' own environment (numpy<2, Pillow), named by the runner; Triton's
# stub embeds the system Python and would not see it otherwise.
sys.path[:0] = [p for p in os.environ.get("MLMESH_TRITON_PYTHONPATH", "").split(":") if p]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from digitimages import ImageRejected, ImageTower, pixels_of  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.join(args["model_repository"], args["model_version"])
        self.tower = ImageTower.load(os.path.join(here, "weights.npz"))

    def execute(self, requests):
        # Decode per request, so one bad image fails its own request only;
        # then one matrix product for every image that decoded.
        decoded = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "image").as_numpy().reshape(-1)
            try:
                decoded.append(np.stack([pixels_of(item) for item in images]))
            except ImageRejected as error:
                decoded.append(pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
        good = [d for d in decoded if isinstance(d, np.ndarray)]
        embeddings = self.tower.embed(np.concatenate(good)) if good else None
        responses = []
        start = 0
        for item in decoded:
            if isinstance(item, np.ndarray):
                out = pb_utils.Tensor("embedding", embeddings[start : start + len(item)])
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
                start += len(item)
            else:
                responses.append(pb_utils.InferenceResponse(error=item))
        return responses
