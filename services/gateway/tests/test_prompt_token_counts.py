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


async def test_an_upstream_without_usage_is_billed_by_the_models_tokenizer(tiny, tmp_path):
    """An OpenAI-compatible upstream that reports no usage, for a model whose
    tokenizer the gateway holds: the prompt is reserved and the completion
    billed by that tokenizer's count, not by chunks or bytes."""
    import json
    from types import SimpleNamespace

    from keyring import migrated_gateway_db
    from mlmesh.common.v1.model_reference_pb2 import ModelReference
    from mlmesh.gateway.v1 import gateway_pb2 as pb
    from mlmesh_gateway.admission import Admission
    from mlmesh_gateway.balancer import LatencyAwareBalancer
    from mlmesh_gateway.fake_upstream import FakeUpstream
    from mlmesh_gateway.generation import Generation, Outcome
    from mlmesh_gateway.llm_router import LlmRouter
    from mlmesh_gateway.shadows import ShadowRunner
    from mlmesh_gateway.traffic_split import TrafficSplit
    from mlmesh_gateway.upstreams import close_session, new_session, parse_upstreams
    from mlmesh_metering import Metering, Throttle
    from mlmesh_metering.ledger import UsageLedger

    class Directory:  # the followed registry: "tiny" serves version 1
        async def served(self, model: str, alias: str = "") -> SimpleNamespace:
            return SimpleNamespace(served=SimpleNamespace(version=1))

    async def fetch(model: str, version: int) -> Path:
        return tiny

    fake = FakeUpstream(tokens=6)
    await fake.start()
    fake.set_faults(omit_usage=True)
    database = await migrated_gateway_db(f"sqlite+aiosqlite:///{tmp_path}/g.db")
    ledger = UsageLedger(database)
    meter = Metering(Throttle(), ledger, pb.PLATFORM_SERVICE_GENERATE)
    spec = parse_upstreams(
        json.dumps({"fake-64": {"endpoints": [f"a={fake.url}"], "tokenizer": "tiny"}})
    )["fake-64"]
    session = new_session()
    router = LlmRouter(LatencyAwareBalancer.for_upstream(spec, session, "a"))
    tokens = PromptTokens(fetch)
    assert await tokens.ready("tiny", 1) is not None

    async def loaded(model: str, version: int) -> bool:
        return True

    generation = Generation(
        Admission(meter),
        router,
        {"fake-64": (spec, router)},
        TrafficSplit(None, loaded, pin_served=False),
        ShadowRunner(None),
        Directory(),  # type: ignore[arg-type]
        tokens,
    )
    key = pb.Key(
        id="0123456789abcdef", scopes=pb.KeyScopes(services=[pb.PLATFORM_SERVICE_GENERATE])
    )
    request = _chat((ChatRole.CHAT_ROLE_USER, "Hello there"))
    request.model.CopyFrom(ModelReference(model="fake-64"))
    expected_prompt = ModelTokenizer.load(tiny).count(request)
    for whole in (False, True):
        outcome = Outcome()
        texts = [
            chunk.text
            async for _, chunk in generation.stream(
                key, request, "a", {}, outcome=outcome, whole=whole
            )
        ]
        assert "".join(texts) == "tok " * 6
        assert outcome.prompt_tokens == expected_prompt
        assert outcome.completion_tokens == ModelTokenizer.load(tiny).count_text("tok " * 6)
        assert outcome.completion_tokens != 6  # the tokenizer's count, not the chunks'
    await tokens.close()
    await close_session(session)
    await ledger.close()
    await database.close()
    await fake.close()
