"""Bad input gets a clear, bounded status and leaves nothing behind."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import field_mask_pb2
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh_chassis.testing import expect_error
from mlmesh_registry.store import base as store_base
from registry_fixtures import IDLE_TIMEOUT_S, Registry, upload_header

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _header(model: str, data: bytes, **overrides: object) -> rpc.UploadModelVersionRequest:
    return rpc.UploadModelVersionRequest(header=upload_header(model, data, **overrides))


async def _stream(
    *messages: rpc.UploadModelVersionRequest,
) -> AsyncIterator[rpc.UploadModelVersionRequest]:
    for message in messages:
        yield message


async def _upload(
    registry: Registry, model: str, data: bytes, **overrides: object
) -> pb.ModelVersion:
    reply = await registry.stub.UploadModelVersion(
        _stream(_header(model, data, **overrides), rpc.UploadModelVersionRequest(chunk=data))
    )
    return reply.model_version


async def _model_missing(registry: Registry, name: str) -> None:
    details = await expect_error(
        registry.stub.GetModel(rpc.GetModelRequest(name=name.strip())), grpc.StatusCode.NOT_FOUND
    )
    assert details.error_info.metadata["resource_type"] == "model"


# 1. names, tags and checksums are whole-string matches


@pytest.mark.parametrize("suffix", ["\n", "\r\n", "\n\n", "\x00"])
async def test_a_name_with_a_trailing_newline_is_refused(
    registry: Registry, unique: str, suffix: str
) -> None:
    bad = unique + suffix
    details = await expect_error(
        registry.stub.CreateModel(rpc.CreateModelRequest(model=pb.Model(name=bad))), INVALID
    )
    assert details.bad_request.field_violations[0].field == "model.name"
    details = await expect_error(
        registry.stub.UploadModelVersion(
            _stream(_header(bad, b"abc"), rpc.UploadModelVersionRequest(chunk=b"abc"))
        ),
        INVALID,
    )
    assert details.bad_request.field_violations[0].field == "header.model"
    await _model_missing(registry, unique)
    assert not [p for p in registry.leftovers() if p.startswith(unique)]


async def test_aliases_tags_checksums_and_experiments_with_a_newline_are_refused(
    registry: Registry, unique: str
) -> None:
    await _upload(registry, unique, b"one")
    cases = [
        (
            registry.stub.SetAlias(
                rpc.SetAliasRequest(model=unique, alias="champion\n", version=1)
            ),
            "alias",
        ),
        (
            registry.stub.UploadModelVersion(
                _stream(
                    _header(unique, b"abc", sha256=hashlib.sha256(b"abc").hexdigest() + "\n"),
                    rpc.UploadModelVersionRequest(chunk=b"abc"),
                )
            ),
            "header.sha256",
        ),
        (
            registry.stub.UploadModelVersion(
                _stream(
                    _header(unique, b"abc", tags={"team\n": "x"}),
                    rpc.UploadModelVersionRequest(chunk=b"abc"),
                )
            ),
            "header.tags['team\\n']",
        ),
        (
            registry.stub.CreateExperiment(
                rpc.CreateExperimentRequest(
                    experiment=pb.Experiment(
                        name="exp-nl\n",
                        model=unique,
                        arms=[pb.ExperimentArm(name="a", version=1, weight=100)],
                    )
                )
            ),
            "experiment.name",
        ),
        (
            registry.stub.CreateExperiment(
                rpc.CreateExperimentRequest(
                    experiment=pb.Experiment(
                        name=f"{unique}-x",
                        model=unique,
                        arms=[pb.ExperimentArm(name="control\n", version=1, weight=100)],
                    )
                )
            ),
            "experiment.arms[0].name",
        ),
    ]
    for call, field in cases:
        details = await expect_error(call, INVALID)
        assert details.bad_request.field_violations[0].field == field
    versions = await registry.stub.ListModelVersions(rpc.ListModelVersionsRequest(model=unique))
    assert [v.version for v in versions.model_versions] == [1]


# 2. errors never echo a huge value


async def test_a_40_kb_name_gets_a_small_invalid_argument(registry: Registry) -> None:
    huge = "a" * 40_000
    for call in (
        registry.stub.CreateModel(rpc.CreateModelRequest(model=pb.Model(name=huge))),
        registry.stub.GetModel(rpc.GetModelRequest(name=huge)),
        registry.stub.ResolveModelReference(
            rpc.ResolveModelReferenceRequest(reference=ModelReference(model="ok", alias=huge))
        ),
    ):
        try:
            await call
        except grpc.aio.AioRpcError as error:
            trailers = sum(len(k) + len(v) for k, v in error.trailing_metadata() or ())
            assert trailers < 4096, trailers
        details = await expect_error(call, INVALID)
        assert len(details.message) < 300, details.message
        assert details.message.count("a") < 100
        assert details.bad_request is not None
        assert details.bad_request.ByteSize() < 512
        assert all(len(v) <= 65 for v in details.error_info.metadata.values())


# 3. free text is bounded, and so are list pages


async def test_descriptions_and_reasons_are_bounded(registry: Registry, unique: str) -> None:
    big = "d" * (16 * 1024 + 1)
    await _upload(registry, unique, b"one")
    calls = [
        (
            registry.stub.CreateModel(
                rpc.CreateModelRequest(model=pb.Model(name=f"{unique}-new", description=big))
            ),
            "model.description",
        ),
        (
            registry.stub.UpdateModel(
                rpc.UpdateModelRequest(
                    model=pb.Model(name=unique, description=big),
                    update_mask=field_mask_pb2.FieldMask(paths=["description"]),
                )
            ),
            "model.description",
        ),
        (
            registry.stub.UploadModelVersion(
                _stream(
                    _header(unique, b"two", description=big),
                    rpc.UploadModelVersionRequest(chunk=b"two"),
                )
            ),
            "header.description",
        ),
        (
            registry.stub.UpdateModelVersion(
                rpc.UpdateModelVersionRequest(
                    model_version=pb.ModelVersion(model=unique, version=1, description=big),
                    update_mask=field_mask_pb2.FieldMask(paths=["description"]),
                )
            ),
            "model_version.description",
        ),
        (
            registry.stub.SetAlias(
                rpc.SetAliasRequest(model=unique, alias="champion", version=1, reason="r" * 1025)
            ),
            "reason",
        ),
        (
            registry.stub.CreateExperiment(
                rpc.CreateExperimentRequest(
                    experiment=pb.Experiment(
                        name=f"{unique}-exp",
                        model=unique,
                        description=big,
                        arms=[pb.ExperimentArm(name="a", version=1, weight=100)],
                    )
                )
            ),
            "experiment.description",
        ),
    ]
    for call, field in calls:
        details = await expect_error(call, INVALID)
        assert details.bad_request.field_violations[0].field == field
    await _model_missing(registry, f"{unique}-new")
    got = await registry.stub.GetModelVersion(rpc.GetModelVersionRequest(model=unique, version=1))
    assert got.model_version.description == ""
    versions = await registry.stub.ListModelVersions(rpc.ListModelVersionsRequest(model=unique))
    assert len(versions.model_versions) == 1
    # the limits themselves are accepted
    ok = await _upload(registry, unique, b"two", description="d" * 16 * 1024)
    assert len(ok.description) == 16 * 1024


async def test_list_pages_stop_before_the_byte_limit(
    registry: Registry, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(5):
        await _upload(registry, unique, f"v{i}".encode(), description="d" * 15_000)
    monkeypatch.setattr(store_base, "MAX_PAGE_BYTES", 40_000)  # two such versions a page
    pages: list[list[int]] = []
    token = ""
    while True:
        reply = await registry.stub.ListModelVersions(
            rpc.ListModelVersionsRequest(model=unique, page_size=100, page_token=token)
        )
        assert reply.ByteSize() < 40_000 + 1024
        pages.append([v.version for v in reply.model_versions])
        token = reply.next_page_token
        if not token:
            break
    assert pages == [[5, 4], [3, 2], [1]]


# 4. every field rule is the contract's: the chassis refuses a request that
# breaks one before the registry sees it, naming the field


async def _first(call: AsyncIterator[object]) -> object:
    """The first message of a server stream (a refused one raises)."""
    async for message in call:
        return message
    return None


async def test_a_request_breaking_its_contract_is_refused_naming_the_field(
    registry: Registry, unique: str
) -> None:
    await _upload(registry, unique, b"one")
    stub = registry.stub
    sha = hashlib.sha256(b"abc").hexdigest()
    tags_mask = field_mask_pb2.FieldMask(paths=["tags"])

    def upload(*messages: rpc.UploadModelVersionRequest) -> object:
        return stub.UploadModelVersion(_stream(*messages))

    chunk = rpc.UploadModelVersionRequest(chunk=b"abc")
    cases = [
        (stub.CreateModel(rpc.CreateModelRequest(model=pb.Model(name="Upper"))), "model.name"),
        (stub.CreateModel(rpc.CreateModelRequest(model=pb.Model(name="x"))), "model.name"),
        (
            stub.CreateModel(
                rpc.CreateModelRequest(model=pb.Model(name=f"{unique}-t", tags={"Team": "x"}))
            ),
            "model.tags['Team']",
        ),
        (
            stub.CreateModel(
                rpc.CreateModelRequest(model=pb.Model(name=f"{unique}-t", tags={"t": "v" * 256}))
            ),
            "model.tags['t']",
        ),
        (
            stub.UpdateModel(
                rpc.UpdateModelRequest(
                    model=pb.Model(name=unique, tags={"Bad key": ""}), update_mask=tags_mask
                )
            ),
            "model.tags['Bad key']",
        ),
        (stub.ListModels(rpc.ListModelsRequest(page_size=-1)), "page_size"),
        (stub.GetModelVersion(rpc.GetModelVersionRequest(model=unique, version=0)), "version"),
        (
            stub.ResolveModelReference(
                rpc.ResolveModelReferenceRequest(reference=ModelReference(model=unique, version=0))
            ),
            "reference.version",
        ),
        (
            stub.ResolveModelReference(
                rpc.ResolveModelReferenceRequest(
                    reference=ModelReference(model=unique, alias="Champion")
                )
            ),
            "reference.alias",
        ),
        (
            stub.ResolveModelReference(
                rpc.ResolveModelReferenceRequest(reference=ModelReference(model=unique + "\n"))
            ),
            "reference.model",
        ),
        (
            stub.ListModelVersions(rpc.ListModelVersionsRequest(model=unique, tags={"Bad": "x"})),
            "tags['Bad']",
        ),
        (stub.SetAlias(rpc.SetAliasRequest(model=unique, alias="Live", version=1)), "alias"),
        (stub.SetAlias(rpc.SetAliasRequest(model=unique, alias="live", version=0)), "version"),
        (stub.GetAlias(rpc.GetAliasRequest(model=unique, alias="Live")), "alias"),
        (
            stub.DeleteAlias(rpc.DeleteAliasRequest(model=unique, alias="live", reason="r" * 1025)),
            "reason",
        ),
        (
            stub.ListAliasHistory(rpc.ListAliasHistoryRequest(model=unique, alias="Live")),
            "alias",
        ),
        (stub.ListExperiments(rpc.ListExperimentsRequest(model="Bad")), "model"),
        (upload(_header(unique, b"abc", sha256=sha.upper()), chunk), "header.sha256"),
        (upload(_header(unique, b"abc", size_bytes=0), chunk), "header.size_bytes"),
        (upload(_header(unique, b"abc", format="f" * 64), chunk), "header.format"),
        (upload(_header(unique, b"abc", tags={"Team": "x"}), chunk), "header.tags['Team']"),
        (upload(_header(unique, b"abc"), rpc.UploadModelVersionRequest(chunk=b"")), "chunk"),
        (_first(stub.WatchEvents(rpc.WatchEventsRequest(after_sequence=-1))), "after_sequence"),
        (_first(stub.WatchEvents(rpc.WatchEventsRequest(models=["Bad"]))), "models[0]"),
    ]
    for call, field in cases:
        details = await expect_error(call, INVALID)
        assert [v.field for v in details.bad_request.field_violations] == [field], details.message
    versions = await stub.ListModelVersions(rpc.ListModelVersionsRequest(model=unique))
    assert [v.version for v in versions.model_versions] == [1]
    assert not (await stub.ListAliases(rpc.ListAliasesRequest(model=unique))).aliases
    await _model_missing(registry, f"{unique}-t")
    assert not list((registry.artifacts / ".uploads").glob("*"))


# 5. an update names the fields it changes: its resource is partial, and the
# rules hold for what the update makes


async def _experiment(registry: Registry, model: str) -> pb.Experiment:
    """An experiment over the model's versions 1 and 2 (uploaded here)."""
    for data in (b"one", b"two"):
        await _upload(registry, model, data)
    created = await registry.stub.CreateExperiment(
        rpc.CreateExperimentRequest(
            experiment=pb.Experiment(
                name=f"{model}-exp",
                model=model,
                arms=[
                    pb.ExperimentArm(name="control", version=1, weight=90),
                    pb.ExperimentArm(name="candidate", version=2, weight=10),
                ],
                stickiness_key="user_id",
                shadow=pb.ShadowTraffic(version=2, percent=5),
            )
        )
    )
    return created.experiment


