"""Texts and images to vectors, through the models on Triton (the shared
inference client), so callers need not run models themselves.

Texts go through MiniLM (``minilm``), images through the image tower of the
digit image-text encoder (``digitclip``), which was trained into MiniLM's
space: a text and an image of the same thing land near each other, so one
collection holds both and either can query it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from mlmesh_chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument
from mlmesh_inference.triton import TritonClient

# Both models' output size: a collection they write to must have it.
DIMENSION = 384
_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # float32 [n, 384], L2-normalized
    model: str  # name/version, e.g. "minilm/3"


def check_images(images: Sequence[bytes], field: str) -> None:
    """PNG or JPEG by their magic bytes, before anything reaches Triton (the
    model decodes them, bounded, off this process)."""
    violations = [
        FieldViolation(field.format(i=i), "is not a PNG or JPEG file")
        for i, image in enumerate(images)
        if not (image.startswith(_PNG) or image.startswith(_JPEG))
    ]
    if violations:
        raise InvalidArgument.listing(violations, 3)


class Embedder:
    def __init__(self, triton: TritonClient | None, text_model: str, image_model: str) -> None:
        self.triton = triton
        self.text_model = text_model
        self.image_model = image_model

    def _client(self) -> TritonClient:
        if self.triton is None:
            raise FailedPrecondition(
                "this vector service has no Triton to embed with (MLMESH_VECTORS_TRITON_TARGET)"
            )
        return self.triton

    async def texts(self, texts: Sequence[str]) -> Embedded:
        result = await self._client().infer(
            self.text_model,
            {"text": np.array([[t.encode()] for t in texts], dtype=object)},
            outputs=["embedding"],
        )
        return Embedded(
            np.ascontiguousarray(result.outputs["embedding"], dtype=np.float32),
            f"{result.model}/{result.model_version}",
        )

    async def images(self, images: Sequence[bytes], field: str = "items[{i}].image") -> Embedded:
        check_images(images, field)
        result = await self._client().infer(
            self.image_model,
            {"image": np.array([[image] for image in images], dtype=object)},
            outputs=["embedding"],
        )
        return Embedded(
            np.ascontiguousarray(result.outputs["embedding"], dtype=np.float32),
            f"{result.model}/{result.model_version}",
        )
