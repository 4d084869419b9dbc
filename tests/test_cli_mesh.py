"""The `mlmesh` command line against the real mesh, through Envoy: keys,
usage, generate, embed and infer, as a person would type them."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from mlmesh_triton.build import digits_training_data

MLMESH = Path(sys.executable).parent / "mlmesh"


async def mlmesh(mesh, key: str, *argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(MLMESH),
        "--target",
        mesh.address,
        "--api-key",
        key,
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "MLMESH_API_KEY"},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


async def test_keys_generate_embed_usage_and_revoke_from_the_command_line(full_mesh):
    code, out, err = await mlmesh(
        full_mesh,
        full_mesh.api_key,
        "--json",
        "keys",
        "create",
        "cli app",
        "--scope",
        "GENERATE",
        "--model",
        "tiny-*",
        "--tokens-per-minute",
        "5000",
    )
    assert code == 0, err
    created = json.loads(out)
    key_id, secret = created["key"]["id"], created["secret"]
    assert created["key"]["limits"]["tokensPerMinute"] == "5000"

    # the summary prints the text as it streams, then one line of usage
    code, out, err = await mlmesh(
        full_mesh, secret, "generate", "tiny-llama@champion", "The model", "--max-tokens", "4"
    )
    assert code == 0, err
    text, usage = out.rstrip("\n").rsplit("\n", 1)
    assert text
    assert usage.startswith("[") and "+ 4 completion tokens, length" in usage

    # the key may not embed (its scopes): a clear error, exit 1
    code, out, err = await mlmesh(full_mesh, secret, "embed", "minilm@champion", "a", "b")
    assert code == 1 and out == ""
    assert err.startswith("error: PERMISSION_DENIED:"), err
    code, out, err = await mlmesh(
        full_mesh, full_mesh.api_key, "embed", "minilm@champion", "a sentence", "another"
    )
    assert code == 0, err
    assert "2 vectors of 384" in out

    # usage reaches the ledger off the request path
    deadline = time.monotonic() + 10
    while True:
        code, out, err = await mlmesh(full_mesh, full_mesh.api_key, "usage", "--key", key_id)
        assert code == 0, err
        if "generate" in out:
            break
        assert time.monotonic() < deadline, out
        await asyncio.sleep(0.3)
    assert f"{key_id}  generate  tiny-llama  requests=1  errors=0" in out

    code, out, err = await mlmesh(full_mesh, full_mesh.api_key, "keys", "list")
    assert code == 0, err
    assert any(line.startswith(f"{key_id}  active  'cli app'") for line in out.splitlines())

    code, out, err = await mlmesh(
        full_mesh, full_mesh.api_key, "keys", "rotate", key_id, "--grace", "60"
    )
    assert code == 0, err
    rotated = out.splitlines()[-1].removeprefix("secret (shown once): ")
    assert rotated.startswith(f"mlm_{key_id}_") and rotated != secret

    code, out, err = await mlmesh(full_mesh, full_mesh.api_key, "keys", "revoke", key_id)
    assert code == 0, err
    assert out.startswith(f"{key_id}  revoked")
    deadline = time.monotonic() + 5
    while True:
        code, out, err = await mlmesh(
            full_mesh, secret, "generate", "tiny-llama@champion", "again", "--max-tokens", "2"
        )
        if code == 1:
            break
        assert time.monotonic() < deadline, "the revoked key still works"
    assert err.startswith("error: UNAUTHENTICATED:"), err


async def test_infer_a_triton_model_from_the_command_line(full_mesh, tmp_path: Path):
    x, y = digits_training_data()
    np.save(tmp_path / "batch.npy", x[:3].astype(np.float32))
    code, out, err = await mlmesh(
        full_mesh,
        full_mesh.api_key,
        "infer",
        "digits@champion",
        "--input",
        f"pixels=@{tmp_path / 'batch.npy'}",
    )
    assert code == 0, err
    head, output, argmax = out.splitlines()
    assert head.startswith("digits/") and head.endswith("1 output  items=192")
    assert " FP32 3x10  " in output
    assert argmax == "    argmax by row: " + " ".join(map(str, y[:3]))

    # typed as JSON; --json has the probabilities as numbers
    pixels = json.dumps(x[3:4].tolist())
    code, out, err = await mlmesh(
        full_mesh,
        full_mesh.api_key,
        "infer",
        "digits@champion",
        "--input",
        f"pixels={pixels}",
        "--json",
    )
    assert code == 0, err
    [record] = [json.loads(line) for line in out.splitlines()]
    probabilities = record["outputs"][0]["values"]["fp32Contents"]
    assert len(probabilities) == 10
    assert probabilities.index(max(probabilities)) == y[3]

    code, out, err = await mlmesh(
        full_mesh, full_mesh.api_key, "infer", "digits", "--input", "pixels=[[1, 2, 3]]"
    )
    assert code == 1 and out == ""
    assert err.startswith("error: INVALID_ARGUMENT:"), err
    assert "field: inputs['pixels'].shape:" in err
