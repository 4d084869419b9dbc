"""RegistryService: proto in, domain call, proto out. Errors are raised as
domain errors and mapped to status by the chassis interceptor."""

from __future__ import annotations

from collections.abc import AsyncIterator

from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh.registry.v1 import registry_service_pb2_grpc
from mlmesh_chassis.auth import current_principal
from mlmesh_chassis.errors import InvalidArgument

from mlmesh_registry.artifacts import ArtifactStore
from mlmesh_registry.config import RegistrySettings
from mlmesh_registry.downloads import open_download
from mlmesh_registry.store import RegistryStore
from mlmesh_registry.uploads import UploadLimits, UploadSession


def _actor() -> str:
    """Who acts: the caller's verified key (never a header a caller sets)."""
    return current_principal().actor


def _header(message: rpc.UploadModelVersionRequest | None) -> rpc.UploadHeader:
    if message is None or message.WhichOneof("content") != "header":
        raise InvalidArgument.field("header", "the first message must carry the header")
    return message.header


def _chunk(message: rpc.UploadModelVersionRequest) -> bytes:
    if message.WhichOneof("content") != "chunk":
        raise InvalidArgument.field("header", "only the first message may be a header")
    return message.chunk


class RegistryServicer(registry_service_pb2_grpc.RegistryServiceServicer):
    def __init__(
        self, store: RegistryStore, artifacts: ArtifactStore, settings: RegistrySettings
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.settings = settings
        self.upload_limits = UploadLimits.of(settings)

    # models
    async def CreateModel(self, request, context):  # type: ignore[no-untyped-def]
        return rpc.CreateModelResponse(model=await self.store.models.create(request.model))

    async def GetModel(self, request, context):  # type: ignore[no-untyped-def]
        return rpc.GetModelResponse(model=await self.store.models.get(request.name))

    async def ListModels(self, request, context):  # type: ignore[no-untyped-def]
        models, token = await self.store.models.list_page(
            request.page_size, request.page_token, request.name_prefix, request.tags
        )
        return rpc.ListModelsResponse(models=models, next_page_token=token)

    async def UpdateModel(self, request, context):  # type: ignore[no-untyped-def]
        model = await self.store.models.update(request.model, request.update_mask.paths)
        return rpc.UpdateModelResponse(model=model)

    # versions
    async def UploadModelVersion(self, request_iterator, context):  # type: ignore[no-untyped-def]
        async with UploadSession(self.store, self.artifacts, self.upload_limits) as upload:
            messages = upload.messages(request_iterator)
            await upload.begin(_header(await anext(messages, None)))
            async for message in messages:
                await upload.write(_chunk(message))
            version = await upload.commit()
        return rpc.UploadModelVersionResponse(model_version=version)

    async def DownloadModelVersion(self, request, context):  # type: ignore[no-untyped-def]
        version, chunks = await open_download(
            self.store.versions,
            self.artifacts,
            request.reference,
            request.offset,
            self.settings.download_chunk_bytes,
        )
        yield rpc.DownloadModelVersionResponse(model_version=version)
        async for data in chunks:
            yield rpc.DownloadModelVersionResponse(chunk=data)

    async def GetModelVersion(self, request, context):  # type: ignore[no-untyped-def]
        version = await self.store.versions.get(request.model, request.version)
        return rpc.GetModelVersionResponse(model_version=version)

    async def ResolveModelReference(self, request, context):  # type: ignore[no-untyped-def]
        version = await self.store.versions.resolve(request.reference)
        return rpc.ResolveModelReferenceResponse(model_version=version)

    async def ListModelVersions(self, request, context):  # type: ignore[no-untyped-def]
        items, token = await self.store.versions.list_page(
            request.model, request.page_size, request.page_token, request.tags
        )
        return rpc.ListModelVersionsResponse(model_versions=items, next_page_token=token)

    async def UpdateModelVersion(self, request, context):  # type: ignore[no-untyped-def]
        version = await self.store.versions.update(request.model_version, request.update_mask.paths)
        return rpc.UpdateModelVersionResponse(model_version=version)

    # aliases
    async def SetAlias(self, request, context):  # type: ignore[no-untyped-def]
        expected = request.expected_version if request.HasField("expected_version") else None
        alias, event = await self.store.aliases.set(
            request.model, request.alias, request.version, request.reason, _actor(), expected
        )
        return rpc.SetAliasResponse(alias=alias, event=event)

    async def GetAlias(self, request, context):  # type: ignore[no-untyped-def]
        alias = await self.store.aliases.get(request.model, request.alias)
        return rpc.GetAliasResponse(alias=alias)

    async def ListAliases(self, request, context):  # type: ignore[no-untyped-def]
        items, token = await self.store.aliases.list_page(
            request.model, request.page_size, request.page_token
        )
        return rpc.ListAliasesResponse(aliases=items, next_page_token=token)

    async def DeleteAlias(self, request, context):  # type: ignore[no-untyped-def]
        event = await self.store.aliases.delete(
            request.model, request.alias, request.reason, _actor()
        )
        return rpc.DeleteAliasResponse(event=event)

    async def RollbackAlias(self, request, context):  # type: ignore[no-untyped-def]
        alias, event = await self.store.aliases.rollback(
            request.model, request.alias, request.reason, _actor()
        )
        return rpc.RollbackAliasResponse(alias=alias, event=event)

    async def ListAliasHistory(self, request, context):  # type: ignore[no-untyped-def]
        events, token = await self.store.aliases.history(
            request.model, request.alias, request.page_size, request.page_token
        )
        return rpc.ListAliasHistoryResponse(events=events, next_page_token=token)

    # experiments
    async def CreateExperiment(self, request, context):  # type: ignore[no-untyped-def]
        experiment = await self.store.experiments.create(request.experiment)
        return rpc.CreateExperimentResponse(experiment=experiment)

    async def GetExperiment(self, request, context):  # type: ignore[no-untyped-def]
        experiment = await self.store.experiments.get(request.name)
        return rpc.GetExperimentResponse(experiment=experiment)

    async def ListExperiments(self, request, context):  # type: ignore[no-untyped-def]
        items, token = await self.store.experiments.list_page(
            request.model, request.state, request.page_size, request.page_token
        )
        return rpc.ListExperimentsResponse(experiments=items, next_page_token=token)

    async def UpdateExperiment(self, request, context):  # type: ignore[no-untyped-def]
        experiment = await self.store.experiments.update(
            request.experiment, request.update_mask.paths
        )
        return rpc.UpdateExperimentResponse(experiment=experiment)

    async def StopExperiment(self, request, context):  # type: ignore[no-untyped-def]
        experiment = await self.store.experiments.stop(request.name)
        return rpc.StopExperimentResponse(experiment=experiment)

    # events
    async def WatchEvents(self, request, context) -> AsyncIterator[rpc.WatchEventsResponse]:  # type: ignore[no-untyped-def,override]
        async for event in self.store.events.watch(
            request.models, request.after_sequence, self.settings.watch_poll_seconds
        ):
            if isinstance(event, pb.AliasEvent):
                yield rpc.WatchEventsResponse(sequence=event.sequence, alias_event=event)
            else:
                yield rpc.WatchEventsResponse(sequence=event.sequence, experiment_event=event)
