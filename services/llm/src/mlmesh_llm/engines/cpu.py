"""The CPU engine: a Hugging Face causal LM on torch CPU with continuous batching.

Scheduling (on the event loop, between steps): new requests wait in a bounded
queue; before each step, cancelled requests leave (their slot is free for this
very step), and waiting ones are admitted while slots are free. Each step (in
a worker thread, so the loop keeps streaming) prefills the admitted requests
together and decodes one token for every running request in one batched
forward pass.

KV cache: one preallocated tensor per layer, [slots, kv_heads, context,
head_dim]. Running requests occupy rows 0..n-1 (a finished request's row is
refilled by moving the last row into it), and each row has its own length, so
a batched decode step writes every row at its own position and attends
through a per-row mask. The model is the library's own forward pass
(transformers); only the cache object and the 4D mask are ours.

Why not transformers' own continuous batching: measured on this machine's
small models it was slower than plain sequential ``generate`` (its per-step
overhead dominates); see bench/llm_cpu_engine.py for this engine's figures.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlmesh_llm.engines.base import (
    Delta,
    EngineRequest,
    FinishReason,
    Load,
    ModelInfo,
    QueueFull,
)
from mlmesh_llm.engines.hf import HfTokenizer, load_causal_lm
from mlmesh_llm.engines.textstream import TextStream

log = logging.getLogger("mlmesh.llm.cpu")


class SlotKVCache:
    """Per-layer K/V tensors with one row per running request.

    Duck-types the one method transformers' attention layers call:
    ``update(key_states, value_states, layer_idx, **kwargs)``. Before each
    forward pass the engine says where to write: ``prefill(first_row, length)``
    or ``decode(positions)``.
    """

    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        context: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> None:
        shape = (layers, slots, kv_heads, context, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype)
        self.values = torch.zeros(shape, dtype=dtype)
        self._rows: slice = slice(0, 0)
        self._positions: torch.Tensor | None = None
        self._length = 0

    def prefill(self, first_row: int, rows: int, length: int) -> None:
        self._rows, self._positions, self._length = slice(first_row, first_row + rows), None, length

    def decode(self, positions: torch.Tensor, kv_length: int) -> None:
        self._rows = slice(0, positions.shape[0])
        self._positions, self._length = positions, kv_length

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._positions is None:  # prefill: rows [first, first+n), positions [0, length)
            keys[self._rows, :, : self._length] = key_states
            values[self._rows, :, : self._length] = value_states
        else:  # decode: one new position per row
            rows = torch.arange(self._positions.shape[0])
            keys[rows, :, self._positions] = key_states[:, :, 0]
            values[rows, :, self._positions] = value_states[:, :, 0]
        return keys[self._rows, :, : self._length], values[self._rows, :, : self._length]

    def move_row(self, source: int, target: int, length: int) -> None:
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]


@dataclass(eq=False)
class _Sequence:
    request: EngineRequest
    stream: TextStream
    outbox: asyncio.Queue[Delta | BaseException]
    generator: torch.Generator
    arrival: float = field(default_factory=time.monotonic)
    started: float = 0.0
    first_token: float = 0.0
    length: int = 0  # tokens in the KV cache
    next_token: int = -1  # sampled, not yet fed back
    generated: int = 0
    cancelled: bool = False
    finished: bool = False


class CpuEngine:
    name = "cpu"

    def __init__(
        self,
        model_dir: Path,
        *,
        max_running: int = 32,
        max_waiting: int = 256,
        max_context: int | None = None,
        threads: int | None = None,
        max_prefill_per_step: int = 8,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.max_prefill_per_step = max_prefill_per_step
        self._max_context = max_context
        self._threads = threads
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._step_seconds = 0.01

    # ---- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._task = asyncio.create_task(self._schedule(), name=f"cpu-engine:{self.model_dir}")

    def _load(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)
        self.model, hf_tokenizer = load_causal_lm(self.model_dir)
        self.tokenizer = HfTokenizer(hf_tokenizer)
        config = self.model.config
        context = int(config.max_position_embeddings)
        if self._max_context:
            context = min(context, self._max_context)
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.cache = SlotKVCache(
            config.num_hidden_layers,
            self.max_running,
            config.num_key_value_heads,
            context,
            head_dim,
            next(self.model.parameters()).dtype,
        )
        self.info = ModelInfo(
            context_length=context,
            chat=self.tokenizer.has_chat_template,
            image_input=False,
            eos_token_ids=self.tokenizer.eos_token_ids,
        )
        log.info("loaded %s: context %d, %d slots", self.model_dir, context, self.max_running)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for seq in [*self._waiting, *self._running]:
            seq.outbox.put_nowait(RuntimeError("the engine stopped"))

    def load(self) -> Load:
        used = sum(seq.length for seq in self._running)
        return Load(
            waiting=len(self._waiting),
            running=len(self._running),
            kv_cache_usage=used / (self.max_running * self.info.context_length),
        )

    # ---- requests -----------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncGenerator[Delta, None]:
        if len(self._waiting) >= self.max_waiting:
            raise QueueFull(len(self._waiting), self._retry_after())
        seed = (
            request.sampling.seed if request.sampling.seed is not None else random.getrandbits(63)
        )
        seq = _Sequence(
            request,
            TextStream(self.tokenizer.decode, request.sampling.stop),
            asyncio.Queue(),
            torch.Generator().manual_seed(seed),
        )
        self._waiting.append(seq)
        self._wake.set()
        try:
            while True:
                item = await seq.outbox.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.finished:  # the caller left: free the slot before the next step
                seq.cancelled = True
                self._wake.set()

    def _retry_after(self) -> float:
        # About how long the queue ahead takes to drain, at the recent step rate.
        return max(0.1, min(30.0, len(self._waiting) / self.max_running * 64 * self._step_seconds))

    # ---- scheduling (event loop) -------------------------------------------

    async def _schedule(self) -> None:
        while True:
            self._drop_cancelled()
            admitted = self._admit()
            if not self._running:
                self._wake.clear()
                await self._wake.wait()
                continue
            started = time.perf_counter()
            try:
                deltas = await asyncio.to_thread(self._step, admitted)
            except Exception as error:  # a bug or a torch failure: fail these requests, go on
                log.exception("engine step failed")
                for seq in list(self._running):
                    seq.outbox.put_nowait(error)
                    self._release(seq)
                continue
            self._step_seconds = 0.9 * self._step_seconds + 0.1 * (time.perf_counter() - started)
            for seq, delta in deltas:
                seq.outbox.put_nowait(delta)
                if delta.finish_reason is not None:
                    self._release(seq)

    def _drop_cancelled(self) -> None:
        if any(seq.cancelled for seq in self._waiting):
            self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)
        for seq in [s for s in self._running if s.cancelled]:
            self._release(seq)

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        while (
            self._waiting
            and len(self._running) < self.max_running
            and len(admitted) < self.max_prefill_per_step
        ):
            seq = self._waiting.popleft()
            seq.started = time.monotonic()
            self._running.append(seq)
            admitted.append(seq)
        return admitted

    def _release(self, seq: _Sequence) -> None:
        """Frees a row, keeping rows 0..n-1 filled (the last row moves in)."""
        seq.finished = True
        row = self._running.index(seq)
        last = self._running.pop()
        if last is not seq:
            self.cache.move_row(len(self._running), row, last.length)
            self._running[row] = last

    # ---- compute (worker thread) -------------------------------------------

    @torch.inference_mode()
    def _step(self, admitted: list[_Sequence]) -> list[tuple[_Sequence, Delta]]:
        out: list[tuple[_Sequence, Delta]] = []
        decoding = [s for s in self._running if s.next_token >= 0 and s not in admitted]
        if decoding:
            # `decoding` is rows 0..n-1; this step's admitted rows come after them.
            positions = torch.tensor([s.length for s in decoding])
            kv_length = int(positions.max()) + 1
            self.cache.decode(positions, kv_length)
            mask = torch.arange(kv_length)[None, :] <= positions[:, None]
            logits = self.model(
                input_ids=torch.tensor([[s.next_token] for s in decoding]),
                position_ids=positions[:, None],
                attention_mask=mask[:, None, None, :],
                cache=self.cache,
                use_cache=True,
            ).logits[:, -1, :]
            for i, seq in enumerate(decoding):
                seq.length += 1
                out.append((seq, self._advance(seq, logits[i])))
        if admitted:
            first_row = len(self._running) - len(admitted)
            lengths = [len(s.request.prompt_ids) for s in admitted]
            width = max(lengths)
            ids = torch.zeros((len(admitted), width), dtype=torch.long)
            for i, seq in enumerate(admitted):
                ids[i, : lengths[i]] = torch.tensor(seq.request.prompt_ids)
            lengths_t = torch.tensor(lengths)
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            mask = causal[None] & (torch.arange(width)[None, None, :] < lengths_t[:, None, None])
            self.cache.prefill(first_row, len(admitted), width)
            logits = self.model(
                input_ids=ids,
                position_ids=torch.arange(width)[None].expand(len(admitted), -1),
                attention_mask=mask[:, None],
                cache=self.cache,
                use_cache=True,
            ).logits
            for i, seq in enumerate(admitted):
                seq.length = lengths[i]
                out.append((seq, self._advance(seq, logits[i, lengths[i] - 1])))
        return out

    def _advance(self, seq: _Sequence, logits: torch.Tensor) -> Delta:
        """Samples one token for ``seq`` and says what to stream."""
        sampling = seq.request.sampling
        token = sample(logits, sampling.temperature, sampling.top_p, sampling.top_k, seq.generator)
        now = time.monotonic()
        if seq.generated == 0:
            seq.first_token = now
        seq.generated += 1
        seq.next_token = token
        finish: FinishReason | None = None
        if token in self.info.eos_token_ids:
            finish, text = FinishReason.STOP, seq.stream.flush()
        else:
            text = seq.stream.push(token)
            if seq.stream.stopped:
                finish = FinishReason.STOP_SEQUENCE
            elif seq.generated >= sampling.max_tokens or seq.length + 1 >= self.info.context_length:
                finish = FinishReason.LENGTH
                text += seq.stream.flush()
        delta = Delta(text=text, token_count=1, finish_reason=finish)
        if finish is not None:
            delta.prompt_tokens = len(seq.request.prompt_ids)
            delta.completion_tokens = seq.generated
            delta.queue_seconds = seq.started - seq.arrival
            delta.first_token_seconds = seq.first_token - seq.arrival
            if seq.generated > 1:
                delta.per_token_seconds = (now - seq.first_token) / (seq.generated - 1)
        return delta


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator
) -> int:
    """One token from one row of logits (greedy when temperature is 0)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
