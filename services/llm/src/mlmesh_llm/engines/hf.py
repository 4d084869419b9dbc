"""Loading a Hugging Face-format model directory (offline, never from a hub)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time

_ROLE_NAMES = {"system", "user", "assistant"}


class HfTokenizer:
    """The model's own tokenizer and chat template."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        if not self.has_chat_template:
            raise ValueError("this model has no chat template")
        for role, _ in messages:
            if role not in _ROLE_NAMES:
                raise ValueError(f"unknown chat role {role!r}")
        return str(
            self._tokenizer.apply_chat_template(
                [{"role": role, "content": content} for role, content in messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        )


def load_causal_lm(model_dir: Path) -> tuple[Any, Any]:
    """The model (float32, eval, SDPA attention) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()
    return model, tokenizer
