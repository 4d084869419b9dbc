"""The demo `make run` answers: a collection of embedded texts and images and
a content policy, seeded by the primary once the models are on Triton.

- ``demo``: sentences (payload ``kind: text``) and held-out handwritten
  digits from scikit-learn (payload ``kind: image``, ``digit``), all
  embedded into one space, so a text finds images and an image finds texts.
- ``demo-references`` and policy ``demo-safety``: a labelled reference set
  (spam texts labelled ``spam``, images of the digit six labelled
  ``banned-six``, and harmless texts labelled ``ok``); CheckContent finds
  the violations among them.

    python -m mlmesh_vectors.demo image 7   # a held-out 7 as base64 PNG (for grpcurl)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import logging

import numpy as np
from mlmesh.vectors.v1 import vectors_pb2 as pb
from mlmesh_chassis.errors import AlreadyExists, MlmeshError

from mlmesh_vectors.embedding import DIMENSION, Embedder
from mlmesh_vectors.engine.base import Batch, CollectionSpec, Distance
from mlmesh_vectors.policies import Policies
from mlmesh_vectors.store import VectorStore

log = logging.getLogger("mlmesh.vectors.demo")

COLLECTION = "demo"
REFERENCES = "demo-references"
POLICY = "demo-safety"
TEXTS = [
    "a handwritten seven",
    "the number three written by hand",
    "a scanned digit zero",
    "a photo of a cat sleeping on a sofa",
    "the stock market fell sharply today",
    "how to bake sourdough bread at home",
    "a goal in the last minute of the final",
    "rain is expected over the weekend",
    "a new phone with a larger battery",
    "an image of the number 5",
]
SPAM = [
    "win a free prize now, click this link",
    "cheap pills without prescription, order today",
    "you have been selected for a cash reward, send your bank details",
]
OK = ["see you at the meeting tomorrow", "thanks for the update on the project"]
# Images: this many held-out digits of each class in the demo collection,
# and training-split sixes in the reference set.
IMAGES_PER_DIGIT = 3
BANNED_DIGIT = 6
BANNED_REFERENCES = 20


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits split as digitclip was trained, loaded once
    (held_out_png is called per image)."""
    from mlmesh_triton.build import digits_training_data
    from mlmesh_triton.digitimages import held_out_split

    images, labels = digits_training_data()
    train, test = held_out_split()
    return images[train], labels[train], images[test], labels[test]


def held_out_png(digit: int, nth: int = 0) -> bytes:
    """The ``nth`` held-out image of ``digit`` as PNG (never trained on)."""
    from mlmesh_triton.digitimages import png_of

    _, _, images, labels = _digits()
    return png_of(images[labels == digit][nth].reshape(8, 8))


def _spec(name: str, description: str) -> CollectionSpec:
    return CollectionSpec(
        name=name,
        dimension=DIMENSION,
        distance=Distance.COSINE,
        description=description,
        payload_indexes=(("kind", "keyword"), ("digit", "integer"), ("label", "keyword")),
    )


async def seed(store: VectorStore, embedder: Embedder, policies: Policies) -> None:
    """Creates the demo collections and policy unless they exist; waits for
    the models on Triton (the deployer loads them after start)."""
    from mlmesh_triton.digitimages import png_of

    try:
        await store.create_collection(_spec(COLLECTION, "demo: texts and digits in one space"))
    except AlreadyExists:
        log.info("demo collections exist; not seeding again")
        return
    train_x, train_y, test_x, test_y = _digits()
    delay = 1.0
    while True:
        try:
            texts = await embedder.texts(TEXTS)
            pngs, digits = [], []
            for digit in range(10):
                for image in test_x[test_y == digit][:IMAGES_PER_DIGIT]:
                    pngs.append(png_of(image.reshape(8, 8)))
                    digits.append(digit)
            images = await embedder.images(pngs)
            references = await embedder.texts(SPAM + OK)
            sixes = [png_of(x.reshape(8, 8)) for x in train_x[train_y == BANNED_DIGIT]]
            banned = await embedder.images(sixes[:BANNED_REFERENCES])
            break
        except MlmeshError as error:  # the models are not on Triton yet
            log.info("demo waits for the models on Triton: %s", error.message[:200])
            await asyncio.sleep(delay)
            delay = min(delay * 2, 15.0)
    await store.upsert(
        COLLECTION,
        Batch(
            [f"text-{i}" for i in range(len(TEXTS))],
            texts.vectors,
            [{"kind": "text", "text": t} for t in TEXTS],
        ),
    )
    await store.upsert(
        COLLECTION,
        Batch(
            [f"digit-{d}-{i % IMAGES_PER_DIGIT}" for i, d in enumerate(digits)],
            images.vectors,
            [{"kind": "image", "digit": d} for d in digits],
        ),
    )
    await store.create_collection(_spec(REFERENCES, "demo: labelled references of demo-safety"))
    labels = ["spam"] * len(SPAM) + ["ok"] * len(OK)
    await store.upsert(
        REFERENCES,
        Batch(
            [f"ref-text-{i}" for i in range(len(labels))],
            references.vectors,
            [
                {"kind": "text", "label": label, "text": t}
                for label, t in zip(labels, SPAM + OK, strict=True)
            ],
        ),
    )
    await store.upsert(
        REFERENCES,
        Batch(
            [f"ref-six-{i}" for i in range(len(banned.vectors))],
            banned.vectors,
            [{"kind": "image", "label": "banned-six", "digit": BANNED_DIGIT}] * len(banned.vectors),
        ),
    )
    await policies.put(
        pb.Policy(
            name=POLICY,
            collection=REFERENCES,
            # Held-out images of a six score 0.83 to 0.98 against these
            # references, other digits at most 0.68; a close paraphrase of a
            # spam text about 0.8.
            threshold=0.75,
            violation_labels=["spam", "banned-six"],
            review_margin=0.1,
            description="demo: spam texts and images of the digit six",
        ),
        create=True,
    )
    log.info("demo seeded: collections %s and %s, policy %s", COLLECTION, REFERENCES, POLICY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    image = sub.add_parser("image", help="print a held-out digit image as base64 PNG")
    image.add_argument("digit", type=int, choices=range(10))
    image.add_argument("--nth", type=int, default=0)
    args = parser.parse_args()
    print(base64.b64encode(held_out_png(args.digit, args.nth)).decode())


if __name__ == "__main__":
    main()