def _update(experiment: pb.Experiment, *paths: str) -> rpc.UpdateExperimentRequest:
    return rpc.UpdateExperimentRequest(
        experiment=experiment, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
    )


async def test_an_update_of_only_some_fields_keeps_the_others(
    registry: Registry, unique: str
) -> None:
    stub = registry.stub
    created = await _experiment(registry, unique)
    reply = await stub.UpdateExperiment(
        _update(pb.Experiment(name=created.name, description="notes"), "description")
    )
    updated = reply.experiment
    assert updated.description == "notes"
    assert (updated.model, updated.arms, updated.shadow, updated.stickiness_key) == (
        created.model,
        created.arms,
        created.shadow,
        created.stickiness_key,
    )
    assert updated.update_time.ToNanoseconds() > created.update_time.ToNanoseconds()
    got = await stub.GetExperiment(rpc.GetExperimentRequest(name=created.name))
    assert got.experiment == updated
    # an empty stickiness key is the default, as on create
    reply = await stub.UpdateExperiment(_update(pb.Experiment(name=created.name), "stickiness_key"))
    assert reply.experiment.stickiness_key == "api_key"
    # models and versions: partial too
    model = await stub.UpdateModel(
        rpc.UpdateModelRequest(
            model=pb.Model(name=unique, description="a model"),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        )
    )
    assert (model.model.description, model.model.latest_version) == ("a model", 2)
    version = await stub.UpdateModelVersion(
        rpc.UpdateModelVersionRequest(
            model_version=pb.ModelVersion(model=unique, version=2, tags={"stage": "canary"}),
            update_mask=field_mask_pb2.FieldMask(paths=["tags"]),
        )
    )
    assert dict(version.model_version.tags) == {"stage": "canary"}
    assert version.model_version.size_bytes == 3


