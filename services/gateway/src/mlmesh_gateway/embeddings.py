"""An embedding model's answer as the gateway's contract wants it: one
vector per text (optionally unit length) and the prompt tokens it used.

Embedding models report what they tokenized as the output ``token_count``
(one count per text, e.g. the MiniLM model of ``mlmesh_triton``). A model
that does not is billed an estimate: one token per four UTF-8 bytes of each
text, at least one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

EMBEDDING_OUTPUT = "embedding"
TOKEN_COUNT_OUTPUT = "token_count"


def embedding_inputs(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """The texts as the model's ``text`` input: BYTES, one per row."""
    return {"text": np.array([[text.encode()] for text in texts], dtype=object)}


def vectors_of(outputs: Mapping[str, np.ndarray], normalize: bool) -> np.ndarray:
    vectors = outputs.get(EMBEDDING_OUTPUT)
    if vectors is None:  # a model naming its one vector output otherwise
        vectors = next(v for name, v in outputs.items() if name != TOKEN_COUNT_OUTPUT)
    vectors = vectors.reshape(len(vectors), -1)
    if normalize:
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    return vectors


def prompt_tokens_of(outputs: Mapping[str, np.ndarray], texts: Sequence[str]) -> int:
    counts = outputs.get(TOKEN_COUNT_OUTPUT)
    if counts is not None:
        return int(counts.astype(np.int64).sum())
    return sum(max(-(-len(text.encode()) // 4), 1) for text in texts)
