"""The registry's domain state (no gRPC here), one module per aggregate on
one shared base (``base``): models, versions, aliases, experiments and the
event log.

Proto messages from the contract are the data carriers; every rule about
names, versions, aliases and experiments lives here, and every change to an
alias or experiment appends to the event log in the same transaction.
"""

from __future__ import annotations

import asyncio

from mlmesh_chassis.database import Database

from mlmesh_registry.store.aliases import AliasStore
from mlmesh_registry.store.events import EventLog
from mlmesh_registry.store.experiments import ExperimentStore
from mlmesh_registry.store.models import ModelStore
from mlmesh_registry.store.versions import VersionStore

__all__ = [
    "AliasStore",
    "EventLog",
    "ExperimentStore",
    "ModelStore",
    "RegistryStore",
    "VersionStore",
]


class RegistryStore:
    """The five aggregates on one database. They share one condition, which
    every committed write notifies, so watchers see this process's events at
    once."""

    def __init__(self, database: Database) -> None:
        changes = asyncio.Condition()
        self.models = ModelStore(database, changes)
        self.versions = VersionStore(database, changes)
        self.aliases = AliasStore(database, changes)
        self.experiments = ExperimentStore(database, changes)
        self.events = EventLog(database, changes)
