"""LiteLLM custom_auth for bench/openai_gateway.py: API keys without a database.

LiteLLM keeps its virtual keys (and their ``tpm_limit``) in PostgreSQL; without one
only a master key exists, and it has no limits. A ``custom_auth`` function may return
any ``UserAPIKeyAuth``, and LiteLLM's rate limiter (parallel_request_limiter_v3, in
memory with one worker) enforces that object's ``tpm_limit`` like a virtual key's. Two
keys, from the environment:

* ``BENCH_LITELLM_KEY``: no limits (latency and CPU phases);
* ``BENCH_LITELLM_TPM_KEY``: ``tpm_limit`` = ``BENCH_LITELLM_TPM`` (the TPM probe).

Any other key is refused with 401.
"""

from __future__ import annotations

import hmac
import os

from fastapi import HTTPException, Request
from litellm.proxy._types import UserAPIKeyAuth

_PLAIN = os.environ.get("BENCH_LITELLM_KEY", "")
_LIMITED = os.environ.get("BENCH_LITELLM_TPM_KEY", "")
_TPM = int(os.environ.get("BENCH_LITELLM_TPM", "6000"))


def _same(a: str, b: str) -> bool:
    return bool(b) and hmac.compare_digest(a.encode(), b.encode())


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    key = api_key.removeprefix("Bearer ").strip()
    if _same(key, _PLAIN):
        return UserAPIKeyAuth(api_key=key, key_alias="bench")
    if _same(key, _LIMITED):
        return UserAPIKeyAuth(api_key=key, key_alias="bench-tpm", tpm_limit=_TPM)
    raise HTTPException(status_code=401, detail="invalid API key")