async def test_an_update_making_a_bad_experiment_is_refused_and_changes_nothing(
    registry: Registry, unique: str
) -> None:
    stub = registry.stub
    created = await _experiment(registry, unique)
    name = created.name
    bad_arms = [
        pb.ExperimentArm(name="Bad", version=1, weight=60),
        pb.ExperimentArm(name="b", version=2, weight=30),
    ]
    cases = [
        (
            _update(pb.Experiment(name=name, arms=bad_arms), "arms"),
            ["experiment.arms", "experiment.arms[0].name"],  # weights sum to 90; a bad name
        ),
        (_update(pb.Experiment(name=name), "arms"), ["experiment.arms"]),  # no arms
        (
            _update(pb.Experiment(name=name, stickiness_key="actor"), "stickiness_key"),
            ["experiment.stickiness_key"],
        ),
        (
            _update(
                pb.Experiment(name=name, shadow=pb.ShadowTraffic(version=2, percent=101)),
                "shadow",
            ),
            ["experiment.shadow.percent"],
        ),
        (
            _update(pb.Experiment(name=name, description="d" * (16 * 1024 + 1)), "description"),
            ["experiment.description"],
        ),
    ]
    for request, fields in cases:
        details = await expect_error(stub.UpdateExperiment(request), INVALID)
        assert sorted(v.field for v in details.bad_request.field_violations) == fields
    details = await expect_error(stub.UpdateExperiment(cases[0][0]), INVALID)
    assert "weights must sum to 100 (got 90)" in {
        v.description for v in details.bad_request.field_violations
    }
    # the name is checked on the request (the contract's rule on UpdateExperimentRequest)
    for bad_name in ("Bad\n", ""):
        details = await expect_error(
            stub.UpdateExperiment(_update(pb.Experiment(name=bad_name), "description")), INVALID
        )
        assert "experiment.name" in details.message
    await expect_error(stub.UpdateExperiment(rpc.UpdateExperimentRequest()), INVALID)
    # a version that does not exist
    missing = [pb.ExperimentArm(name="a", version=9, weight=100)]
    details = await expect_error(
        stub.UpdateExperiment(_update(pb.Experiment(name=name, arms=missing), "arms")),
        grpc.StatusCode.NOT_FOUND,
    )
    assert details.error_info.metadata["resource_type"] == "model version"
    got = await stub.GetExperiment(rpc.GetExperimentRequest(name=name))
    assert got.experiment == created


