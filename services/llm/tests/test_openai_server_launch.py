"""The ``vllm serve`` launcher's pure parts: its command line, its settings,
the upstream's credential file and the pointer to the version it serves.
No vLLM and no mesh: the server itself is checked against a running mesh."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import pytest
from mlmesh_chassis.registration import RunContext
from mlmesh_llm import openai_registration
from mlmesh_llm.openai_server import (
    POINTER,
    SERVER_MODULE,
    MiB,
    ServerOptions,
    ensure_api_key,
    options_from_env,
    read_api_key,
    read_pointer,
    vllm_argv,
    write_pointer,
)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_command_line_serves_the_folder_under_the_registry_name_on_loopback():
    argv = vllm_argv("/env/python", Path("/cache/tiny-llama/3"), "tiny-llama", 0, ServerOptions())
    assert argv[:3] == ["/env/python", "-m", SERVER_MODULE]
    assert flag(argv, "--model") == "/cache/tiny-llama/3"
    assert flag(argv, "--served-model-name") == "tiny-llama"
    assert flag(argv, "--host") == "127.0.0.1"
    assert flag(argv, "--port") == "0"
    assert flag(argv, "--dtype") == "float32"
    assert flag(argv, "--kv-cache-memory-bytes") == str(64 * MiB)
    assert flag(argv, "--max-num-seqs") == "16"
    assert "--max-model-len" not in argv  # the model's own
    # The key is never on the command line (world-readable in /proc).
    assert not any("api-key" in part or "api_key" in part for part in argv)


def test_settings_size_the_server_and_extra_flags_come_last():
    options = options_from_env(
        {
            "MLMESH_VLLMOPENAI_KV_CACHE_MIB": "32",
            "MLMESH_VLLMOPENAI_MAX_NUM_SEQS": "4",
            "MLMESH_VLLMOPENAI_MAX_MODEL_LEN": "512",
            "MLMESH_VLLMOPENAI_VLLM_ARGS": "--no-enforce-eager --seed 7",
        }
    )
    argv = vllm_argv("py", Path("/m"), "m1", 8123, options)
    assert flag(argv, "--kv-cache-memory-bytes") == str(32 * MiB)
    assert flag(argv, "--max-num-seqs") == "4"
    assert flag(argv, "--max-model-len") == "512"
    assert flag(argv, "--port") == "8123"
    assert argv[-3:] == ["--no-enforce-eager", "--seed", "7"]  # a later flag wins


@pytest.mark.parametrize(
    "env",
    [
        {"MLMESH_VLLMOPENAI_KV_CACHE_MIB": "0"},
        {"MLMESH_VLLMOPENAI_KV_CACHE_MIB": "-1"},
        {"MLMESH_VLLMOPENAI_KV_CACHE_MIB": "1e3"},
        {"MLMESH_VLLMOPENAI_MAX_NUM_SEQS": "99999"},
        {"MLMESH_VLLMOPENAI_MAX_MODEL_LEN": "x" * 100},
        {"MLMESH_VLLMOPENAI_VLLM_ARGS": "--seed 1 " * 1000},
    ],
)
def test_bad_settings_are_refused(env):
    with pytest.raises(ValueError):
        options_from_env(env)


def test_a_port_out_of_range_is_refused():
    with pytest.raises(ValueError):
        vllm_argv("py", Path("/m"), "m1", 70000, ServerOptions())


def test_the_key_file_is_made_once_private_then_reused(tmp_path):
    path = tmp_path / "secrets" / "vllmopenai-api.key"
    key = ensure_api_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert len(key) >= 32 and path.read_text().strip() == key
    assert ensure_api_key(path) == key  # the same key on a restart
    assert read_api_key(path) == key


def test_an_operators_key_is_used_as_written(tmp_path):
    path = tmp_path / "key"
    path.write_text("sk-operator-chosen-key-0123\n")
    path.chmod(0o600)
    assert ensure_api_key(path) == "sk-operator-chosen-key-0123"


@pytest.mark.parametrize(
    ("content", "mode"),
    [
        ("a-perfectly-fine-key-0123456789", 0o644),  # others may read it
        ("a-perfectly-fine-key-0123456789", 0o640),
        ("short", 0o600),
        ("two words-that-are-long-enough", 0o600),
        ("", 0o600),
    ],
)
def test_a_key_file_others_can_read_or_that_holds_no_key_is_refused(tmp_path, content, mode):
    path = tmp_path / "key"
    path.write_text(content)
    path.chmod(mode)
    with pytest.raises(ValueError):
        ensure_api_key(path)


def test_a_link_in_place_of_the_key_file_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("a-perfectly-fine-key-0123456789")
    target.chmod(0o600)
    (tmp_path / "key").symlink_to(target)
    with pytest.raises(ValueError):
        ensure_api_key(tmp_path / "key")


def complete_folder(cache: Path, model: str, version: int) -> Path:
    folder = cache / model / str(version)
    folder.mkdir(parents=True)
    (folder / ".complete").touch()
    return folder


def test_the_pointer_names_a_complete_version(tmp_path):
    folder = complete_folder(tmp_path, "tiny-llama", 3)
    write_pointer(tmp_path, "tiny-llama", 3)
    assert read_pointer(tmp_path) == ("tiny-llama", 3, folder)


@pytest.mark.parametrize(
    "pointer",
    [
        {"model": "tiny-llama", "version": 4},  # not downloaded
        {"model": "../tiny-llama", "version": 3},
        {"model": "tiny-llama", "version": "3"},
        {"model": "tiny-llama", "version": True},
        {"model": "tiny-llama", "version": 0},
        ["tiny-llama", 3],
    ],
)
def test_a_pointer_to_anything_else_is_refused(tmp_path, pointer):
    complete_folder(tmp_path, "tiny-llama", 3)
    (tmp_path / POINTER).write_text(json.dumps(pointer))
    with pytest.raises(RuntimeError):
        read_pointer(tmp_path)


def test_no_pointer_says_to_fetch_first(tmp_path):
    with pytest.raises(RuntimeError, match="fetch"):
        read_pointer(tmp_path)


def test_the_registration_runs_both_steps_from_the_llms_environment(tmp_path, monkeypatch):
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").touch()
    (env / "provisioned.json").write_text("{}")
    monkeypatch.setenv("MLMESH_LLM_HOME", str(env))
    ctx = RunContext(tmp_path / "state", {"registry": 5000, "llm": 5001})
    registration = openai_registration.REGISTRATION
    assert not registration.routed and registration.port_discovery == "listening-socket"
    assert {"registry", "llm"} <= set(registration.after)
    assert registration.prepare is not None
    prepare = list(registration.prepare(ctx))
    assert prepare[:4] == [str(env / "bin" / "python"), "-m", "mlmesh_llm.openai_server", "fetch"]
    assert flag(prepare, "--registry") == "127.0.0.1:5000"
    command = list(registration.command(ctx, 0))
    assert command[3] == "serve" and flag(command, "--port") == "0"
    assert flag(command, "--cache") == flag(prepare, "--cache")
    key_file = Path(flag(command, "--api-key-file"))
    assert key_file == openai_registration.api_key_file(ctx.state)
    assert key_file.parent == ctx.state / "secrets"  # the runner's private folder


def test_without_the_llms_environment_the_registration_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("MLMESH_LLM_HOME", str(tmp_path / "missing"))
    ctx = RunContext(tmp_path, {"registry": 5000})
    with pytest.raises(RuntimeError, match="setup"):
        openai_registration.REGISTRATION.command(ctx, 0)


async def test_readiness_is_vllms_health_answering_200():
    ready = openai_registration.REGISTRATION.ready
    assert ready is not None
    status = b"503 Service Unavailable"

    async def health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readline()
        assert request.startswith(b"GET /health ")
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(health, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        assert await ready(port) is False
        status = b"200 OK"
        assert await ready(port) is True
    assert await ready(port) is False  # nothing listens
