"""RegistryClient: the registry's RPCs as an async Python API.

    async with RegistryClient("127.0.0.1:8080", api_key=key) as registry:
        version = await registry.upload_folder("churn", "out/model", format="sklearn")
        await registry.set_alias("churn", "champion", version.version)
        await registry.download_folder("churn@champion", "serving/churn")

Reads (resolve, lists, downloads) are retried on UNAVAILABLE through the
chassis' retry policy; a retried download resumes where it stopped. Writes
are not retried: an upload sent twice would be two versions.

Uploads and downloads take a ``progress`` callback (mlmesh_sdk.progress):
``progress(done_bytes, total_bytes)`` as the bytes move, for a progress bar.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import grpc
from google.protobuf import struct_pb2
from mlmesh.common.v1.model_reference_pb2 import ModelReference
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh.registry.v1.registry_service_pb2_grpc import RegistryServiceStub
from mlmesh_chassis.auth import service_identity
from mlmesh_chassis.channels import MESSAGE_SIZE_OPTIONS
from mlmesh_chassis.interceptors import client_interceptors
from mlmesh_chassis.retry import call_idempotent

from mlmesh_sdk.pages import every_item
from mlmesh_sdk.progress import Progress
from mlmesh_sdk.reference import format_reference, parse_reference
from mlmesh_sdk.snapshot import (
    UnpackLimits,
    check_destination,
    environment_lock,
    file_sha256,
    pack_folder,
    source_snapshot,
    unpack_archive,
)

# The registry accepts upload chunks of 1 byte to 4 MiB.
MAX_CHUNK_BYTES = 4 * 1024 * 1024
# A download is retried (each try resuming) this many times on UNAVAILABLE.
DOWNLOAD_ATTEMPTS = 5

T = TypeVar("T")
Reference = str | ModelReference
PathLike = str | os.PathLike[str]


class DownloadError(Exception):
    """A download that ended early or whose bytes are not the artifact's."""


class DownloadIncompleteError(DownloadError):
    """The stream ended before every byte arrived; the file is kept to resume."""


class ChecksumMismatchError(DownloadError):
    """The downloaded file's sha256 or size differ from the version's; it was deleted."""


class UnsafeDestinationError(DownloadError):
    """The destination is a symlink or not a regular file: nothing is written through it."""


def _reference(reference: Reference) -> ModelReference:
    return parse_reference(reference) if isinstance(reference, str) else reference


