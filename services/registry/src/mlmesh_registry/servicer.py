"""RegistryService: proto in, domain call, proto out. Errors are raised as
domain errors and mapped to status by the chassis interceptor."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh.registry.v1 import registry_service_pb2_grpc
from mlmesh_chassis.auth import current_principal
from mlmesh_chassis.errors import Aborted, DataLoss, InvalidArgument, NotFound, Reason

from mlmesh_registry.artifacts import ArtifactStore, ArtifactWriter
from mlmesh_registry.config import RegistrySettings
from mlmesh_registry.store import RegistryStore
from mlmesh_registry.validation import (
    MAX_DESCRIPTION_CHARS,
    MAX_LINEAGE_BYTES,
    SHA256,
    check_name,
    check_tags,
    check_text,
)

log = logging.getLogger("mlmesh.registry")


def _actor(context: grpc.aio.ServicerContext) -> str:
    """Who acts: the caller's verified key (never a header a caller sets)."""
    return current_principal().actor


async def _idle_bounded(
    messages: AsyncIterator[Any], idle_s: float, received: Callable[[], int]
) -> AsyncIterator[Any]:
    """The messages of a client stream; ABORTED once none came for ``idle_s``
    (a stalled upload must not hold its partial file and a task forever)."""
    iterator = aiter(messages)
    while True:
        try:
            message = await asyncio.wait_for(anext(iterator), idle_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise Aborted(
                f"no upload message for {idle_s:g} s after {received()} bytes; "
                "the upload was abandoned",
                reason=Reason.ERROR_REASON_UPLOAD_INCOMPLETE,
                idle_timeout_s=f"{idle_s:g}",
                received_bytes=received(),
            ) from None
        yield message


class RegistryServicer(registry_service_pb2_grpc.RegistryServiceServicer):
    def __init__(
        self, store: RegistryStore, artifacts: ArtifactStore, settings: RegistrySettings
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.settings = settings

    # models
    async def CreateModel(self, request, context):  # type: ignore[no-untyped-def]
        return rpc.CreateModelResponse(model=await self.store.create_model(request.model))

    async def GetModel(self, request, context):  # type: ignore[no-untyped-def]
        return rpc.GetModelResponse(model=await self.store.get_model(request.name))

    async def ListModels(self, request, context):  # type: ignore[no-untyped-def]
        models, token = await self.store.list_models(
            request.page_size,
            request.page_token,
            request.name_prefix,
            check_tags("tags", request.tags),
        )
        return rpc.ListModelsResponse(models=models, next_page_token=token)

    async def UpdateModel(self, request, context):  # type: ignore[no-untyped-def]
        model = await self.store.update_model(request.model, list(request.update_mask.paths))
        return rpc.UpdateModelResponse(model=model)

    # versions
    async def UploadModelVersion(self, request_iterator, context):  # type: ignore[no-untyped-def]
        writer: ArtifactWriter | None = None
        messages = _idle_bounded(
            request_iterator,
            self.settings.upload_idle_timeout_seconds,
            lambda: writer.size if writer is not None else 0,
        )
        header = await self._read_header(messages)
        writer = await self.artifacts.begin(header.model)
        committed = False
        try:
            async for message in messages:
                if message.WhichOneof("content") != "chunk":
                    raise InvalidArgument.field("header", "only the first message may be a header")
                if not message.chunk:
                    raise InvalidArgument.field("chunk", "chunks must not be empty")
                if len(message.chunk) > self.settings.max_chunk_bytes:
                    raise InvalidArgument.field(
                        "chunk", f"at most {self.settings.max_chunk_bytes} bytes per chunk"
                    )
                if writer.size + len(message.chunk) > header.size_bytes:
                    raise InvalidArgument(
                        f"more bytes than the declared size_bytes {header.size_bytes}",
                        field="header.size_bytes",
                        size_bytes=header.size_bytes,
                    )
                await writer.write(message.chunk)
            if writer.size < header.size_bytes:
                raise Aborted(
                    f"upload ended after {writer.size} of {header.size_bytes} bytes",
                    reason=Reason.ERROR_REASON_UPLOAD_INCOMPLETE,
                    received_bytes=writer.size,
                    size_bytes=header.size_bytes,
                )
            if writer.sha256 != header.sha256:
                raise DataLoss(
                    f"sha256 {writer.sha256} does not match the declared {header.sha256}",
                    actual_sha256=writer.sha256,
                    sha256=header.sha256,
                )
            path = await writer.seal()
            version = await self.store.add_version(header, path, header.create_model)
            committed = True
            log.info(
                "version uploaded",
                extra={
                    "model": header.model,
                    "version": version.version,
                    "size_bytes": version.size_bytes,
                },
            )
            return rpc.UploadModelVersionResponse(model_version=version)
        finally:
            if not committed:  # errors, cancellation, a cut-off stream
                # Shielded: a cancelled call's cleanup must finish even if the
                # handler's task is cancelled again while it runs.
                await asyncio.shield(writer.discard())

    async def _read_header(self, messages: AsyncIterator[Any]) -> rpc.UploadHeader:
        first = await anext(messages, None)
        if first is None or first.WhichOneof("content") != "header":
            raise InvalidArgument.field("header", "the first message must carry the header")
        header = first.header
        check_name("header.model", header.model)
        check_tags("header.tags", header.tags)
        check_text("header.description", header.description, MAX_DESCRIPTION_CHARS)
        if header.lineage.ByteSize() > MAX_LINEAGE_BYTES:
            raise InvalidArgument.field(
                "header.lineage", f"at most {MAX_LINEAGE_BYTES} bytes serialized"
            )
        if not SHA256.fullmatch(header.sha256):
            raise InvalidArgument.field("header.sha256", "must be 64 lowercase hex characters")
        if not 0 < header.size_bytes <= self.settings.max_artifact_bytes:
            raise InvalidArgument.field(
                "header.size_bytes", f"must be between 1 and {self.settings.max_artifact_bytes}"
            )
        if len(header.format) > 63:
            raise InvalidArgument.field("header.format", "at most 63 characters")
        if not header.create_model and not await self.store.model_exists(header.model):
            raise NotFound("model", header.model)
        return header

    async def DownloadModelVersion(self, request, context):  # type: ignore[no-untyped-def]
        version = await self._resolve(request.reference)
        if not 0 <= request.offset <= version.size_bytes:
            raise InvalidArgument.field(
                "offset", f"must be between 0 and the size {version.size_bytes}"
            )
        path = await self.store.artifact_path(version.model, version.version)
        yield rpc.DownloadModelVersionResponse(model_version=version)
        async for data in self.artifacts.read(
            path, request.offset, self.settings.download_chunk_bytes
        ):
            yield rpc.DownloadModelVersionResponse(chunk=data)

    async def GetModelVersion(self, request, context):  # type: ignore[no-untyped-def]
        version = await self.store.get_version(request.model, request.version)
        return rpc.GetModelVersionResponse(model_version=version)

    async def ResolveModelReference(self, request, context):  # type: ignore[no-untyped-def]
        return rpc.ResolveModelReferenceResponse(
            model_version=await self._resolve(request.reference)
        )

    async def _resolve(self, reference) -> pb.ModelVersion:  # type: ignore[no-untyped-def]
        selector = reference.WhichOneof("selector")
        value = getattr(reference, selector) if selector else None
        return await self.store.resolve(reference.model, selector, value)

    async def ListModelVersions(self, request, context):  # type: ignore[no-untyped-def]
        items, token = await self.store.list_versions(
            request.model, request.page_size, request.page_token, check_tags("tags", request.tags)
        )
        return rpc.ListModelVersionsResponse(model_versions=items, next_page_token=token)

    async def UpdateModelVersion(self, request, context):  # type: ignore[no-untyped-def]
        version = await self.store.update_version(
            request.model_version, list(request.update_mask.paths)
        )
        return rpc.UpdateModelVersionResponse(model_version=version)

    # aliases
    async def SetAlias(self, request, context):  # type: ignore[no-untyped-def]
        expected = request.expected_version if request.HasField("expected_version") else None
        alias, event = await self.store.set_alias(
            request.model, request.alias, request.version, request.reason, _actor(context), expected
        )
        if not event.sequence:  # already there: nothing moved, nothing recorded
            return rpc.SetAliasResponse(alias=alias)
        return rpc.SetAliasResponse(alias=alias, event=event)

    async def GetAlias(self, request, context):  # type: ignore[no-untyped-def]
        return rpc.GetAliasResponse(alias=await self.store.get_alias(request.model, request.alias))

    async def ListAliases(self, request, context):  # type: ignore[no-untyped-def]
        items, token = await self.store.list_aliases(
            request.model, request.page_size, request.page_token
        )
        return rpc.ListAliasesResponse(aliases=items, next_page_token=token)

    async def DeleteAlias(self, request, context):  # type: ignore[no-untyped-def]
        event = await self.store.delete_alias(
            request.model, request.alias, request.reason, _actor(context)
        )
        return rpc.DeleteAliasResponse(event=event)

    async def RollbackAlias(self, request, context):  # type: ignore[no-untyped-def]
        alias, event = await self.store.rollback_alias(
            request.model, request.alias, request.reason, _actor(context)
        )
        return rpc.RollbackAliasResponse(alias=alias, event=event)

    async def ListAliasHistory(self, request, context):  # type: ignore[no-untyped-def]
        events, token = await self.store.alias_history(
            request.model, request.alias, request.page_size, request.page_token
        )
        return rpc.ListAliasHistoryResponse(events=events, next_page_token=token)

    # experiments
    async def CreateExperiment(self, request, context):  # type: ignore[no-untyped-def]
        experiment = await self.store.create_experiment(request.experiment)
        return rpc.CreateExperimentResponse(experiment=experiment)

    async def GetExperiment(self, request, context):  # type: ignore[no-untyped-def]
        return rpc.GetExperimentResponse(experiment=await self.store.get_experiment(request.name))

    async def ListExperiments(self, request, context):  # type: ignore[no-untyped-def]
        items, token = await self.store.list_experiments(
            request.model, request.state, request.page_size, request.page_token
        )
        return rpc.ListExperimentsResponse(experiments=items, next_page_token=token)

    async def UpdateExperiment(self, request, context):  # type: ignore[no-untyped-def]
        experiment = await self.store.update_experiment(
            request.experiment, list(request.update_mask.paths)
        )
        return rpc.UpdateExperimentResponse(experiment=experiment)

    async def StopExperiment(self, request, context):  # type: ignore[no-untyped-def]
        return rpc.StopExperimentResponse(experiment=await self.store.stop_experiment(request.name))

    # events
    async def WatchEvents(self, request, context) -> AsyncIterator[rpc.WatchEventsResponse]:  # type: ignore[no-untyped-def,override]
        if request.after_sequence < 0:
            raise InvalidArgument.field("after_sequence", "must not be negative")
        async for sequence, kind, body in self.store.watch(
            request.models, request.after_sequence, self.settings.watch_poll_seconds
        ):
            if kind == "alias":
                yield rpc.WatchEventsResponse(
                    sequence=sequence, alias_event=pb.AliasEvent.FromString(body)
                )
            else:
                yield rpc.WatchEventsResponse(
                    sequence=sequence, experiment_event=pb.ExperimentEvent.FromString(body)
                )
