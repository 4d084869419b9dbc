"""The local mesh's bootstrap keys: the operator's admin key and one key per
service, each with only the scopes that service needs.

Secrets live in files of mode 0600 under ``<state>/secrets`` (the admin's in
``<state>/admin.key``), made once and reused by later runs. The gateway
inserts the bootstrap keys into its store when they are missing (a revoked
one stays revoked), and every service seeds its key view with them, so
services can call each other before the gateway is up. Rotate a service's
key with KeyService.RotateKey and write the new secret into its file: the
service re-reads it within a second. In Kubernetes the same files are
Secrets (deploy/).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format

ADMIN = "admin"


@dataclass(frozen=True)
class BootstrapKeys:
    admin_file: Path
    service_files: dict[str, Path]
    directory_file: Path  # WatchKeysResponse JSON: ids, SHA-256s, scopes
    # Each service key's id (public, unlike its secret).
    service_ids: dict[str, str]


def _private_file(path: Path, make: str) -> str:
    """The secret in ``path``, written (mode 0600) the first time."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(make + "\n")
    return make


def ensure_bootstrap_keys(
    state: Path, services: Iterable[tuple[str, Iterable[str]]]
) -> BootstrapKeys:
    """Makes (once) the admin key and a key per ``(service, scope names)``
    (names such as "REGISTRY_READ"), and writes the bootstrap directory."""
    from mlmesh.gateway.v1 import gateway_pb2 as pb
    from mlmesh.gateway.v1 import key_directory_service_pb2 as kd
    from mlmesh_chassis.auth import secret_sha256

    def secret_in(path: Path) -> str:
        key_id = secrets.token_hex(8)
        return _private_file(path, f"mlm_{key_id}_{secrets.token_urlsafe(24)}")

    folder = state / "secrets"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    entries = []
    admin_file = state / "admin.key"
    wanted = [(ADMIN, admin_file, ["ADMIN"])]
    service_files = {}
    for name, scopes in services:
        service_files[name] = folder / f"{name}.key"
        wanted.append((name, service_files[name], list(scopes)))
    service_ids = {}
    for name, path, scopes in wanted:
        secret = secret_in(path)
        service_ids[name] = secret.split("_")[1]
        key = pb.Key(
            id=service_ids[name],
            display_name=f"bootstrap {name}" if name == ADMIN else f"service {name}",
            state=pb.KEY_STATE_ACTIVE,
            scopes=pb.KeyScopes(
                services=[pb.PlatformService.Value(f"PLATFORM_SERVICE_{s}") for s in scopes],  # type: ignore[misc]
                model_patterns=["*"] if name == ADMIN else [],
            ),
        )
        entries.append(kd.DirectoryKey(key=key, secret_sha256=secret_sha256(secret)))
    directory_file = folder / "bootstrap-keys.json"
    text = json_format.MessageToJson(kd.WatchKeysResponse(snapshot=True, keys=entries))
    tmp = directory_file.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    tmp.replace(directory_file)
    service_ids.pop(ADMIN)
    return BootstrapKeys(admin_file, service_files, directory_file, service_ids)
