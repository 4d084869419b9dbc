"""What the chassis' contract validation costs per request.

Every request a service receives is checked against its contract's
buf.validate rules (``mlmesh_chassis.validation.violations_of``) before the
handler runs. This times that check on representative requests, in process,
and prints the median and p99 per request type with the protovalidate
version that ran it.

    .venv/bin/python bench/validation.py [--rounds 200]

To compare engines, run it under another environment that has the contracts
on its path and another protovalidate, e.g.
``PYTHONPATH=libs/contracts/src:libs/chassis/src /tmp/pv1/bin/python bench/validation.py``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import time

from google.protobuf.message import Message
from mlmesh.common.v1 import model_reference_pb2
from mlmesh.gateway.v1 import gateway_pb2, gateway_service_pb2
from mlmesh.registry.v1 import model_pb2, registry_service_pb2
from mlmesh_chassis.validation import violations_of


def requests() -> dict[str, Message]:
    reference = model_reference_pb2.ModelReference(model="tiny-llama", alias="champion")
    return {
        "GetModel (1 rule)": registry_service_pb2.GetModelRequest(name="digits"),
        "Generate (prompt, 4 stops)": gateway_service_pb2.GenerateRequest(
            model=reference,
            text="The model serves " * 20,
            sampling=gateway_pb2.SamplingParams(
                max_tokens=64, temperature=0.7, stop=["\n\n", "###", "END", "."]
            ),
        ),
        "Embed (256 texts)": gateway_service_pb2.EmbedRequest(
            model=model_reference_pb2.ModelReference(model="minilm"),
            texts=[f"sentence number {i}" for i in range(256)],
        ),
        "CreateExperiment (16 arms)": registry_service_pb2.CreateExperimentRequest(
            experiment=model_pb2.Experiment(
                name="ab-test",
                model="digits",
                arms=[
                    model_pb2.ExperimentArm(name=f"arm-{i}", version=i + 1, weight=6)
                    for i in range(16)
                ],
                stickiness_key="user_id",
            )
        ),
        "UploadModelVersion header (8 tags)": registry_service_pb2.UploadModelVersionRequest(
            header=registry_service_pb2.UploadHeader(
                model="digits",
                description="a classifier",
                tags={f"tag-{i}": "value" for i in range(8)},
                format="triton",
                sha256="0" * 64,
                size_bytes=1 << 20,
            )
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    print(f"protovalidate {importlib.metadata.version('protovalidate')}, {args.rounds} rounds")
    print(f"{'request':40} {'median us':>10} {'p99 us':>10}")
    for name, request in requests().items():
        assert violations_of(request) == [], (name, violations_of(request))  # valid, compiled
        times = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            violations_of(request)
            times.append((time.perf_counter() - started) * 1e6)
        times.sort()
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        print(f"{name:40} {statistics.median(times):10.1f} {p99:10.1f}")


if __name__ == "__main__":
    main()
