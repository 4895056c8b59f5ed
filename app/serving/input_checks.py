"""Inputs vLLM's serving layer crashes on, refused with a 400 before they reach it.

vLLM 0.32 answers these with a 500 whose message is a Python internal ("list index out of
range"): a client error reported as a server fault. Each check here is a case the API fuzzer
found against the real engine (tests/reliability/test_api_fuzz_live.py keeps them).
"""

from __future__ import annotations

import json
from typing import Any

from app.errors import BadRequest


def check_input(path: str, body: bytes) -> None:
    """Raise BadRequest for a body vLLM would crash on; anything else passes unchanged (vLLM
    validates it and answers its own 400s)."""
    if path != "/v1/responses":
        return
    try:
        payload = json.loads(body)
    except ValueError:
        return
    if isinstance(payload, dict) and isinstance(payload.get("input"), list):
        _responses_items(payload["input"])


def _responses_items(items: list[Any]) -> None:
    """An assistant message item is turned into a chat message from its first content part's
    `text` (vLLM's `_construct_message_from_response_item`): it must have one."""
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get("role") != "assistant":
            continue
        content = item.get("content")
        if item.get("type", "message") != "message" or not isinstance(content, list):
            continue
        first = content[0] if content else None
        if not (isinstance(first, dict) and isinstance(first.get("text"), str)):
            raise BadRequest(
                "an assistant message in 'input' must start with a text part "
                "(a non-empty 'content' whose first part has 'text')",
                param=f"input[{i}].content",
                code="invalid_input",
            )
