"""Triton python backend: all-MiniLM-L6-v2 sentence embeddings.

Input: "text" BYTES [batch, 1] (UTF-8). Outputs: "embedding" FP32 [batch, 384],
mean-pooled over tokens and L2-normalized, as sentence-transformers does for
this model; "token_count" INT64 [batch, 1], the tokens each text took (what
the gateway bills). The model files sit in model/ beside this file.
"""

import os
import sys

sys.path[:0] = [p for p in os.environ.get("MLMESH_TRITON_PYTHONPATH", "").split(":") if p]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

MAX_TOKENS = 256  # the model's max_seq_length in sentence-transformers


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"], "model")
        threads = int(os.environ.get("MLMESH_TRITON_TORCH_THREADS", "1"))
        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()

    @torch.inference_mode()
    def execute(self, requests):
        batches = [pb_utils.get_input_tensor_by_name(r, "text").as_numpy() for r in requests]
        sizes = [len(b) for b in batches]
        texts = [item.decode("utf-8") for batch in batches for item in batch.reshape(-1)]
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        hidden = self.model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        embeddings = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy().astype(np.float32)
        counts = encoded["attention_mask"].sum(dim=1, keepdim=True).numpy().astype(np.int64)
        responses = []
        start = 0
        for size in sizes:
            out = pb_utils.Tensor("embedding", embeddings[start : start + size])
            tokens = pb_utils.Tensor("token_count", counts[start : start + size])
            responses.append(pb_utils.InferenceResponse(output_tensors=[out, tokens]))
            start += size
        return responses