# 6. stalled and failed uploads, no-op alias moves, stickiness keys


async def test_a_stalled_upload_is_aborted_and_its_partial_removed(
    registry: Registry, unique: str
) -> None:
    data = b"x" * 10_000

    async def stalls() -> AsyncIterator[rpc.UploadModelVersionRequest]:
        yield _header(unique, data)
        yield rpc.UploadModelVersionRequest(chunk=data[:4096])
        await asyncio.sleep(60)  # the client neither sends nor ends the stream

    started = asyncio.get_running_loop().time()
    details = await expect_error(
        registry.stub.UploadModelVersion(stalls(), timeout=30), grpc.StatusCode.ABORTED
    )
    assert asyncio.get_running_loop().time() - started < IDLE_TIMEOUT_S + 5
    assert details.error_info.reason == "UPLOAD_INCOMPLETE"
    assert details.error_info.metadata["received_bytes"] == "4096"
    await _model_missing(registry, unique)
    assert not (registry.artifacts / unique).exists()
    assert not list((registry.artifacts / ".uploads").glob("*"))


async def test_a_failed_upload_leaves_no_row_file_or_folder(
    registry: Registry, unique: str
) -> None:
    data = b"payload"
    for header in (
        _header(unique, data, sha256="0" * 64),  # checksum mismatch
        _header(unique, data + b"more"),  # ends early
    ):
        try:
            await registry.stub.UploadModelVersion(
                _stream(header, rpc.UploadModelVersionRequest(chunk=data))
            )
        except grpc.aio.AioRpcError as error:
            assert error.code() in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.ABORTED)
        else:
            raise AssertionError("the upload succeeded")
    await _model_missing(registry, unique)
    assert not (registry.artifacts / unique).exists()
    assert not list((registry.artifacts / ".uploads").glob("*"))


