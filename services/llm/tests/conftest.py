"""The llm's tests: those that import vLLM run in the llm's own environment.

Under the services' Python (no vLLM), test_vllm_engine.py is not collected;
test_vllm_in_its_env.py runs it on .envs/llm's Python instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

VLLM_TESTS = ("test_vllm_engine.py",)


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    if collection_path.name in VLLM_TESTS and importlib.util.find_spec("vllm") is None:
        return True
    return None
