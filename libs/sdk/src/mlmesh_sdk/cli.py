"""The `mlmesh` command line.

Every command prints one short line per result (a version's lineage, with its
environment lock of hundreds of packages, is summed up in a few words);
``--json`` (before or after the command) prints the full records instead, as
JSON (the proto3 JSON mapping), one object per line, so the output pipes into
`jq`. Uploads and downloads draw a progress bar on stderr when it is a
terminal and --json is not given (``--progress`` / ``--no-progress`` decide
otherwise). A failed call prints `error: CODE: message` and the ErrorInfo to
stderr and exits 1; bad usage exits 2.

A command is one function that adds its parser and sets ``run`` to an async
generator ``run(args) -> AsyncIterator[Message]``; COMMANDS lists them. A
command for another service (keys, features, batch) opens its own client from
``args.target`` / ``args.api_key`` the way ``_registry`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from mlmesh.registry.v1 import model_pb2 as pb
from mlmesh.registry.v1 import registry_service_pb2 as rpc
from mlmesh_chassis.errors import details_of

from mlmesh_sdk import cli_batch, cli_features, cli_gateway
from mlmesh_sdk.progress import Progress, ProgressBar, human_bytes
from mlmesh_sdk.reference import parse_reference
from mlmesh_sdk.registry import DownloadError, RegistryClient

Subcommands = Any  # argparse's _SubParsersAction is private
Run = Callable[[argparse.Namespace], AsyncIterator[Message]]


# argument types


def _reference(text: str) -> str:
    try:
        parse_reference(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _json_value(text: str) -> Any:
    """`--metadata lr=0.01` stores a number; a value that is not JSON, a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _registry(args: argparse.Namespace) -> RegistryClient:
    return RegistryClient(args.target, args.api_key, timeout=args.timeout)


def _progress(args: argparse.Namespace, label: str) -> Progress | None:
    """A progress bar on stderr: when asked (--progress), else when stderr is
    a terminal and the output is not --json."""
    show = args.progress
    if show is None:
        show = not args.json and sys.stderr.isatty()
    return ProgressBar(label, sys.stderr) if show else None


# commands


def add_models(commands: Subcommands) -> None:
    models = commands.add_parser("models", help="models").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    ls = models.add_parser("list", help="list models by name")
    ls.add_argument("--prefix", default="", help="only names starting with this")
    ls.add_argument("--tag", action="append", type=_key_value, default=[], metavar="K=V")

    async def run(args: argparse.Namespace) -> AsyncIterator[Message]:
        async with _registry(args) as registry:
            async for model in registry.list_models(name_prefix=args.prefix, tags=dict(args.tag)):
                yield model

    ls.set_defaults(run=run)


def add_versions(commands: Subcommands) -> None:
    versions = commands.add_parser("versions", help="model versions").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    ls = versions.add_parser("list", help="list a model's versions, newest first")
    ls.add_argument("model")
    ls.add_argument("--tag", action="append", type=_key_value, default=[], metavar="K=V")

    async def run(args: argparse.Namespace) -> AsyncIterator[Message]:
        async with _registry(args) as registry:
            async for version in registry.list_versions(args.model, tags=dict(args.tag)):
                yield version

    ls.set_defaults(run=run)


def add_upload(commands: Subcommands) -> None:
    upload = commands.add_parser("upload", help="upload a folder as a model's next version")
    upload.add_argument("model")
    upload.add_argument("folder")
    upload.add_argument("--description", default="")
    upload.add_argument("--tag", action="append", type=_key_value, default=[], metavar="K=V")
    upload.add_argument("--format", default="", help="what serves it, e.g. sklearn, triton")
    upload.add_argument(
        "--metadata",
        action="append",
        type=_key_value,
        default=[],
        metavar="K=V",
        help="run metadata; JSON values (numbers, true, [..]) are kept typed",
    )
    upload.add_argument("--source", default=None, help="source folder for the lineage")
    upload.add_argument("--feature-service", default="")
    upload.add_argument(
        "--no-create", action="store_true", help="fail if the model does not exist yet"
    )

    async def run(args: argparse.Namespace) -> AsyncIterator[Message]:
        async with _registry(args) as registry:
            yield await registry.upload_folder(
                args.model,
                args.folder,
                description=args.description,
                tags=dict(args.tag),
                format=args.format,
                run_metadata={k: _json_value(v) for k, v in args.metadata},
                feature_service=args.feature_service,
                source_folder=args.source,
                create_model=not args.no_create,
                progress=_progress(args, f"upload {args.model}"),
            )

    upload.set_defaults(run=run)