class RegistryClient:
    """An async client of mlmesh.registry.v1.RegistryService.

    ``timeout`` is the deadline of each unary call and the longest wait for
    the next message of a download; uploads and downloads as a whole are
    bounded by ``transfer_timeout`` (None: no bound, for artifacts of any size).
    Use it as ``async with``: it owns its channel.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:8080",
        api_key: str | None = None,
        timeout: float | None = 30.0,
        *,
        transfer_timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.transfer_timeout = transfer_timeout
        self._credentials = credentials
        # No key given: inside a service, the service's own key (the chassis'
        # client interceptors add it); elsewhere MLMESH_API_KEY.
        if api_key is None and not service_identity().secret():
            api_key = os.environ.get("MLMESH_API_KEY", "")
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )
        self._channel: grpc.aio.Channel | None = None
        self._stub: RegistryServiceStub | None = None

    async def __aenter__(self) -> RegistryClient:
        options = list(MESSAGE_SIZE_OPTIONS)
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(
                self.target, options=options, interceptors=client_interceptors()
            )
        else:
            self._channel = grpc.aio.secure_channel(
                self.target, self._credentials, options=options, interceptors=client_interceptors()
            )
        self._stub = RegistryServiceStub(self._channel)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None

    @property
    def stub(self) -> RegistryServiceStub:
        """The raw stub, for RPCs this client does not wrap."""
        if self._stub is None:
            raise RuntimeError("RegistryClient is not open; use `async with RegistryClient(...)`")
        return self._stub

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata sent with every call (the API key, when set)."""
        return self._metadata

    async def _read(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        """A unary read, retried on UNAVAILABLE."""
        return await call_idempotent(
            lambda: method(request, timeout=self.timeout, metadata=self._metadata)
        )

    async def _write(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        return await method(request, timeout=self.timeout, metadata=self._metadata)

    # uploads

    async def upload_folder(
        self,
        model: str,
        folder: PathLike,
        *,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        format: str = "",
        run_metadata: Mapping[str, Any] | None = None,
        feature_service: str = "",
        source_folder: PathLike | None = None,
        create_model: bool = True,
        chunk_bytes: int = 1 << 20,
        progress: Progress | None = None,
    ) -> pb.ModelVersion:
        """Packs ``folder`` (see snapshot.pack_folder) and uploads it as the
        model's next version. The lineage records a snapshot of
        ``source_folder`` (default: the folder itself), the environment lock,
        ``run_metadata`` (JSON-like values) and ``feature_service``."""
        _check_chunk_bytes(chunk_bytes)
        folder = Path(folder)
        lineage = await asyncio.to_thread(
            _lineage, source_folder or folder, run_metadata, feature_service
        )
        packed = await asyncio.to_thread(pack_folder, folder)
        try:
            header = _header(
                model,
                packed.sha256,
                packed.size_bytes,
                description,
                tags,
                format,
                lineage,
                create_model,
            )
            return await self._upload(header, packed.path, chunk_bytes, progress)
        finally:
            packed.path.unlink(missing_ok=True)

    async def upload_file(
        self,
        model: str,
        path: PathLike,
        *,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        format: str = "",
        run_metadata: Mapping[str, Any] | None = None,
        feature_service: str = "",
        source_folder: PathLike | None = None,
        create_model: bool = True,
        chunk_bytes: int = 1 << 20,
        progress: Progress | None = None,
    ) -> pb.ModelVersion:
        """Uploads one already-packed artifact file as the model's next version.
        The lineage has a source snapshot only when ``source_folder`` is given."""
        _check_chunk_bytes(chunk_bytes)
        path = Path(path)
        lineage = await asyncio.to_thread(_lineage, source_folder, run_metadata, feature_service)
        sha256, size = await asyncio.to_thread(file_sha256, path)
        header = _header(model, sha256, size, description, tags, format, lineage, create_model)
        return await self._upload(header, path, chunk_bytes, progress)

    async def _upload(
        self,
        header: rpc.UploadHeader,
        path: Path,
        chunk_bytes: int,
        progress: Progress | None,
    ) -> pb.ModelVersion:
        handle: BinaryIO = await asyncio.to_thread(path.open, "rb")

        async def requests() -> AsyncIterator[rpc.UploadModelVersionRequest]:
            yield rpc.UploadModelVersionRequest(header=header)
            sent = 0
            if progress is not None:
                progress(sent, header.size_bytes)
            while chunk := await asyncio.to_thread(handle.read, chunk_bytes):
                yield rpc.UploadModelVersionRequest(chunk=chunk)
                sent += len(chunk)
                if progress is not None:
                    progress(sent, header.size_bytes)

        try:
            response = await self.stub.UploadModelVersion(
                requests(), timeout=self.transfer_timeout, metadata=self._metadata
            )
        finally:
            await asyncio.to_thread(handle.close)
        return response.model_version

    # downloads

    async def download(
        self,
        reference: Reference,
        dest_file: PathLike,
        *,
        resume: bool = True,
        progress: Progress | None = None,
    ) -> pb.ModelVersion:
        """Downloads a version's artifact to ``dest_file``.

        The reference is resolved once and the download pinned to that version,
        so an alias moving meanwhile cannot mix two artifacts. With ``resume``
        an existing ``dest_file`` is continued from its size. The whole file's
        sha256 and size are checked at the end: on a mismatch the file is
        deleted and ChecksumMismatchError raised. A stream cut short (after the
        retries) raises DownloadIncompleteError and keeps the file to resume.
        """
        version = await self.resolve(reference)
        return await self._download_version(version, Path(dest_file), resume, progress)

    async def _download_version(
        self, version: pb.ModelVersion, dest: Path, resume: bool, progress: Progress | None
    ) -> pb.ModelVersion:
        pinned = ModelReference(model=version.model, version=version.version)
        await asyncio.to_thread(_prepare_destination, dest, version.size_bytes, resume)
        downloaded = await call_idempotent(
            lambda: self._fetch(pinned, dest, version.size_bytes, progress),
            attempts=DOWNLOAD_ATTEMPTS,
            budget_s=float("inf"),  # every try resumes, so progress is never lost
        )
        sha256, size = await asyncio.to_thread(file_sha256, dest)
        if size != downloaded.size_bytes or sha256 != downloaded.sha256:
            await asyncio.to_thread(dest.unlink, missing_ok=True)
            raise ChecksumMismatchError(
                f"{format_reference(pinned)}: the downloaded file has sha256 {sha256} and "
                f"{size} bytes, not {downloaded.sha256} and {downloaded.size_bytes}; "
                f"{dest} was deleted"
            )
        return downloaded

    async def _fetch(
        self, reference: ModelReference, dest: Path, size: int, progress: Progress | None
    ) -> pb.ModelVersion:
        """One try: streams the bytes after dest's current size onto its end."""
        offset = await asyncio.to_thread(_size_of, dest)
        call = self.stub.DownloadModelVersion(
            rpc.DownloadModelVersionRequest(reference=reference, offset=offset),
            timeout=self.transfer_timeout,
            metadata=self._metadata,
        )
        handle: BinaryIO = await asyncio.to_thread(_open_regular, dest, os.O_APPEND)
        try:
            first = await self._next(call)
            if first is grpc.aio.EOF or first.WhichOneof("content") != "model_version":
                raise DownloadError("the registry's download stream did not start with metadata")
            version = first.model_version
            received = offset
            if progress is not None:
                progress(received, version.size_bytes)
            while (message := await self._next(call)) is not grpc.aio.EOF:
                received += len(message.chunk)
                if received > version.size_bytes:
                    raise ChecksumMismatchError(
                        f"the registry sent more than the {version.size_bytes} bytes of "
                        f"{format_reference(reference)}"
                    )
                await asyncio.to_thread(handle.write, message.chunk)
                if progress is not None:
                    progress(received, version.size_bytes)
        except BaseException:
            call.cancel()
            raise
        finally:
            await asyncio.to_thread(handle.close)
        if received < version.size_bytes:
            raise DownloadIncompleteError(
                f"{format_reference(reference)}: the stream ended after {received} of "
                f"{version.size_bytes} bytes; {dest} is kept, download again to resume"
            )
        return version

    async def _next(self, call: Any) -> Any:
        try:
            return await asyncio.wait_for(call.read(), self.timeout)
        except TimeoutError:
            call.cancel()
            raise TimeoutError(
                f"no data from the registry at {self.target} for {self.timeout} s"
            ) from None

    async def download_folder(
        self,
        reference: Reference,
        dest_dir: PathLike,
        *,
        limits: UnpackLimits | None = None,
        progress: Progress | None = None,
    ) -> pb.ModelVersion:
        """Downloads a folder packed by upload_folder and extracts it into
        ``dest_dir`` (missing or an empty folder), all or nothing: see
        snapshot.unpack_archive for what is refused and ``limits``. The
        archive downloads into a private folder (``tempfile.mkdtemp``) beside
        dest_dir, removed afterwards; retries within the call resume it."""
        version = await self.resolve(reference)
        dest = await asyncio.to_thread(Path(dest_dir).absolute)
        workdir = await asyncio.to_thread(_private_folder_beside, dest)
        try:
            archive = workdir / "artifact.tar"
            version = await self._download_version(version, archive, True, progress)
            await asyncio.to_thread(unpack_archive, archive, dest, limits)
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, True)
        return version

    async def ensure_registered(
        self,
        model: str,
        folder: PathLike,
        *,
        alias: str = "champion",
        reason: str = "bootstrap",
        **upload: Any,
    ) -> pb.ModelVersion:
        """The version ``model@alias`` points at; if there is none, uploads
        ``folder`` (``upload`` as for upload_folder) and points the alias at it.
        Idempotent, for bootstrap steps that run on every start."""
        try:
            return await self.resolve(ModelReference(model=model, alias=alias))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
        version = await self.upload_folder(model, folder, **upload)
        await self.set_alias(model, alias, version.version, reason=reason)
        return version

    # versions and models

    async def resolve(self, reference: Reference) -> pb.ModelVersion:
        """The version `name`, `name/3` or `name@alias` points at now."""
        request = rpc.ResolveModelReferenceRequest(reference=_reference(reference))
        response = await self._read(self.stub.ResolveModelReference, request)
        return response.model_version

    def _pages(
        self, method: Callable[..., Awaitable[Any]], request: Any, field: str
    ) -> AsyncIterator[Any]:
        """Every item of a paginated list, each page read with retries."""
        return every_item(lambda page: self._read(method, page), request, field)

    def list_models(
        self, *, name_prefix: str = "", tags: Mapping[str, str] | None = None, page_size: int = 0
    ) -> AsyncIterator[pb.Model]:
        """Every model (by name), following the pages."""
        request = rpc.ListModelsRequest(
            page_size=page_size, name_prefix=name_prefix, tags=tags or {}
        )
        return self._pages(self.stub.ListModels, request, "models")

    def list_experiments(
        self,
        model: str = "",
        *,
        state: pb.ExperimentState = pb.EXPERIMENT_STATE_UNSPECIFIED,
        page_size: int = 0,
    ) -> AsyncIterator[pb.Experiment]:
        """Every experiment (of ``model``, in ``state``; UNSPECIFIED for all),
        by name, following the pages."""
        request = rpc.ListExperimentsRequest(model=model, state=state, page_size=page_size)
        return self._pages(self.stub.ListExperiments, request, "experiments")

    def list_versions(
        self, model: str, *, tags: Mapping[str, str] | None = None, page_size: int = 0
    ) -> AsyncIterator[pb.ModelVersion]:
        """Every version of a model, newest first, following the pages."""
        request = rpc.ListModelVersionsRequest(model=model, page_size=page_size, tags=tags or {})
        return self._pages(self.stub.ListModelVersions, request, "model_versions")

    # aliases

    async def set_alias(
        self,
        model: str,
        alias: str,
        version: int,
        reason: str = "",
        *,
        expected_version: int | None = None,
    ) -> rpc.SetAliasResponse:
        """Points an alias at a version; the response has the alias and the
        history event. ``expected_version`` makes it a compare-and-set (0:
        only if the alias does not exist yet), else ABORTED."""
        request = rpc.SetAliasRequest(model=model, alias=alias, version=version, reason=reason)
        if expected_version is not None:
            request.expected_version = expected_version
        return await self._write(self.stub.SetAlias, request)

    async def rollback_alias(
        self, model: str, alias: str, reason: str = ""
    ) -> rpc.RollbackAliasResponse:
        """Moves an alias back to its previous version."""
        request = rpc.RollbackAliasRequest(model=model, alias=alias, reason=reason)
        return await self._write(self.stub.RollbackAlias, request)

    def alias_history(
        self, model: str, alias: str = "", *, page_size: int = 0
    ) -> AsyncIterator[pb.AliasEvent]:
        """A model's alias history (one alias's, when given), oldest first."""
        request = rpc.ListAliasHistoryRequest(model=model, alias=alias, page_size=page_size)
        return self._pages(self.stub.ListAliasHistory, request, "events")


def _check_chunk_bytes(chunk_bytes: int) -> None:
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be between 1 and {MAX_CHUNK_BYTES}, not {chunk_bytes}")


def _lineage(
    source_folder: PathLike | None,
    run_metadata: Mapping[str, Any] | None,
    feature_service: str,
) -> pb.Lineage:
    lineage = pb.Lineage(environment_lock=environment_lock(), feature_service=feature_service)
    if source_folder is not None:
        lineage.source.CopyFrom(source_snapshot(source_folder))
    if run_metadata:
        struct = struct_pb2.Struct()
        struct.update(dict(run_metadata))
        lineage.run_metadata.CopyFrom(struct)
    return lineage


def _header(
    model: str,
    sha256: str,
    size: int,
    description: str,
    tags: Mapping[str, str] | None,
    format: str,
    lineage: pb.Lineage,
    create_model: bool,
) -> rpc.UploadHeader:
    return rpc.UploadHeader(
        model=model,
        create_model=create_model,
        description=description,
        tags=dict(tags or {}),
        format=format,
        sha256=sha256,
        size_bytes=size,
        lineage=lineage,
    )


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _private_folder_beside(dest: Path) -> Path:
    """A new folder only this process can enter, in dest's parent (created);
    fails early when dest cannot receive the folder."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    check_destination(dest)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".download", dir=dest.parent))


def _open_regular(dest: Path, flags: int) -> BinaryIO:
    """Opens dest for writing without following a symlink, refusing anything
    but a regular file (a planted link must not receive the artifact)."""
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | flags, 0o644)
    except OSError as error:
        if dest.is_symlink():
            raise UnsafeDestinationError(
                f"{dest} is a symlink; refusing to write through it"
            ) from error
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeDestinationError(f"{dest} is not a regular file; refusing to write to it")
        return os.fdopen(fd, "ab" if flags & os.O_APPEND else "wb")
    except BaseException:
        os.close(fd)
        raise


def _prepare_destination(dest: Path, size: int, resume: bool) -> None:
    """Starts dest afresh unless it is a prefix-sized file to resume."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise UnsafeDestinationError(f"{dest} is {kind}; refusing to write to it")
    fresh = st is None or not resume or st.st_size > size
    _open_regular(dest, os.O_TRUNC if fresh else os.O_APPEND).close()
