"""Triton python backend: all-MiniLM-L6-v2 sentence embeddings.

Input: "text" BYTES [batch, 1] (UTF-8). Outputs: "embedding" FP32 [batch, 384],
mean-pooled over tokens and L2-normalized, as sentence-transformers does for
this model; "token_count" INT64 [batch, 1], the tokens each text took (what
the gateway bills). The model files sit in model/ beside this file, and the
encoder in sentence_encoder.py (shared with the digitclip build).
"""

import os
import sys

sys.path[:0] = [p for p in os.environ.get("MLMESH_TRITON_PYTHONPATH", "").split(":") if p]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from sentence_encoder import SentenceEncoder  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"], "model")
        threads = int(os.environ.get("MLMESH_TRITON_TORCH_THREADS", "1"))
        torch.set_num_threads(threads)
        self.encoder = SentenceEncoder(folder)

    def execute(self, requests):
        batches = [pb_utils.get_input_tensor_by_name(r, "text").as_numpy() for r in requests]
        sizes = [len(b) for b in batches]
        texts = [item.decode("utf-8") for batch in batches for item in batch.reshape(-1)]
        embeddings, counts = self.encoder.encode(texts)
        responses = []
        start = 0
        for size in sizes:
            out = pb_utils.Tensor("embedding", embeddings[start : start + size])
            tokens = pb_utils.Tensor("token_count", counts[start : start + size])
            responses.append(pb_utils.InferenceResponse(output_tensors=[out, tokens]))
            start += size
        return responses
