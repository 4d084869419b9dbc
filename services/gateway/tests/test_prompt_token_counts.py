"""Prompt tokens counted in the gateway: the same count as the model's own
tokenizer and chat template through transformers (what the llm uses), and
fetched once per version in the background."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh.llm.v1.llm_pb2 import ChatRole
from mlmesh_gateway.prompt_tokens import ModelTokenizer, PromptTokens, byte_bound

TEXTS = ["Hello there", "ünïcödé 🙂 and <|user|> inside", "a " * 300, "x"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from mlmesh_llm import tiny_model

    return tiny_model.build(tmp_path_factory.mktemp("tiny") / "model", layers=1, hidden=32)


def _chat(*turns: tuple[int, str]) -> llm_rpc.GenerateRequest:
    request = llm_rpc.GenerateRequest()
    for role, content in turns:
        request.chat.messages.add(role=role, content=content)
    return request


def test_counts_match_transformers_for_text_and_chat(tiny):
    from transformers import AutoTokenizer

    ours = ModelTokenizer.load(tiny)
    theirs = AutoTokenizer.from_pretrained(tiny, local_files_only=True)
    for text in TEXTS:
        assert ours.count(llm_rpc.GenerateRequest(text=text)) == len(
            theirs.encode(text, add_special_tokens=False)
        )
        request = _chat((ChatRole.CHAT_ROLE_SYSTEM, "be kind"), (ChatRole.CHAT_ROLE_USER, text))
        rendered = theirs.apply_chat_template(
            [{"role": "system", "content": "be kind"}, {"role": "user", "content": text}],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert ours.render_chat([("system", "be kind"), ("user", text)]) == rendered
        assert ours.count(request) == len(theirs.encode(rendered, add_special_tokens=False))
        assert byte_bound(request) >= ours.count(request)
        assert byte_bound(llm_rpc.GenerateRequest(text=text)) >= ours.count_text(text)


async def test_a_version_is_fetched_once_in_the_background(tiny, tmp_path):
    fetched: list[tuple[str, int]] = []
    empty = tmp_path / "no-tokenizer"
    empty.mkdir()

    async def fetch(model: str, version: int) -> Path:
        fetched.append((model, version))
        await asyncio.sleep(0.01)
        return tiny if model == "tiny" else empty

    tokens = PromptTokens(fetch)
    request = llm_rpc.GenerateRequest(text="Hello there")
    assert await tokens.count("tiny", 3, request) is None  # not held yet: the caller falls back
    assert await tokens.count("tiny", 3, request) is None  # the same fetch, not a second
    assert await tokens.ready("tiny", 3) is not None
    assert await tokens.count("tiny", 3, request) == ModelTokenizer.load(tiny).count(request)
    assert await tokens.ready("digits", 1) is None  # no tokenizer.json there
    assert await tokens.count("digits", 1, request) is None
    assert tokens.held("tiny", 0) is None  # an unknown version is never fetched
    assert fetched == [("tiny", 3), ("digits", 1)]
    await tokens.close()
