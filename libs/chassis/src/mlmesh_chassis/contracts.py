"""Every gRPC service in the generated mlmesh contracts.

Each server's reflection lists all of them, so grpcurl through Envoy can
describe the whole mesh whichever service answers reflection.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from google.protobuf import descriptor


@functools.cache
def all_services() -> tuple[descriptor.ServiceDescriptor, ...]:
    import mlmesh

    found: dict[str, descriptor.ServiceDescriptor] = {}
    for info in pkgutil.walk_packages(mlmesh.__path__, "mlmesh."):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(info.name)
            for service in module.DESCRIPTOR.services_by_name.values():
                found[service.full_name] = service
    return tuple(found[name] for name in sorted(found))
