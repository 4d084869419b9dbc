"""`mlmesh` commands for the gateway: keys, usage, and trying a model.

    mlmesh keys create app --scope GENERATE --model 'tiny-*' --tokens-per-minute 20000
    mlmesh keys list | rotate ID [--grace 3600] | revoke ID [--reason ...]
    mlmesh usage [--key ID] [--hours 24] [--by hour|day|month]
    mlmesh generate tiny-llama@champion "The model serves" --max-tokens 16
    mlmesh embed minilm@champion "a sentence" "another one"
    mlmesh infer digits@champion --input 'pixels=[[0, 0, 5, 13, ...]]' | --input pixels=@x.npy

Every command goes through one channel to ``--target`` (Envoy) with
``--api-key``; results print as one line each (``--json``: the records).
`generate` prints the text as it streams, then one line of usage; `infer`
a line per output tensor (under ``--json`` its elements are typed values, not
base64 bytes).
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from mlmesh.gateway.v1 import gateway_pb2 as pb
from mlmesh.gateway.v1 import gateway_service_pb2 as rpc
from mlmesh.gateway.v1 import (
    gateway_service_pb2_grpc,
    key_service_pb2,
    key_service_pb2_grpc,
    usage_service_pb2,
    usage_service_pb2_grpc,
)

from mlmesh_sdk.channel import mesh_channel
from mlmesh_sdk.pages import every_item
from mlmesh_sdk.reference import parse_reference
from mlmesh_sdk.tensors import elements, parse_input, with_values

Subcommands = Any  # argparse's _SubParsersAction is private
SCOPES = [
    value.name.removeprefix("PLATFORM_SERVICE_")
    for value in pb.PlatformService.DESCRIPTOR.values
    if value.number
]
GRANULARITY = {
    "hour": pb.USAGE_GRANULARITY_HOUR,
    "day": pb.USAGE_GRANULARITY_DAY,
    "month": pb.USAGE_GRANULARITY_MONTH,
}
PERIODS = {"day": pb.QUOTA_PERIOD_DAY, "week": pb.QUOTA_PERIOD_WEEK, "month": pb.QUOTA_PERIOD_MONTH}


def _channel(args: argparse.Namespace) -> grpc.aio.Channel:
    return mesh_channel(args.target, args.api_key or "")


def _every(call: Any, request: Any, field: str, args: argparse.Namespace) -> AsyncIterator[Any]:
    return every_item(lambda page: call(page, timeout=args.timeout), request, field)


def add_keys(commands: Subcommands) -> None:
    keys = commands.add_parser("keys", help="API keys (admin)").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = keys.add_parser("create", help="a new key; its secret is printed once")
    create.add_argument("name", help="display name")
    create.add_argument(
        "--scope",
        action="append",
        choices=SCOPES,
        default=[],
        help="a service it may call (repeatable; default GENERATE, INFER, EMBED)",
    )
    create.add_argument("--model", action="append", default=[], help="model pattern, e.g. 'tiny-*'")
    create.add_argument("--tokens-per-minute", type=int, default=0)
    create.add_argument("--requests-per-minute", type=int, default=0)
    create.add_argument("--max-streams", type=int, default=0, help="concurrent Generate streams")
    create.add_argument("--token-quota", type=int, default=0)
    create.add_argument("--quota-period", choices=sorted(PERIODS), default="day")

    async def run_create(args: argparse.Namespace) -> AsyncIterator[Message]:
        key = pb.Key(
            display_name=args.name,
            scopes=pb.KeyScopes(
                services=[f"PLATFORM_SERVICE_{scope}" for scope in args.scope],
                model_patterns=args.model,
            ),
            limits=pb.KeyLimits(
                tokens_per_minute=args.tokens_per_minute,
                requests_per_minute=args.requests_per_minute,
                max_concurrent_streams=args.max_streams,
                token_quota=args.token_quota,
                token_quota_period=(
                    PERIODS[args.quota_period] if args.token_quota else pb.QUOTA_PERIOD_UNSPECIFIED
                ),
            ),
        )
        async with _channel(args) as channel:
            stub = key_service_pb2_grpc.KeyServiceStub(channel)
            yield await stub.CreateKey(
                key_service_pb2.CreateKeyRequest(key=key), timeout=args.timeout
            )

    create.set_defaults(run=run_create)

    ls = keys.add_parser("list", help="every key (no secrets)")

    async def run_list(args: argparse.Namespace) -> AsyncIterator[Message]:
        async with _channel(args) as channel:
            stub = key_service_pb2_grpc.KeyServiceStub(channel)
            async for key in _every(stub.ListKeys, key_service_pb2.ListKeysRequest(), "keys", args):
                yield key

    ls.set_defaults(run=run_list)

    rotate = keys.add_parser("rotate", help="a new secret; the old one works for --grace")
    rotate.add_argument("id")
    rotate.add_argument("--grace", type=int, default=3600, help="seconds (default 1 h)")

    async def run_rotate(args: argparse.Namespace) -> AsyncIterator[Message]:
        request = key_service_pb2.RotateKeyRequest(
            id=args.id, grace_period=duration_pb2.Duration(seconds=args.grace)
        )
        async with _channel(args) as channel:
            stub = key_service_pb2_grpc.KeyServiceStub(channel)
            yield await stub.RotateKey(request, timeout=args.timeout)

    rotate.set_defaults(run=run_rotate)

    revoke = keys.add_parser("revoke", help="stop a key everywhere (open streams end)")
    revoke.add_argument("id")
    revoke.add_argument("--reason", default="")

    async def run_revoke(args: argparse.Namespace) -> AsyncIterator[Message]:
        request = key_service_pb2.RevokeKeyRequest(id=args.id, reason=args.reason)
        async with _channel(args) as channel:
            stub = key_service_pb2_grpc.KeyServiceStub(channel)
            yield (await stub.RevokeKey(request, timeout=args.timeout)).key

    revoke.set_defaults(run=run_revoke)


def add_usage(commands: Subcommands) -> None:
    usage = commands.add_parser("usage", help="usage from the ledger (admin: any key)")
    usage.add_argument("--key", action="append", default=[], help="key id (repeatable)")
    usage.add_argument("--model", action="append", default=[])
    usage.add_argument("--hours", type=float, default=24.0, help="how far back (default 24)")
    usage.add_argument("--by", choices=sorted(GRANULARITY), default="", help="buckets")

    async def run(args: argparse.Namespace) -> AsyncIterator[Message]:
        now = dt.datetime.now(dt.UTC)
        request = usage_service_pb2.GetUsageRequest(
            key_ids=args.key,
            models=args.model,
            granularity=GRANULARITY.get(args.by, pb.USAGE_GRANULARITY_UNSPECIFIED),
        )
        request.start_time.FromDatetime(now - dt.timedelta(hours=args.hours))
        request.end_time.FromDatetime(now + dt.timedelta(seconds=1))
        async with _channel(args) as channel:
            stub = usage_service_pb2_grpc.UsageServiceStub(channel)
            async for bucket in _every(stub.GetUsage, request, "buckets", args):
                yield bucket

    usage.set_defaults(run=run)


def add_generate(commands: Subcommands) -> None:
    generate = commands.add_parser("generate", help="stream a completion through the gateway")
    generate.add_argument("reference", metavar="REF", help="e.g. tiny-llama@champion")
    generate.add_argument("prompt")
    generate.add_argument("--max-tokens", type=int, help="default: the mesh's (256)")
    generate.add_argument("--temperature", type=float, help="0 is greedy (default 1)")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--region", default="")

    async def run(args: argparse.Namespace) -> AsyncIterator[Message]:
        request = rpc.GenerateRequest(
            region=args.region,
            model=parse_reference(args.reference),
            text=args.prompt,
            sampling=pb.SamplingParams(
                **{
                    name: getattr(args, name)
                    for name in ("max_tokens", "temperature", "seed")
                    if getattr(args, name) is not None
                }
            ),
        )
        async with _channel(args) as channel:
            stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
            async for chunk in stub.Generate(request, timeout=args.timeout):
                yield chunk

    generate.set_defaults(run=run)


def add_embed(commands: Subcommands) -> None:
    embed = commands.add_parser("embed", help="embed texts through the gateway")
    embed.add_argument("reference", metavar="REF", help="e.g. minilm@champion")
    embed.add_argument("texts", nargs="+")
    embed.add_argument("--normalize", action="store_true")

    async def run(args: argparse.Namespace) -> AsyncIterator[Message]:
        request = rpc.EmbedRequest(
            model=parse_reference(args.reference), texts=args.texts, normalize=args.normalize
        )
        async with _channel(args) as channel:
            stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
            yield await stub.Embed(request, timeout=args.timeout)

    embed.set_defaults(run=run)


def _input(text: str) -> pb.InferTensor:
    try:
        return parse_input(text)
    except (ValueError, OSError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_infer(commands: Subcommands) -> None:
    infer = commands.add_parser("infer", help="run a Triton model through the gateway")
    infer.add_argument("reference", metavar="REF", help="e.g. digits@champion")
    infer.add_argument(
        "--input",
        action="append",
        type=_input,
        required=True,
        metavar="NAME[:TYPE]=VALUE",
        help="an input tensor (repeatable): JSON (numbers are FP32 unless a TYPE such as "
        "INT64 follows the name), or @FILE.json / @FILE.npy",
    )
    infer.add_argument(
        "--output", action="append", default=[], metavar="NAME", help="only these outputs"
    )
    infer.add_argument("--id", default="", help="request id echoed back")

    async def run(args: argparse.Namespace) -> AsyncIterator[Message]:
        request = rpc.InferRequest(
            model=parse_reference(args.reference),
            id=args.id,
            inputs=args.input,
            output_names=args.output,
        )
        async with _channel(args) as channel:
            stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
            response = await stub.Infer(request, timeout=args.timeout)
        if args.json:  # numbers jq can read, not base64
            outputs = [with_values(tensor) for tensor in response.outputs]
            del response.outputs[:]
            response.outputs.extend(outputs)
        yield response

    infer.set_defaults(run=run)


PREVIEW = 6  # elements shown per output tensor


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


def _tensor_line(tensor: pb.InferTensor) -> str:
    values = elements(tensor)
    shape = "x".join(map(str, tensor.shape)) or "scalar"
    line = f"  {tensor.name}  {tensor.datatype} {shape}  "
    line += " ".join(_number(v) for v in values[:PREVIEW])
    if len(values) > PREVIEW:
        line += f" ... ({len(values)} values)"
    numeric = tensor.datatype not in ("BYTES", "BOOL")
    if numeric and len(tensor.shape) == 2 and tensor.shape[1] > 1 and values:
        width = tensor.shape[1]
        rows = [values[i : i + width] for i in range(0, len(values), width)]
        argmax = [str(max(range(width), key=row.__getitem__)) for row in rows[: PREVIEW * 4]]
        line += (
            "\n    argmax by row: " + " ".join(argmax) + (" ..." if len(rows) > PREVIEW * 4 else "")
        )
    return line


def _key_line(key: pb.Key) -> str:
    state = pb.KeyState.Name(key.state).removeprefix("KEY_STATE_").lower()
    scopes = ",".join(
        pb.PlatformService.Name(s).removeprefix("PLATFORM_SERVICE_") for s in key.scopes.services
    )
    parts = [key.id, state, repr(key.display_name), f"scopes={scopes or '-'}"]
    if key.scopes.model_patterns:
        parts.append("models=" + ",".join(key.scopes.model_patterns))
    limits = key.limits
    for name in ("tokens_per_minute", "requests_per_minute", "token_quota"):
        if getattr(limits, name):
            parts.append(f"{name}={getattr(limits, name)}")
    return "  ".join(parts)


def summary(message: Message) -> str | None:
    """One line for a gateway result; None for a message this module does
    not know. A Generate chunk is its text, written as it arrives."""
    if isinstance(message, pb.Key):
        return _key_line(message)
    if isinstance(message, key_service_pb2.CreateKeyResponse | key_service_pb2.RotateKeyResponse):
        return f"{_key_line(message.key)}\nsecret (shown once): {message.secret}"
    if isinstance(message, pb.UsageBucket):
        service = pb.PlatformService.Name(message.service).removeprefix("PLATFORM_SERVICE_")
        usage = message.usage
        return (
            f"{message.start_time.ToDatetime():%Y-%m-%d %H:%M}  {message.key_id}  "
            f"{service.lower()}  {message.model or '-'}  requests={message.request_count}  "
            f"errors={message.error_count}  tokens={usage.prompt_tokens}+"
            f"{usage.completion_tokens}  items={usage.input_items}"
        )
    if isinstance(message, rpc.EmbedResponse):
        return (
            f"{message.model.model}/{message.model.version}  {len(message.embeddings)} vectors "
            f"of {message.dimension}  tokens={message.usage.prompt_tokens}"
        )
    if isinstance(message, rpc.InferResponse):
        outputs = len(message.outputs)
        head = (
            f"{message.model.model}/{message.model.version}  {outputs} "
            f"output{'s' if outputs != 1 else ''}  items={message.usage.input_items}"
        )
        return "\n".join([head, *map(_tensor_line, message.outputs)])
    if isinstance(message, rpc.GenerateResponse):
        text = message.text
        if message.finish_reason:
            reason = pb.FinishReason.Name(message.finish_reason).removeprefix("FINISH_REASON_")
            text += (
                f"\n[{message.usage.prompt_tokens} prompt + {message.usage.completion_tokens} "
                f"completion tokens, {reason.lower()}, region {message.region}]\n"
            )
        return text
    return None
