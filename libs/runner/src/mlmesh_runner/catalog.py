"""The services the local runner starts, in start order: every installed
service's registration (``mlmesh_chassis.registration``, entry point group
``mlmesh.services``).

A service joins the mesh with its own folder and one registration there;
nothing here names it.
"""

from __future__ import annotations

from pathlib import Path

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


def service_env(
    spec: ServiceSpec,
    ctx: RunContext,
    *,
    instance: str,
    port: int,
    port_file: Path,
    http_port: int,
    key_env: dict[str, str],
) -> tuple[dict[str, str], dict[str, str]]:
    """A service's environment as two layers: its registration's defaults
    (which the caller's environment may override) and what is fixed (its
    registration's fixed_env, its port, port file, instance, HTTP port, key
    settings). The runner and the Compose generator both start a service
    with these."""
    defaults = dict(spec.env(ctx))
    fixed = {
        **spec.fixed_env,
        f"{spec.env_prefix}PORT": str(port),
        f"{spec.env_prefix}PORT_FILE": str(port_file),
        # Which instance it is (``vectors``, ``vectors.1``, ...).
        f"{spec.env_prefix}INSTANCE": instance,
        **({f"{spec.env_prefix}HTTP_PORT": str(http_port)} if spec.http_routes else {}),
        **key_env,
        "PYTHONUNBUFFERED": "1",
    }
    return defaults, fixed


__all__ = [
    "CATALOG",
    "KEY_DIRECTORY_SERVICE",
    "RunContext",
    "ServiceSpec",
    "service_env",
]
