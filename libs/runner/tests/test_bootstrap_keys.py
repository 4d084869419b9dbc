"""The bootstrap keys as Compose's init step makes them (`python -m
mlmesh_runner.keys`), the key settings the runner and the Compose generator
share, and the database password file."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
from mlmesh_chassis.auth import read_bootstrap_keys
from mlmesh_chassis.registration import SERVICE_KEY_NAME
from mlmesh_metering.metering import MeteringSettings, unmetered_key_ids
from mlmesh_runner.catalog import CATALOG, KEY_DIRECTORY_SERVICE
from mlmesh_runner.keys import ensure_bootstrap_keys, ensure_database_password, key_env, keyed, main


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_main_makes_every_keyed_service_a_key_once_and_prints_no_secret(tmp_path, capsys):
    admin = tmp_path / "admin" / "admin.key"
    main(
        [
            "--state",
            str(tmp_path),
            "--admin-file",
            str(admin),
            "--database-dir",
            str(tmp_path / "db"),
        ]
    )
    names = [name for name, _ in keyed(CATALOG)]
    assert names and KEY_DIRECTORY_SERVICE in names
    files = {name: tmp_path / "secrets" / f"{name}.key" for name in names}
    secrets = {name: path.read_text().strip() for name, path in files.items()}
    for path in [
        *files.values(),
        admin,
        tmp_path / "db" / "pgpass",
        tmp_path / "db" / "db.password",
    ]:
        assert _mode(path) == 0o600, path
    assert not (tmp_path / "admin.key").exists()  # --admin-file said where
    out = capsys.readouterr().out
    for secret in [*secrets.values(), admin.read_text().strip()]:
        assert secret not in out
    # A second run keeps every secret (the volumes persist across `up`).
    main(
        [
            "--state",
            str(tmp_path),
            "--admin-file",
            str(admin),
            "--database-dir",
            str(tmp_path / "db"),
        ]
    )
    assert {n: p.read_text().strip() for n, p in files.items()} == secrets
    # The directory names each service's key so billed_by resolves by name.
    entries = read_bootstrap_keys(tmp_path / "secrets" / "bootstrap-keys.json")
    by_name = {e.key.display_name: e.key.id for e in entries}
    for name, secret in secrets.items():
        assert by_name[SERVICE_KEY_NAME.format(name)] == secret.split("_")[1]


def test_unmetered_services_resolve_through_the_bootstrap_keys(tmp_path):
    keys = ensure_bootstrap_keys(tmp_path, [("gateway", ["LLM"]), ("llm", ["KEY_DIRECTORY"])])
    settings = MeteringSettings(
        bootstrap_keys_file=keys.directory_file,
        unmetered_services="gateway",
        unmetered_key_ids="abc",
    )
    assert unmetered_key_ids(settings) == {keys.service_ids["gateway"], "abc"}
    with pytest.raises(ValueError, match="no key"):
        unmetered_key_ids(
            MeteringSettings(bootstrap_keys_file=keys.directory_file, unmetered_services="nope")
        )
    with pytest.raises(ValueError, match="bootstrap_keys_file"):
        unmetered_key_ids(MeteringSettings(unmetered_services="gateway"))


def test_key_env_names_files_and_the_key_directory_never_a_secret(tmp_path):
    by_name = {spec.name: spec for spec in CATALOG}
    billed = next(spec for spec in CATALOG if spec.billed_by)
    env = key_env(billed, tmp_path, KEY_DIRECTORY_SERVICE, {"TARGET": "127.0.0.1:1"})
    prefix = billed.env_prefix
    assert env[f"{prefix}SERVICE_KEY_FILE"] == str(tmp_path / f"{billed.name}.key")
    assert env[f"{prefix}BOOTSTRAP_KEYS_FILE"] == str(tmp_path / "bootstrap-keys.json")
    assert env[f"{prefix}UNMETERED_SERVICES"] == ",".join(billed.billed_by)
    assert env[f"{prefix}KEYS_TARGET"] == "127.0.0.1:1"
    assert KEY_DIRECTORY_SERVICE is not None
    own = key_env(
        by_name[KEY_DIRECTORY_SERVICE],
        tmp_path,
        KEY_DIRECTORY_SERVICE,
        {"TARGET": "x:1"},
        tmp_path / "s",
    )
    prefix = by_name[KEY_DIRECTORY_SERVICE].env_prefix
    assert own[f"{prefix}LOCAL_SOCKET"] == str(tmp_path / "s")
    assert f"{prefix}KEYS_TARGET" not in own


def test_database_password_is_made_once_and_checked(tmp_path):
    pgpass = ensure_database_password(tmp_path, "mlmesh")
    password = (tmp_path / "db.password").read_text().strip()
    assert len(password) >= 24 and ":" not in password and "\\" not in password
    assert pgpass.read_text().strip() == f"*:*:*:mlmesh:{password}"
    ensure_database_password(tmp_path, "mlmesh")
    assert (tmp_path / "db.password").read_text().strip() == password
    with pytest.raises(ValueError):
        ensure_database_password(tmp_path / "other", "x:y")


def test_tokens_are_made_once_private_and_named_safely(tmp_path):
    main(["--state", str(tmp_path), "--token", "ray-token"])
    token = tmp_path / "secrets" / "ray-token"
    value = token.read_text().strip()
    assert len(value) == 64 and _mode(token) == 0o600
    main(["--state", str(tmp_path), "--token", "ray-token"])
    assert token.read_text().strip() == value
    for hostile in (
        "../escape",
        "a/b",
        "",
        "X",
        ".key",
        "a..b",
        "gateway.key",
        "bootstrap-keys.json",
    ):
        with pytest.raises(SystemExit):
            main(["--state", str(tmp_path), "--token", hostile])
    assert not (tmp_path / "escape").exists()
    assert not (tmp_path / "secrets" / "bootstrap-keys.tmp").exists()


def test_token_files_go_where_they_are_asked_for(tmp_path):
    """Compose gives Ray's token and vLLM's API key volumes of their own."""
    ray = tmp_path / "raytoken" / "ray-token"
    vllm = tmp_path / "vllmkey" / "vllmopenai-api.key"
    state = tmp_path / "state"
    main(["--state", str(state), "--token-file", str(ray), "--token-file", str(vllm)])
    for path in (ray, vllm):
        assert re.fullmatch(r"[0-9a-f]{64}", path.read_text().strip())
        assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    assert not (state / "secrets" / ray.name).exists()
    value = vllm.read_text()
    main(["--state", str(state), "--token-file", str(vllm)])
    assert vllm.read_text() == value
    # vLLM's launcher takes the file as it is (never rewrites it).
    openai_server = pytest.importorskip("mlmesh_llm.openai_server")
    assert openai_server.ensure_api_key(vllm) == value.strip()
    for hostile in (tmp_path / "x" / "gateway.key", tmp_path / "x" / ".hidden", tmp_path / ".."):
        with pytest.raises(SystemExit):
            main(["--state", str(state), "--token-file", str(hostile)])
    assert not (tmp_path / "x").exists()


def test_a_service_key_goes_where_it_is_asked_for(tmp_path):
    """Compose keeps batch's key (its Ray nodes read it too) in a volume of
    its own; the bootstrap directory still holds it."""
    batch = tmp_path / "batchkey" / "batch.key"
    main(["--state", str(tmp_path), "--key-file", f"batch={batch}"])
    secret = batch.read_text().strip()
    assert _mode(batch) == 0o600 and _mode(batch.parent) == 0o700
    assert not (tmp_path / "secrets" / "batch.key").exists()
    assert (tmp_path / "secrets" / "gateway.key").exists()
    entries = read_bootstrap_keys(tmp_path / "secrets" / "bootstrap-keys.json")
    assert secret.split("_")[1] in [entry.key.id for entry in entries]
    main(["--state", str(tmp_path), "--key-file", f"batch={batch}"])
    assert batch.read_text().strip() == secret
    hostile = [
        "batch",
        "batch=",
        f"nosuch={tmp_path / 'x' / 'nosuch.key'}",
        f"batch={tmp_path / 'x' / 'gateway.key'}",
    ]
    for given in hostile:
        with pytest.raises(SystemExit):
            main(["--state", str(tmp_path / "other"), "--key-file", given])
    assert not (tmp_path / "x").exists() and not (tmp_path / "other").exists()
