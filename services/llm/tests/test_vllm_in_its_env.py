"""Runs test_vllm_engine.py on the llm's own environment's Python.

vLLM (with the torch and transformers it pins) lives in .envs/llm, not in the
services' environment this session runs on. scripts/setup.sh provisions it,
so under ``make test`` it is there: a missing environment fails here rather
than skipping the engine's tests.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
from mlmesh_llm.registration import vllm_env

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None,
    reason="this Python has vLLM: test_vllm_engine.py runs in this session directly",
)
@pytest.mark.timeout(900)
def test_the_vllm_engine_tests_pass_in_the_llms_environment() -> None:
    python = vllm_env() / "bin" / "python"
    assert python.exists(), f"{python} is missing: run scripts/setup.sh (make setup)"
    result = subprocess.run(
        [
            str(python),
            "-m",
            "pytest",
            str(HERE / "test_vllm_engine.py"),
            "-q",
            "-rA",
            "-p",
            "no:cacheprovider",
            "--durations=5",
        ],
        cwd=ROOT,
        env={**os.environ, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=840,
    )
    # vLLM logs every step of its start; the outcome lines are at the end.
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-10000:]
