"""all-MiniLM-L6-v2 sentence embeddings, as sentence-transformers computes them:
mean pooling over the tokens, then L2 normalization (384-d).

The ``minilm`` Triton model runs this file (the build copies it beside its
``model.py``), and the ``digitclip`` build embeds its captions with it, so
the image encoder is trained against exactly the vectors Triton serves for
the same texts. It imports nothing from ``mlmesh_triton``.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

MAX_TOKENS = 256  # the model's max_seq_length in sentence-transformers


class SentenceEncoder:
    def __init__(self, folder: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings float32 [n, 384], token counts int64 [n, 1])."""
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        hidden = self.model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        embeddings = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy().astype(np.float32)
        counts = encoded["attention_mask"].sum(dim=1, keepdim=True).numpy().astype(np.int64)
        return embeddings, counts
