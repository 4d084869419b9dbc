"""The services the local runner starts, in start order: every installed
service's registration (``mlmesh_chassis.registration``, entry point group
``mlmesh.services``).

A service joins the mesh with its own folder and one registration there;
nothing here names it.
"""

from __future__ import annotations

from mlmesh_chassis.registration import (
    RunContext,
    ServiceRegistration,
    key_directory_service,
    registrations,
)

# The runner's name for a registration (a benchmark may run one of its own).
ServiceSpec = ServiceRegistration

CATALOG: list[ServiceSpec] = list(registrations())

# The service that owns the keys (KeyDirectoryService); every other chassis
# service follows its directory.
KEY_DIRECTORY_SERVICE = key_directory_service()

__all__ = [
    "CATALOG",
    "KEY_DIRECTORY_SERVICE",
    "RunContext",
    "ServiceSpec",
]
