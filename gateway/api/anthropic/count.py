"""The gateway's own token estimate for a Messages API body.

This module owns :func:`count_tokens_estimate`, used by ``count_tokens`` when the
chosen deployment has no counting endpoint and as the prompt estimate for
reservations: the body is translated to chat completions and counted with
:mod:`gateway.tokens`' rules, plus the JSON of the tool definitions the
translation drops (server and Anthropic-defined tools still reach the model).
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway import tokens
from gateway.api.anthropic.translate import messages_to_chat


def count_tokens_estimate(body: dict[str, Any]) -> int:
    """Estimated input tokens of a (validated) Messages body, in the model's tiktoken encoding."""
    chat, _ = messages_to_chat(body)
    model = str(body.get("model") or "")
    total = tokens.count_chat(chat["messages"], model, chat.get("tools"))
    for tool in body.get("tools") or ():
        if isinstance(tool, dict) and (tool.get("type") not in (None, "custom")
                                       or not isinstance(tool.get("input_schema"), dict)):
            total += tokens.count_text(_json(tool), model)
    return total


def _json(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):   # nested deeper than orjson writes: count its repr
        return str(value)
