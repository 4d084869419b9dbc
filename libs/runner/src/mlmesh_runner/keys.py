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

``python -m mlmesh_runner.keys --state DIR`` makes them for every registered
service (Compose's init step), and on request a database password and
random tokens (Ray's, vLLM's API key), each where it is asked for (Compose
gives each a volume of its own); it prints no secret.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import json_format
from mlmesh_chassis.registration import SERVICE_KEY_NAME

if TYPE_CHECKING:
    from mlmesh_chassis.registration import ServiceRegistration

ADMIN = "admin"
# The bootstrap key directory, in the secrets folder.
DIRECTORY_FILE = "bootstrap-keys.json"


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
    state: Path,
    services: Iterable[tuple[str, Iterable[str]]],
    admin_file: Path | None = None,
    key_files: dict[str, Path] | None = None,
) -> BootstrapKeys:
    """Makes (once) the admin key (``<state>/admin.key`` unless
    ``admin_file`` says otherwise) and a key per ``(service, scope names)``
    (names such as "REGISTRY_READ"), each in ``<state>/secrets/<name>.key``
    unless ``key_files`` names another file, and writes the bootstrap
    directory."""
    from mlmesh.gateway.v1 import gateway_pb2 as pb
    from mlmesh.gateway.v1 import key_directory_service_pb2 as kd
    from mlmesh_chassis.auth import secret_sha256

    def secret_in(path: Path) -> str:
        key_id = secrets.token_hex(8)
        return _private_file(path, f"mlm_{key_id}_{secrets.token_urlsafe(24)}")

    folder = state / "secrets"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    entries = []
    admin_file = admin_file or state / "admin.key"
    wanted = [(ADMIN, admin_file, ["ADMIN"])]
    service_files = {}
    for name, scopes in services:
        service_files[name] = (key_files or {}).get(name, folder / f"{name}.key")
        wanted.append((name, service_files[name], list(scopes)))
    service_ids = {}
    for name, path, scopes in wanted:
        secret = secret_in(path)
        service_ids[name] = secret.split("_")[1]
        key = pb.Key(
            id=service_ids[name],
            display_name=f"bootstrap {name}" if name == ADMIN else SERVICE_KEY_NAME.format(name),
            state=pb.KEY_STATE_ACTIVE,
            scopes=pb.KeyScopes(
                services=[pb.PlatformService.Value(f"PLATFORM_SERVICE_{s}") for s in scopes],  # type: ignore[misc]
                model_patterns=["*"] if name == ADMIN else [],
            ),
        )
        entries.append(kd.DirectoryKey(key=key, secret_sha256=secret_sha256(secret)))
    directory_file = folder / DIRECTORY_FILE
    text = json_format.MessageToJson(kd.WatchKeysResponse(snapshot=True, keys=entries))
    tmp = directory_file.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    tmp.replace(directory_file)
    service_ids.pop(ADMIN)
    return BootstrapKeys(admin_file, service_files, directory_file, service_ids)


def key_env(
    spec: ServiceRegistration,
    secrets_dir: Path,
    key_directory: str | None,
    directory_at: dict[str, str],
    local_socket: Path | None = None,
) -> dict[str, str]:
    """A chassis service's key settings: its own key's file, the bootstrap
    keys it starts from, the services it does not meter (by name, resolved
    through the bootstrap keys), and where the key directory (and the
    ledger) is: ``directory_at`` is ``{"TARGET": "unix:..." or "host:port"}``
    or ``{"TARGET_FILE": port file}``. The key directory's own service gets
    ``local_socket`` (when given) instead. The runner and the Compose
    generator both take a service's key settings from here."""
    prefix = spec.env_prefix
    env = {
        f"{prefix}SERVICE_KEY_FILE": str(secrets_dir / f"{spec.name}.key"),
        f"{prefix}BOOTSTRAP_KEYS_FILE": str(secrets_dir / DIRECTORY_FILE),
    }
    if spec.billed_by:
        env[f"{prefix}UNMETERED_SERVICES"] = ",".join(spec.billed_by)
    if key_directory is None:
        return env
    if spec.name == key_directory:
        if local_socket is not None:
            env[f"{prefix}LOCAL_SOCKET"] = str(local_socket)
        return env
    for name, value in directory_at.items():
        env[f"{prefix}KEYS_{name}"] = value
        if "USAGE_RECORD" in spec.key_scopes:
            # Its usage goes into the gateway's ledger (RecordUsage).
            env[f"{prefix}USAGE_{name}"] = value
    return env