def add_download(commands: Subcommands) -> None:
    download = commands.add_parser("download", help="download a version's folder")
    download.add_argument("reference", type=_reference, metavar="REF")
    download.add_argument("dest_dir")

    async def run(args: argparse.Namespace) -> AsyncIterator[Message]:
        async with _registry(args) as registry:
            yield await registry.download_folder(
                args.reference,
                args.dest_dir,
                progress=_progress(args, f"download {args.reference}"),
            )

    download.set_defaults(run=run)


def add_resolve(commands: Subcommands) -> None:
    resolve = commands.add_parser("resolve", help="the version NAME, NAME/N or NAME@ALIAS is")
    resolve.add_argument("reference", type=_reference, metavar="REF")

    async def run(args: argparse.Namespace) -> AsyncIterator[Message]:
        async with _registry(args) as registry:
            yield await registry.resolve(args.reference)

    resolve.set_defaults(run=run)


def add_alias(commands: Subcommands) -> None:
    alias = commands.add_parser("alias", help="aliases").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    set_ = alias.add_parser("set", help="point an alias at a version")
    set_.add_argument("model")
    set_.add_argument("alias")
    set_.add_argument("version", type=int)
    set_.add_argument("--reason", default="")

    async def run_set(args: argparse.Namespace) -> AsyncIterator[Message]:
        async with _registry(args) as registry:
            yield await registry.set_alias(args.model, args.alias, args.version, args.reason)

    set_.set_defaults(run=run_set)

    rollback = alias.add_parser("rollback", help="move an alias back to its previous version")
    rollback.add_argument("model")
    rollback.add_argument("alias")
    rollback.add_argument("--reason", default="")

    async def run_rollback(args: argparse.Namespace) -> AsyncIterator[Message]:
        async with _registry(args) as registry:
            yield await registry.rollback_alias(args.model, args.alias, args.reason)

    rollback.set_defaults(run=run_rollback)

    history = alias.add_parser("history", help="alias history, oldest first")
    history.add_argument("model")
    history.add_argument("alias", nargs="?", default="")

    async def run_history(args: argparse.Namespace) -> AsyncIterator[Message]:
        async with _registry(args) as registry:
            async for event in registry.alias_history(args.model, args.alias):
                yield event

    history.set_defaults(run=run_history)


COMMANDS: tuple[Callable[[Subcommands], None], ...] = (
    add_models,
    add_versions,
    add_upload,
    add_download,
    add_resolve,
    add_alias,
    cli_gateway.add_keys,
    cli_gateway.add_usage,
    cli_gateway.add_generate,
    cli_gateway.add_embed,
    cli_gateway.add_infer,
    cli_features.add_features,
    cli_batch.add_batch,
)


def _output_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        default=default,
        help="print full records as JSON, one object per line (default: a short summary)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=default if default is argparse.SUPPRESS else None,
        help="a progress line on stderr for uploads, downloads and batch jobs (default: on a "
        "terminal, without --json)",
    )


