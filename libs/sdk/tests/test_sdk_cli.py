"""The `mlmesh` command: the installed script against a real registry, and
main() in-process for what needs no server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from mlmesh_sdk.cli import main
from sdk_folders import make_folder, tree_of

MLMESH = Path(sys.executable).parent / "mlmesh"


async def mlmesh(target: str, *argv: str) -> tuple[int, list[dict[str, Any]], str]:
    """Runs the installed script with --json; returns its exit code, stdout as
    JSON lines, stderr."""
    env = {**os.environ, "MLMESH_TARGET": target}
    process = await asyncio.create_subprocess_exec(
        str(MLMESH),
        "--json",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    lines = [json.loads(line) for line in out.decode().splitlines()]
    return process.returncode, lines, err.decode()


async def ok(target: str, *argv: str) -> list[dict[str, Any]]:
    code, lines, err = await mlmesh(target, *argv)
    assert code == 0, err
    return lines


async def test_upload_alias_resolve_rollback_download(registry_target: str, tmp_path: Path) -> None:
    first = make_folder(tmp_path / "v1", seed=1, big_bytes=200_000)
    second = make_folder(tmp_path / "v2", seed=2, big_bytes=200_000)
    [v1] = await ok(
        registry_target,
        "upload",
        "cli-model",
        str(first),
        "--description",
        "baseline",
        "--tag",
        "team=risk",
        "--format",
        "sklearn",
        "--metadata",
        "lr=0.01",
        "--metadata",
        "run=abc",
    )
    assert (v1["model"], v1["version"], v1["format"]) == ("cli-model", "1", "sklearn")
    assert v1["tags"] == {"team": "risk"}
    assert v1["lineage"]["runMetadata"] == {"lr": 0.01, "run": "abc"}
    [v2] = await ok(registry_target, "upload", "cli-model", str(second), "--no-create")
    assert v2["version"] == "2"

    [set1] = await ok(registry_target, "alias", "set", "cli-model", "champion", "1")
    assert set1["alias"]["version"] == "1" and set1["event"]["action"] == "ACTION_CREATED"
    [resolved] = await ok(registry_target, "resolve", "cli-model@champion")
    assert (resolved["version"], resolved["sha256"]) == ("1", v1["sha256"])

    await ok(registry_target, "alias", "set", "cli-model", "champion", "2", "--reason", "better")
    [resolved] = await ok(registry_target, "resolve", "cli-model@champion")
    assert resolved["version"] == "2"

    [rolled] = await ok(registry_target, "alias", "rollback", "cli-model", "champion")
    assert rolled["alias"]["version"] == "1"
    [resolved] = await ok(registry_target, "resolve", "cli-model@champion")
    assert resolved["version"] == "1"

    history = await ok(registry_target, "alias", "history", "cli-model", "champion")
    assert [(e["action"], e.get("reason", "")) for e in history] == [
        ("ACTION_CREATED", ""),
        ("ACTION_MOVED", "better"),
        ("ACTION_ROLLED_BACK", ""),
    ]
    assert [v["version"] for v in await ok(registry_target, "versions", "list", "cli-model")] == [
        "2",
        "1",
    ]
    models = await ok(registry_target, "models", "list", "--prefix", "cli-")
    assert [m["name"] for m in models] == ["cli-model"]

    [downloaded] = await ok(registry_target, "download", "cli-model@champion", str(tmp_path / "d"))
    assert downloaded["version"] == "1"
    assert tree_of(tmp_path / "d") == tree_of(first)


async def test_a_failed_call_prints_the_error_and_exits_1(registry_target: str) -> None:
    code, lines, err = await mlmesh(registry_target, "resolve", "nosuchmodel@x")
    assert code == 1
    assert lines == []
    assert err.splitlines()[0] == "error: NOT_FOUND: model 'nosuchmodel' not found"
    assert (
        "reason: MODEL_NOT_FOUND domain: mlmesh.registry name=nosuchmodel resource_type=model"
        in err
    )


async def test_no_create_on_a_missing_model_fails(registry_target: str, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m", big_bytes=100)
    code, _, err = await mlmesh(registry_target, "upload", "never-made", str(folder), "--no-create")
    assert code == 1
    assert err.startswith("error: NOT_FOUND: model 'never-made' not found")


async def test_bad_field_errors_list_the_violations(registry_target: str, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m", big_bytes=100)
    code, _, err = await mlmesh(registry_target, "upload", "tagged", str(folder), "--tag", "Bad=1")
    assert code == 1
    assert err.startswith("error: INVALID_ARGUMENT:")
    assert "reason: INVALID_ARGUMENT" in err
    assert "field: header.tags['Bad']: does not match regex pattern" in err


def test_a_bad_reference_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--target", "127.0.0.1:1", "resolve", "Churn/3"])
    assert exited.value.code == 2
    assert "model name 'Churn'" in capsys.readouterr().err


def test_an_unreachable_registry_is_unavailable(capsys: pytest.CaptureFixture[str]) -> None:
    # port 1 is privileged; nothing listens there
    assert main(["--target", "127.0.0.1:1", "--timeout", "5", "resolve", "churn"]) == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE:")


def test_a_missing_folder_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["--target", "127.0.0.1:1", "upload", "m1", str(tmp_path / "nope")]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_target_and_api_key_default_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlmesh_sdk.cli import build_parser

    monkeypatch.setenv("MLMESH_TARGET", "registry:9000")
    monkeypatch.setenv("MLMESH_API_KEY", "k-1")
    args = build_parser().parse_args(["models", "list"])
    assert (args.target, args.api_key) == ("registry:9000", "k-1")
    monkeypatch.delenv("MLMESH_TARGET")
    monkeypatch.delenv("MLMESH_API_KEY")
    args = build_parser().parse_args(["models", "list"])
    assert (args.target, args.api_key) == ("127.0.0.1:8080", None)


async def test_upload_and_resolve_print_a_short_summary_by_default(
    registry_target: str, tmp_path: Path
) -> None:
    folder = make_folder(tmp_path / "m", big_bytes=100_000)
    env = {**os.environ, "MLMESH_TARGET": registry_target}
    outputs = []
    for argv in (
        ["upload", "summary-model", str(folder), "--format", "sklearn", "--tag", "team=risk"],
        ["alias", "set", "summary-model", "champion", "1"],
        ["alias", "set", "summary-model", "champion", "1"],
        ["resolve", "summary-model@champion"],
    ):
        process = await asyncio.create_subprocess_exec(
            str(MLMESH), *argv, stdout=asyncio.subprocess.PIPE, env=env
        )
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0
        outputs.append(out.decode())
    upload, created, unchanged, resolved = outputs
    for out in (upload, resolved):
        assert len(out.splitlines()) == 1  # not the environment lock
        assert out.startswith("summary-model/1  sha256:")
        assert "format=sklearn" in out and "tags=team=risk" in out
        assert " packages" in out and "==" not in out
    assert "aliases=champion" in resolved
    assert created == "summary-model@champion -> version 1 (was unset)\n"
    assert unchanged == "summary-model@champion -> version 1 (unchanged)\n"