def keyed(catalog: Iterable[ServiceRegistration]) -> list[tuple[str, tuple[str, ...]]]:
    """The services that get a key (the chassis services, which write a port
    file) and their keys' scopes."""
    return [(s.name, s.key_scopes) for s in catalog if s.port_discovery == "port-file"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mlmesh_runner.keys",
        description="Make (once) the bootstrap keys of every registered service.",
    )
    parser.add_argument("--state", type=Path, required=True, help="writes <state>/secrets/")
    parser.add_argument(
        "--admin-file", type=Path, default=None, help="the admin key (default <state>/admin.key)"
    )
    parser.add_argument(
        "--database-dir",
        type=Path,
        default=None,
        help="also make (once) a database password there: db.password (the server's) and "
        "pgpass (libpq's PGPASSFILE, for --database-user)",
    )
    parser.add_argument("--database-user", default="mlmesh")
    parser.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="NAME",
        help="also make (once) a random token in <state>/secrets/NAME",
    )
    parser.add_argument(
        "--token-file",
        action="append",
        type=Path,
        default=[],
        metavar="PATH",
        help="also make (once) a random token in PATH, its folder made mode 0700 when missing "
        "(e.g. Ray's auth token or vLLM's API key, in a folder of their own)",
    )
    parser.add_argument(
        "--key-file",
        action="append",
        default=[],
        metavar="SERVICE=PATH",
        help="SERVICE's key in PATH (its name SERVICE.key) instead of <state>/secrets/: "
        "Compose's batch, whose Ray nodes read it too, in a folder of its own",
    )
    args = parser.parse_args(argv)
    from mlmesh_runner.catalog import CATALOG

    services = keyed(CATALOG)
    key_files: dict[str, Path] = {}
    for given in args.key_file:
        name, _, path = given.partition("=")
        if name not in dict(services) or not path or Path(path).name != f"{name}.key":
            raise SystemExit(
                f"--key-file {given[:60]!r}: not SERVICE=PATH, SERVICE a keyed service's name "
                "and PATH's file name SERVICE.key"
            )
        key_files[name] = Path(path)
    # Never a bootstrap key's or the directory's file (nor its temporary).
    reserved = {f"{name}.key" for name, _ in services} | {
        DIRECTORY_FILE,
        Path(DIRECTORY_FILE).with_suffix(".tmp").name,
    }
    for given in [*args.token, *(path.name for path in args.token_file)]:
        if not TOKEN_NAME.fullmatch(given) or given in reserved:
            raise SystemExit(
                f"token {given[:60]!r}: a token's file name is {TOKEN_NAME.pattern}, "
                "never a bootstrap key's"
            )
    tokens = [args.state / "secrets" / name for name in args.token] + list(args.token_file)
    os.umask(0o077)
    keys = ensure_bootstrap_keys(args.state, services, args.admin_file, key_files)
    print(
        f"bootstrap keys: {len(keys.service_files)} services, directory {keys.directory_file}, "
        f"admin key in {keys.admin_file}",
        flush=True,
    )
    for path in tokens:
        # 64 hex characters: what Ray and vLLM's server accept.
        _private_file(path, secrets.token_hex(32))
        print(f"token {path.name} in {path.parent}", flush=True)
    if args.database_dir is not None:
        ensure_database_password(args.database_dir, args.database_user)
        print(f"database password in {args.database_dir}", flush=True)


USER_PATTERN = re.compile(r"[A-Za-z0-9_]{1,63}")
# A token's file name: no folder, no leading dot; one suffix at most.
TOKEN_NAME = re.compile(r"[a-z][a-z0-9-]{0,40}(?:\.[a-z0-9]{1,8})?")


def ensure_database_password(folder: Path, user: str) -> Path:
    """Makes (once) a database password: ``db.password`` (what the server
    is initialised with) and ``pgpass`` (libpq's password file: clients
    name it in PGPASSFILE, so no URL or environment holds the password),
    both mode 0600. Returns the pgpass file."""
    if not USER_PATTERN.fullmatch(user):
        raise ValueError(f"database user {user[:40]!r} is not {USER_PATTERN.pattern}")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    # URL-safe characters only: nothing pgpass or a URL would need escaped.
    password = _private_file(folder / "db.password", secrets.token_urlsafe(24))
    pgpass = folder / "pgpass"
    _private_file(pgpass, f"*:*:*:{user}:{password}")
    return pgpass


if __name__ == "__main__":
    main()
