"""Prompt tokens, counted in the gateway with each model's own tokenizer.

Admission reserves a request's prompt tokens before anything is sent. The
gateway counts them itself instead of asking an llm replica (the CountTokens
round trip): it holds each served version's tokenizer (``tokenizer.json``)
and chat template (``chat_template.jinja`` or ``tokenizer_config.json``),
fetched once per version from the registry through the shared artifact
cache, the version being the one the served-versions follower says the
reference serves now.

The count is the llm's exactly: the same tokenizer file, special tokens not
added, and the chat rendered with the model's template and a generation
prompt (``mlmesh_llm``'s ``_prompt_ids``). It is done with the ``tokenizers``
library and Jinja (sandboxed) rather than ``transformers``, whose import
alone costs seconds and a few hundred MB in a process that relays traffic.

Tokenizing is CPU work: it runs in a worker thread, after the prompt's size
was bounded (``check_prompt_size``). A version whose tokenizer is not held
yet is fetched in the background and the call gets ``None`` (the caller
falls back: the llm's CountTokens, or a byte bound for an upstream), so no
request waits on a download.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from mlmesh.llm.v1 import llm_service_pb2 as llm_rpc
from mlmesh.llm.v1.llm_pb2 import ChatRole
from tokenizers import Tokenizer

log = logging.getLogger("mlmesh.gateway")

# Tokenizers held at once (each a few MB); the least recently used goes.
MAX_HELD = 16
ROLES = {
    ChatRole.CHAT_ROLE_SYSTEM: "system",
    ChatRole.CHAT_ROLE_USER: "user",
    ChatRole.CHAT_ROLE_ASSISTANT: "assistant",
}
# Per message, what a chat template adds around the content, at most (the
# byte bound for a model without a tokenizer).
TEMPLATE_BYTES_PER_MESSAGE = 32
# How a version's folder is had (``ArtifactCache.folder``).
Fetch = Callable[[str, int], Awaitable[Path]]


def _special(value: Any) -> str:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _raise(message: str) -> None:
    raise TemplateError(message)


@dataclass
class ModelTokenizer:
    """One version's tokenizer and chat template."""

    tokenizer: Tokenizer
    template: Any  # a compiled jinja2 Template, or None without a chat template
    specials: dict[str, str]

    @classmethod
    def load(cls, folder: Path) -> ModelTokenizer:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {}
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
        source = None
        template_file = folder / "chat_template.jinja"
        if template_file.is_file():
            source = template_file.read_text()
        elif isinstance(config.get("chat_template"), str):
            source = config["chat_template"]
        elif isinstance(config.get("chat_template"), list):  # named templates
            named = {t.get("name"): t.get("template") for t in config["chat_template"]}
            source = named.get("default")
        template = None
        if source:
            # What transformers' apply_chat_template uses: a sandbox, and
            # trim_blocks / lstrip_blocks.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            template = env.from_string(source)
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        specials = {name: _special(config.get(name)) for name in names}
        return cls(tokenizer, template, specials)

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        if self.template is None:
            raise ValueError("this model has no chat template")
        return str(
            self.template.render(
                messages=[{"role": r, "content": c} for r, c in messages],
                add_generation_prompt=True,
                **self.specials,
            )
        )

    def count(self, request: llm_rpc.GenerateRequest) -> int:
        """The prompt's tokens (blocking: call it in a worker thread)."""
        if request.WhichOneof("prompt") == "chat":
            turns = [(ROLES.get(m.role, "user"), m.content) for m in request.chat.messages]
            text = self.render_chat(turns)
        else:
            text = request.text
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def count_text(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)


def byte_bound(request: llm_rpc.GenerateRequest) -> int:
    """At least the prompt's tokens for any byte-level tokenizer (every token
    is one byte or more), chat template included: a reservation for a model
    whose tokenizer the gateway does not hold. Its bill is the upstream's
    reported usage."""
    if request.WhichOneof("prompt") == "chat":
        return sum(
            len(m.content.encode()) + TEMPLATE_BYTES_PER_MESSAGE for m in request.chat.messages
        )
    return len(request.text.encode())


class PromptTokens:
    """The tokenizers of the versions asked for, fetched in the background."""

    def __init__(self, fetch: Fetch, max_held: int = MAX_HELD) -> None:
        self._fetch = fetch
        self.max_held = max_held
        self._held: OrderedDict[tuple[str, int], ModelTokenizer] = OrderedDict()
        self._loading: dict[tuple[str, int], asyncio.Task[None]] = {}
        # Versions whose folder has no tokenizer (a classic model's name
        # given by mistake): not fetched again.
        self._without: set[tuple[str, int]] = set()

    def held(self, model: str, version: int) -> ModelTokenizer | None:
        """The version's tokenizer if held; otherwise starts fetching it."""
        key = (model, version)
        tokenizer = self._held.get(key)
        if tokenizer is not None:
            self._held.move_to_end(key)
            return tokenizer
        if key not in self._loading and key not in self._without and version > 0:
            self._loading[key] = asyncio.create_task(self._load(key))
        return None

    async def ready(self, model: str, version: int) -> ModelTokenizer | None:
        """Waits for the version's tokenizer (warm-up, tests)."""
        if self.held(model, version) is None and (model, version) in self._loading:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._loading[(model, version)])
        return self._held.get((model, version))

    async def count(self, model: str, version: int, request: llm_rpc.GenerateRequest) -> int | None:
        """The prompt's tokens with the version's tokenizer; None while it is
        not held (or the model has none)."""
        tokenizer = self.held(model, version)
        if tokenizer is None:
            return None
        return await asyncio.to_thread(tokenizer.count, request)

    async def count_text(self, model: str, version: int, text: str) -> int | None:
        tokenizer = self.held(model, version)
        if tokenizer is None:
            return None
        return await asyncio.to_thread(tokenizer.count_text, text)

    async def _load(self, key: tuple[str, int]) -> None:
        try:
            folder = await self._fetch(*key)
            if not (folder / "tokenizer.json").is_file():
                log.warning("%s/%d has no tokenizer.json: prompts are not counted here", *key)
                self._without.add(key)
                return
            tokenizer = await asyncio.to_thread(ModelTokenizer.load, folder)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the next request tries again
            log.warning("could not load the tokenizer of %s/%d: %s", *key, error)
            return
        finally:
            self._loading.pop(key, None)
        self._held[key] = tokenizer
        while len(self._held) > self.max_held:
            self._held.popitem(last=False)
        log.info("tokenizer of %s/%d loaded", *key)

    async def close(self) -> None:
        tasks = list(self._loading.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
