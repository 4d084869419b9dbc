"""In-process servers under test that check keys like the mesh does: one key
view, fed by a KeyDirectory over a real KeyStore, for every server a test
starts (the gateway and its fake llm backends), and the gateway's own
service key as this process's identity."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import mlmesh_gateway
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh_chassis.auth import KeyView, ServiceIdentity, set_service_identity
from mlmesh_chassis.config import ServiceSettings
from mlmesh_chassis.database import Database
from mlmesh_chassis.server import ServiceHost, start_service
from mlmesh_gateway.key_directory import KeyDirectory
from mlmesh_gateway.keys import KeyStore

MIGRATIONS = Path(mlmesh_gateway.__file__).parent / "migrations"


async def migrated_gateway_db(url: str) -> Database:
    """The gateway's database at ``url``, migrated by the real migrations."""
    database = Database(
        url, name="gateway", migrations=MIGRATIONS, version_table="alembic_version_gateway"
    )
    await database.migrate()
    return database


class Settings(ServiceSettings):
    service_name: ClassVar[str] = "gateway-test"


class Keyring:
    """A KeyStore whose writes reach the servers' key view at once."""

    def __init__(self, store: KeyStore, directory: KeyDirectory) -> None:
        self.store = store
        self.directory = directory
        self.view = directory.view

    @classmethod
    async def open(cls, database: Database, folder: Path) -> Keyring:
        store = KeyStore(database)
        directory = KeyDirectory(store, KeyView(), poll_seconds=60)
        await directory.start()
        ring = cls(store, directory)
        _, secret = await ring.create(
            pb.Key(
                display_name="service gateway",
                scopes=pb.KeyScopes(services=[pb.PLATFORM_SERVICE_LLM]),
            )
        )
        (folder / "gateway.key").write_text(secret)
        set_service_identity(ServiceIdentity(folder / "gateway.key"))
        return ring

    async def create(self, key: pb.Key) -> tuple[pb.Key, str]:
        created = await self.store.create(key)
        await self.directory.refresh()
        return created

    async def revoke(self, key_id: str) -> pb.Key:
        revoked = await self.store.revoke(key_id, "test")
        await self.directory.refresh()
        return revoked

    async def serve(self, servicer, add) -> tuple[ServiceHost, int]:  # type: ignore[no-untyped-def]
        def register(server):  # type: ignore[no-untyped-def]
            add(servicer, server)
            return []

        host = await start_service(
            Settings(port=0, metrics_port=-1, drain_seconds=0),
            register,
            error_domain="mlmesh.test",
            key_view=self.view,
        )
        return host, host.port

    async def close(self) -> None:
        await self.directory.close()
        set_service_identity(ServiceIdentity(None))