def _commands_of(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of every runnable command under ``parser`` (the leaves)."""
    # argparse has no public way to list a parser's subcommands.
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        return [parser]
    return [leaf for a in actions for sub in a.choices.values() for leaf in _commands_of(sub)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlmesh",
        description="The mlmesh command line (a line per result; --json for full records).",
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("MLMESH_TARGET", "127.0.0.1:8080"),
        help="host:port of the gateway or service (env MLMESH_TARGET)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("MLMESH_API_KEY"),
        help="sent as `authorization: Bearer KEY` (env MLMESH_API_KEY)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    _output_options(parser, default=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    # The same options after the command (`mlmesh keys list --json`); SUPPRESS
    # keeps a leaf from overwriting what was given before the command.
    for command in _commands_of(parser):
        _output_options(command, default=argparse.SUPPRESS)
    return parser


def _print_rpc_error(error: grpc.RpcError) -> None:
    details = details_of(error)
    lines = [f"error: {details.code.name}: {details.message}"]
    if details.error_info is not None:
        info = details.error_info
        fields = " ".join(f"{k}={v}" for k, v in sorted(info.metadata.items()))
        lines.append(f"reason: {info.reason} domain: {info.domain} {fields}".rstrip())
    if details.bad_request is not None:
        lines += [
            f"field: {v.field}: {v.description}" for v in details.bad_request.field_violations
        ]
    if details.quota_failure is not None:
        lines += [f"quota: {v.subject}: {v.description}" for v in details.quota_failure.violations]
    if details.retry_info is not None and details.retry_info.HasField("retry_delay"):
        delay = details.retry_info.retry_delay.ToTimedelta().total_seconds()
        lines.append(f"retry after: {delay:g} s")
    print("\n".join(lines), file=sys.stderr)


def _labels(tags: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(tags.items()))


def _version_line(version: pb.ModelVersion) -> str:
    parts = [
        f"{version.model}/{version.version}",
        f"sha256:{version.sha256[:12]}",
        human_bytes(version.size_bytes),
    ]
    if version.format:
        parts.append(f"format={version.format}")
    if version.aliases:
        parts.append("aliases=" + ",".join(version.aliases))
    if version.tags:
        parts.append(f"tags={_labels(version.tags)}")
    lineage = version.lineage
    packages = len(lineage.environment_lock.splitlines())
    facts = [f"{packages} packages"] if packages else []
    if lineage.source.files:
        facts.append(f"{len(lineage.source.files)} source files")
    if lineage.source.revision:
        facts.append(f"revision {lineage.source.revision[:12]}")
    if facts:
        parts.append("lineage: " + ", ".join(facts))
    return "  ".join(parts)


def _event_line(event: pb.AliasEvent) -> str:
    action = pb.AliasEvent.Action.Name(event.action).removeprefix("ACTION_").lower()
    line = f"#{event.sequence} {event.model}@{event.alias} {action} {event.from_version} -> "
    line += f"{event.to_version}"
    if event.actor:
        line += f" by {event.actor}"
    return line + (f": {event.reason}" if event.reason else "")


def summary(message: Message) -> str:
    """One line for a result (what the commands print without --json)."""
    line = (
        cli_gateway.summary(message) or cli_features.summary(message) or cli_batch.summary(message)
    )
    if line is not None:
        return line
    if isinstance(message, pb.ModelVersion):
        return _version_line(message)
    if isinstance(message, pb.Model):
        line = f"{message.name}  latest version {message.latest_version}"
        return line + (f"  tags={_labels(message.tags)}" if message.tags else "")
    if isinstance(message, pb.AliasEvent):
        return _event_line(message)
    if isinstance(message, rpc.SetAliasResponse | rpc.RollbackAliasResponse):
        alias = message.alias
        line = f"{alias.model}@{alias.alias} -> version {alias.version}"
        if not message.HasField("event"):
            return line + " (unchanged)"
        return line + f" (was {message.event.from_version or 'unset'})"
    return json.dumps(MessageToDict(message))


async def _run(args: argparse.Namespace) -> None:
    run: Run = args.run
    async for message in run(args):
        if args.json:
            print(json.dumps(MessageToDict(message)), flush=True)
        elif isinstance(message, cli_gateway.rpc.GenerateResponse):
            sys.stdout.write(summary(message))  # the text as it streams
            sys.stdout.flush()
        else:
            print(summary(message), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns the exit status (0, 1 on failure, 2 on bad usage)."""
    args = build_parser().parse_args(argv)
    try:
        asyncio.run(_run(args))
    except grpc.RpcError as error:
        _print_rpc_error(error)
        return 1
    except (DownloadError, ValueError, OSError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
