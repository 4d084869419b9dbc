"""`mlmesh features` commands: apply a folder of definitions, read features.

    mlmesh features apply ./feature_repo [--dry-run] [--prune]
    mlmesh features get fraud_model user_id=1 user_id=2
    mlmesh features get --feature user_spend:spend_1d user_id=1

`apply` sends every ``*.yaml`` / ``*.yml`` file of the folder (sorted by
name, joined section by section into one document) as one
ApplyFeatureDefinitions call, and prints a line per object that changes (or
would, with ``--dry-run``). A bad definition prints each violation on its
path (``feature_views[1].aggregations[0].column``) with a line:column, of the
file itself when the folder holds one file, else of the joined document.
`get` prints one line per entity, in the order given: each feature's value
(or its status when it has none).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from mlmesh.features.v1 import features_pb2 as pb
from mlmesh.features.v1 import features_service_pb2 as rpc
from mlmesh.features.v1 import features_service_pb2_grpc

from mlmesh_sdk.channel import mesh_channel

Subcommands = Any
SECTIONS = ("entities", "sources", "feature_views", "feature_services")
MAX_REPO_BYTES = 1 << 20


def read_repo(folder: Path) -> str:
    """The folder's YAML files as one document (each section's items in file
    order); ValueError for a folder with none, or over 1 MiB."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    if not files:
        raise ValueError(f"{folder} holds no .yaml files")
    if sum(p.stat().st_size for p in files) > MAX_REPO_BYTES:
        raise ValueError(f"{folder}'s definitions are over {MAX_REPO_BYTES} bytes")
    if len(files) == 1:
        return files[0].read_text()
    merged: dict[str, list[Any]] = {name: [] for name in SECTIONS}
    for path in files:
        document = yaml.safe_load(path.read_text()) or {}
        if not isinstance(document, dict):
            raise ValueError(f"{path}: a mapping of {', '.join(SECTIONS)}")
        for name, items in document.items():
            if name not in merged:
                raise ValueError(f"{path}: unknown section {name!r}")
            merged[name].extend(items or [])
    return yaml.safe_dump({k: v for k, v in merged.items() if v}, sort_keys=False)


def _entity_row(text: str) -> pb.EntityRow:
    row = pb.EntityRow()
    for pair in text.split(","):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"an entity is key=value[,key=value]: {text!r}")
        stripped = value.lstrip("-")
        if stripped.isdigit():
            number = int(value)
            row.join_keys[key].CopyFrom(
                struct_pb2.Value(number_value=number)
                if abs(number) <= 2**53
                else struct_pb2.Value(string_value=value)
            )
        else:
            row.join_keys[key].CopyFrom(struct_pb2.Value(string_value=value))
    return row


def add_features(commands: Subcommands) -> None:
    features = commands.add_parser("features", help="the feature store").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    apply = features.add_parser("apply", help="apply a folder of YAML definitions")
    apply.add_argument("folder", type=Path)
    apply.add_argument("--dry-run", action="store_true", help="show the changes, apply nothing")
    apply.add_argument(
        "--prune", action="store_true", help="delete what the folder no longer declares"
    )

    async def run_apply(args: argparse.Namespace) -> AsyncIterator[Message]:
        source = read_repo(args.folder)
        async with mesh_channel(args.target, args.api_key or "") as channel:
            stub = features_service_pb2_grpc.FeatureServiceStub(channel)
            yield await stub.ApplyFeatureDefinitions(
                rpc.ApplyFeatureDefinitionsRequest(
                    source=source,
                    source_name=str(args.folder)[:1024],
                    validate_only=args.dry_run,
                    prune=args.prune,
                ),
                timeout=max(args.timeout, 120.0),
            )

    apply.set_defaults(run=run_apply)

    get = features.add_parser("get", help="online values for entities")
    get.add_argument("service", nargs="?", help="a feature service (or --feature)")
    get.add_argument("entities", nargs="+", metavar="KEY=VALUE", help="an entity's join keys")
    get.add_argument("--feature", action="append", default=[], help="view:feature (repeatable)")

    async def run_get(args: argparse.Namespace) -> AsyncIterator[Message]:
        entities = list(args.entities)
        service = args.service
        if service and "=" in service:
            entities.insert(0, service)
            service = None
        request = rpc.GetOnlineFeaturesRequest(entity_rows=[_entity_row(e) for e in entities])
        if args.feature:
            request.features.references.extend(args.feature)
        elif service:
            request.feature_service = service
        else:
            raise ValueError("name a feature service or give --feature view:feature")
        async with mesh_channel(args.target, args.api_key or "") as channel:
            stub = features_service_pb2_grpc.FeatureServiceStub(channel)
            yield await stub.GetOnlineFeatures(request, timeout=args.timeout)

    get.set_defaults(run=run_get)


def _value(value: pb.FeatureValue) -> str:
    if value.status != pb.FEATURE_STATUS_PRESENT:
        return pb.FeatureStatus.Name(value.status).removeprefix("FEATURE_STATUS_").lower()
    kind = value.value.WhichOneof("kind")
    if kind == "number_value":
        number = value.value.number_value
        return str(int(number)) if number.is_integer() else repr(number)
    if kind == "bool_value":
        return str(value.value.bool_value).lower()
    return str(getattr(value.value, kind or "string_value"))


def summary(message: Message) -> str | None:
    """One human line for the features' replies (None: not one of them)."""
    if isinstance(message, rpc.ApplyFeatureDefinitionsResponse):
        changed = [c for c in message.changes if c.action != pb.CHANGE_ACTION_UNCHANGED]
        lines = [
            f"{pb.ChangeAction.Name(c.action).removeprefix('CHANGE_ACTION_').lower():9} "
            f"{pb.ObjectType.Name(c.object_type).removeprefix('OBJECT_TYPE_').lower()} {c.name}"
            for c in changed
        ]
        lines.append(
            f"revision {message.revision}: {len(changed)} changed, "
            f"{len(message.changes) - len(changed)} unchanged"
        )
        return "\n".join(lines)
    if isinstance(message, rpc.GetOnlineFeaturesResponse):
        return "\n".join(
            "  ".join(
                f"{n}={_value(v)}" for n, v in zip(message.feature_names, row.values, strict=True)
            )
            for row in message.rows
        )
    return None
