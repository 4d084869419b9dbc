"""Text and image search in one space, and content checks, through the mesh:
accuracy on held-out data, measured through Envoy with an application key.

    .venv/bin/python bench/vectors_multimodal.py [--references 20]

A mesh of the registry, Triton, the deployer (which builds and deploys
`minilm` and `digitclip`), the gateway (keys) and the vector service starts
in a temp dir. Data: scikit-learn's digits, split as `digitclip` was trained
(`mlmesh_triton.digitimages.held_out_split`: the 360 held-out images were
never trained on).

- **Image search**: the 40 captions (4 per digit) go in with UpsertTexts;
  each held-out image is a SearchImage (top 1): recall@1 = the share whose
  nearest caption names the image's digit. Then the reverse: the 360 images
  go in with UpsertImages, each caption is a SearchText (top 10):
  precision@10 = the share of hits showing the caption's digit.
- **CheckContent**: a reference set of ``--references`` training images of
  the digit six (label `banned-six`); the threshold is chosen on other
  training images (SearchImage's best score against the set; the threshold
  with the best F1 there), never on held-out data. Then every held-out image
  is a CheckContent: precision and recall of VIOLATION for the sixes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import _common as common
import numpy as np
from google.protobuf import struct_pb2
from mlmesh.gateway.v1 import gateway_pb2
from mlmesh.vectors.v1 import vectors_pb2 as pb
from mlmesh.vectors.v1 import vectors_service_pb2 as rpc
from mlmesh.vectors.v1 import vectors_service_pb2_grpc

SERVICES = ("registry", "triton", "deployer", "gateway", "vectors")
BANNED = 6


def _collection(name: str) -> pb.Collection:
    return pb.Collection(
        name=name,
        dimension=384,
        distance=pb.DISTANCE_COSINE,
        payload_indexes=[pb.PayloadIndex(key="digit", type=pb.PAYLOAD_TYPE_INTEGER)],
    )


def _payload(**values: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


async def wait_for_models(stub: Any) -> None:
    """The deployer loads the models after start: embed until it works."""
    await stub.CreateCollection(rpc.CreateCollectionRequest(collection=_collection("probe")))
    for _ in range(300):
        try:
            await stub.UpsertTexts(
                rpc.UpsertTextsRequest(collection="probe", items=[rpc.TextItem(id="a", text="a")])
            )
            return
        except Exception:
            await asyncio.sleep(1.0)
    raise RuntimeError("the models never came up on Triton")


async def main(args: Any) -> int:
    from mlmesh_triton.build import digits_training_data
    from mlmesh_triton.digitimages import CAPTIONS, held_out_split, png_of

    os.environ["MLMESH_VECTORS_DEMO"] = "off"
    x, y = digits_training_data()
    train, test = held_out_split()
    pngs = [png_of(image.reshape(8, 8)) for image in x]
    results: dict[str, Any] = {}
    async with common.running_mesh(args, SERVICES) as (mesh, ready, _):
        target = ready["address"]
        key = await common.app_key(target, mesh.admin_key(), gateway_pb2.PLATFORM_SERVICE_VECTORS)
        async with common.channel(target, api_key=key) as channel:
            stub = vectors_service_pb2_grpc.VectorServiceStub(channel)
            await wait_for_models(stub)
            # Image -> text.
            await stub.CreateCollection(
                rpc.CreateCollectionRequest(collection=_collection("captions"))
            )
            captions = [(d, text) for d, texts in CAPTIONS.items() for text in texts]
            await stub.UpsertTexts(
                rpc.UpsertTextsRequest(
                    collection="captions",
                    items=[
                        rpc.TextItem(id=f"c{i}", text=text, payload=_payload(digit=d))
                        for i, (d, text) in enumerate(captions)
                    ],
                )
            )
            hits = 0
            for i in test:
                found = await stub.SearchImage(
                    rpc.SearchImageRequest(
                        collection="captions", image=pngs[i], top_k=1, with_payload=True
                    )
                )
                hits += int(found.points[0].payload["digit"]) == y[i]
            results["image_to_text_recall_at_1"] = float(hits / len(test))
            # Text -> image.
            await stub.CreateCollection(
                rpc.CreateCollectionRequest(collection=_collection("images"))
            )
            for start in range(0, len(test), 64):
                await stub.UpsertImages(
                    rpc.UpsertImagesRequest(
                        collection="images",
                        items=[
                            rpc.ImageItem(
                                id=f"i{i}", image=pngs[i], payload=_payload(digit=int(y[i]))
                            )
                            for i in test[start : start + 64]
                        ],
                    )
                )
            precision = []
            for d, text in captions:
                found = await stub.SearchText(
                    rpc.SearchTextRequest(
                        collection="images", text=text, top_k=10, with_payload=True
                    )
                )
                precision.append(np.mean([int(p.payload["digit"]) == d for p in found.points]))
            results["text_to_image_precision_at_10"] = float(np.mean(precision))
            # Content checks.
            sixes = [i for i in train if y[i] == BANNED]
            references, rest = (
                sixes[: args.references],
                [i for i in train if i not in set(sixes[: args.references])],
            )
            await stub.CreateCollection(rpc.CreateCollectionRequest(collection=_collection("refs")))
            await stub.UpsertImages(
                rpc.UpsertImagesRequest(
                    collection="refs",
                    items=[
                        rpc.ImageItem(
                            id=f"r{i}", image=pngs[i], payload=_payload(label="banned-six")
                        )
                        for i in references
                    ],
                )
            )
            rng = np.random.default_rng(7)
            validation = rng.choice(rest, size=min(400, len(rest)), replace=False)
            scores = []
            for i in validation:
                found = await stub.SearchImage(
                    rpc.SearchImageRequest(collection="refs", image=pngs[i], top_k=1)
                )
                scores.append(found.points[0].score)
            scores_arr, positive = np.array(scores), y[validation] == BANNED
            best = max(
                np.unique(np.round(scores_arr, 3)),
                key=lambda t: _f1(scores_arr >= t, positive),
            )
            results["threshold"] = float(best)
            results["validation_f1"] = _f1(scores_arr >= best, positive)
            await stub.CreatePolicy(
                rpc.CreatePolicyRequest(
                    policy=pb.Policy(
                        name="bench-six",
                        collection="refs",
                        threshold=float(best),
                        violation_labels=["banned-six"],
                    )
                )
            )
            decisions = []
            for i in test:
                reply = await stub.CheckContent(
                    rpc.CheckContentRequest(policy="bench-six", image=pngs[i])
                )
                decisions.append(reply.decision == pb.DECISION_VIOLATION)
            predicted, truth = np.array(decisions), y[test] == BANNED
            tp = int((predicted & truth).sum())
            results["check_content"] = {
                "precision": tp / max(int(predicted.sum()), 1),
                "recall": tp / int(truth.sum()),
                "held_out_images": len(test),
                "held_out_sixes": int(truth.sum()),
                "references": len(references),
            }
    print(results)
    path = common.write_json(
        "vectors_multimodal",
        args,
        {
            "environment": common.environment(args),
            "args": vars(args) | {"tmpdir": str(args.tmpdir)},
            "results": results,
        },
    )
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _f1(predicted: np.ndarray, truth: np.ndarray) -> float:
    tp = float((predicted & truth).sum())
    if tp == 0:
        return 0.0
    precision, recall = tp / predicted.sum(), tp / truth.sum()
    return float(2 * precision * recall / (precision + recall))


def parse() -> Any:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--references", type=int, default=20)
    common.add_common_args(parser)
    parser.set_defaults(max_seconds=1800.0)
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(common.run(main, parse()))