async def test_setting_an_alias_to_its_version_records_nothing(
    registry: Registry, unique: str
) -> None:
    for data in (b"one", b"two"):
        await _upload(registry, unique, data)
    for version in (1, 2):
        await registry.stub.SetAlias(
            rpc.SetAliasRequest(model=unique, alias="live", version=version)
        )
    again = await registry.stub.SetAlias(rpc.SetAliasRequest(model=unique, alias="live", version=2))
    assert again.alias.version == 2
    assert not again.HasField("event")
    history = await registry.stub.ListAliasHistory(
        rpc.ListAliasHistoryRequest(model=unique, alias="live")
    )
    assert [(e.from_version, e.to_version) for e in history.events] == [(0, 1), (1, 2)]
    rolled = await registry.stub.RollbackAlias(rpc.RollbackAliasRequest(model=unique, alias="live"))
    assert rolled.alias.version == 1


@pytest.mark.parametrize(
    "key", ["User-Id", "user id", "user_id\n", "x:y", "actor", "key-id", "blob-bin", ":path", "é"]
)
async def test_stickiness_keys_must_make_a_readable_header(
    registry: Registry, unique: str, key: str
) -> None:
    await _upload(registry, unique, b"one")
    details = await expect_error(
        registry.stub.CreateExperiment(
            rpc.CreateExperimentRequest(
                experiment=pb.Experiment(
                    name=f"{unique}-exp",
                    model=unique,
                    stickiness_key=key,
                    arms=[pb.ExperimentArm(name="a", version=1, weight=100)],
                )
            )
        ),
        INVALID,
    )
    assert [v.field for v in details.bad_request.field_violations] == ["experiment.stickiness_key"]


async def test_valid_stickiness_keys_are_accepted(registry: Registry, unique: str) -> None:
    await _upload(registry, unique, b"one")
    for i, key in enumerate(["user-id", "user_id", "tenant.v2", ""]):
        created = await registry.stub.CreateExperiment(
            rpc.CreateExperimentRequest(
                experiment=pb.Experiment(
                    name=f"{unique}-e{i}",
                    model=unique,
                    stickiness_key=key,
                    arms=[pb.ExperimentArm(name="a", version=1, weight=100)],
                )
            )
        )
        assert created.experiment.stickiness_key == (key or "api_key")
