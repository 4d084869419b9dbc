"""Model monitoring through the whole mesh: an Infer through Envoy is logged
by the gateway (sample rate 1 by default), the caller gives feedback by the
call id the gateway returned, and the monitor's quality figures show it;
the demo model's drift reference (its training data) is in place."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from google.protobuf import duration_pb2
from mlmesh.common.v1 import model_reference_pb2
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.gateway.v1 import gateway_service_pb2_grpc, key_service_pb2_grpc
from mlmesh.gateway.v1 import key_service_pb2 as keys_rpc
from mlmesh.monitor.v1 import monitor_pb2 as mpb
from mlmesh.monitor.v1 import monitor_service_pb2 as mrpc
from mlmesh.monitor.v1 import monitor_service_pb2_grpc
from mlmesh_sdk.channel import mesh_channel
from mlmesh_triton.build import digits_training_data

pytestmark = pytest.mark.timeout(400)
HOUR = duration_pb2.Duration(seconds=3600)


async def monitored_key(full_mesh) -> str:
    """A key that may Infer and read the monitor (not ingest into it)."""
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as channel:
        keys = key_service_pb2_grpc.KeyServiceStub(channel)
        reply = await keys.CreateKey(
            keys_rpc.CreateKeyRequest(
                key=pb.Key(
                    display_name="monitor-test",
                    scopes=pb.KeyScopes(
                        services=[pb.PLATFORM_SERVICE_INFER, pb.PLATFORM_SERVICE_MONITOR]
                    ),
                )
            )
        )
    return reply.secret


async def test_an_infer_is_logged_joined_to_feedback_and_measured(full_mesh):
    secret = await monitored_key(full_mesh)
    x, y = digits_training_data()
    async with mesh_channel(full_mesh.address, secret) as channel:
        gateway = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        monitor = monitor_service_pb2_grpc.MonitorServiceStub(channel)
        call = gateway.Infer(
            rpc.InferRequest(
                model=model_reference_pb2.ModelReference(model="digits", alias="champion"),
                inputs=[
                    pb.InferTensor(
                        name="pixels",
                        datatype="FP32",
                        shape=[1, 64],
                        raw_contents=x[:1].astype(np.float32).tobytes(),
                    )
                ],
            )
        )
        reply = await call
        trailers = dict(await call.trailing_metadata())
        call_id = trailers["x-mlmesh-call-id"]
        assert reply.id == call_id  # the caller sent no id of its own
        version = reply.model.version
        predicted = int(np.argmax(np.frombuffer(reply.outputs[0].raw_contents, np.float32)))

        # The gateway flushes its log every second: the feedback finds the
        # prediction once it has arrived (unknown ids are counted, not refused).
        feedback = mrpc.RecordFeedbackRequest(
            feedback=[mpb.Feedback(request_id=call_id, label=str(int(y[0])))]
        )
        for _ in range(100):
            got = await monitor.RecordFeedback(feedback)
            if got.unknown_count == 0:
                break
            assert list(got.unknown_request_ids) == [call_id]
            await asyncio.sleep(0.2)
        assert got.recorded_count + got.unchanged_count == 1, got

        quality = await monitor.GetModelQuality(
            mrpc.GetModelQualityRequest(model="digits", version=version, window=HOUR)
        )
        (mine,) = quality.versions
        assert mine.version == version
        assert mine.overall.request_count >= 1 and mine.overall.labelled_count >= 1
        assert mine.overall.latency_p99.ToNanoseconds() > 0
        labels = {c.label for c in mine.overall.classes}
        assert {str(int(y[0])), str(predicted)} <= labels

        # The demo model's drift reference: its training data, 64 pixels.
        reference = await monitor.GetDriftReference(
            mrpc.GetDriftReferenceRequest(model="digits", version=version)
        )
        assert reference.reference.version == 0 and len(reference.reference.features) == 64
        drift = await monitor.GetDrift(
            mrpc.GetDriftRequest(model="digits", version=version, window=HOUR)
        )
        assert drift.row_count >= 1 and len(drift.features) == 64
