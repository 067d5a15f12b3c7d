"""A chat completion turned into a Responses API ``Response`` object.

The answer's reasoning text (``reasoning_content`` or ``reasoning``, as vLLM and
others send it) becomes a ``reasoning`` item, its text a ``message`` item with an
``output_text`` part (a refusal a ``refusal`` part), and each tool call a
``function_call`` item, or a ``custom_tool_call`` item when the request declared
that name as a custom tool. ``finish_reason`` ``length`` or ``content_filter``
makes the response ``incomplete``. Usage is rewritten into Responses' names
(:func:`responses_usage_from_chat`); pricing reads it with
``gateway.pricing.usage_from_responses``. The shared Response envelope (request
fields echoed back) is built by :func:`response_envelope`, which the stream
translator uses too.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

from gateway.api.responses.items import new_item_id
from gateway.api.responses.to_chat import CUSTOM_INPUT, custom_tool_names

INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}


def new_response_id() -> str:
    return "resp_" + secrets.token_hex(24)


def as_dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one (upstream JSON may be anything)."""
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def responses_usage_from_chat(chat_usage: Any) -> dict[str, Any] | None:
    """Chat ``usage`` in Responses' names (``cost_usd`` carried over when present); None without usage."""
    if not isinstance(chat_usage, dict):
        return None
    prompt = as_dict(chat_usage.get("prompt_tokens_details"))
    completion = as_dict(chat_usage.get("completion_tokens_details"))
    input_tokens = _count(chat_usage.get("prompt_tokens"))
    output_tokens = _count(chat_usage.get("completion_tokens"))
    usage: dict[str, Any] = {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": _count(prompt.get("cached_tokens")),
                                 "cache_write_tokens": _count(prompt.get("cache_write_tokens"))},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": _count(completion.get("reasoning_tokens"))},
        "total_tokens": _count(chat_usage.get("total_tokens")) or input_tokens + output_tokens,
    }
    if "cost_usd" in chat_usage:
        usage["cost_usd"] = chat_usage["cost_usd"]
    return usage


def response_envelope(request_body: dict[str, Any], response_id: str, model: Any, created_at: float,
                      status: str) -> dict[str, Any]:
    """A Response object with no output yet, echoing the request's settings as OpenAI does."""
    reasoning = request_body.get("reasoning")
    return {
        "id": response_id, "object": "response", "created_at": int(created_at), "status": status,
        "background": bool(request_body.get("background", False)), "error": None, "incomplete_details": None,
        "instructions": request_body.get("instructions"),
        "max_output_tokens": request_body.get("max_output_tokens"),
        "model": model if isinstance(model, str) and model else request_body.get("model"),
        "output": [], "parallel_tool_calls": request_body.get("parallel_tool_calls", True),
        "previous_response_id": request_body.get("previous_response_id"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")}
        if isinstance(reasoning, dict) else {"effort": None, "summary": None},
        "store": request_body.get("store", True),
        "temperature": request_body.get("temperature"),
        "text": request_body.get("text") or {"format": {"type": "text"}},
        "tool_choice": request_body.get("tool_choice", "auto"),
        "tools": request_body.get("tools") or [],
        "top_p": request_body.get("top_p"),
        "truncation": request_body.get("truncation", "disabled"),
        "usage": None, "user": request_body.get("user"),
        "metadata": request_body.get("metadata") or {},
    }


def finish_status(response: dict[str, Any], finish_reason: Any) -> None:
    """Set ``status`` (and ``incomplete_details``) from a chat ``finish_reason``."""
    reason = INCOMPLETE_REASONS.get(finish_reason) if isinstance(finish_reason, str) else None
    response["status"] = "incomplete" if reason else "completed"
    response["incomplete_details"] = {"reason": reason} if reason else None


def message_item(item_id: str, text: str, status: str = "completed", refusal: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text or refusal is None:
        content.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def call_item(item_id: str, call_id: str, name: str, arguments: str, custom: bool,
              status: str = "completed") -> dict[str, Any]:
    if custom:
        return {"id": item_id, "type": "custom_tool_call", "status": status, "call_id": call_id, "name": name,
                "input": custom_input(arguments)}
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def custom_input(arguments: str) -> str:
    """The free-form input of a custom tool out of the chat arguments ``{"input": ...}`` (else as is)."""
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return arguments
    if isinstance(parsed, dict) and isinstance(parsed.get(CUSTOM_INPUT), str):
        return str(parsed[CUSTOM_INPUT])
    return arguments


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "status": status, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def reasoning_text(holder: dict[str, Any]) -> str | None:
    """The reasoning text a chat message or delta carries under either common name."""
    for key in ("reasoning_content", "reasoning"):
        value = holder.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def chat_to_response(chat_body: dict[str, Any], request_body: dict[str, Any], response_id: str) -> dict[str, Any]:
    """The Response object for a (non-streamed) chat completion answering ``request_body``."""
    created = chat_body.get("created")
    response = response_envelope(request_body, response_id, chat_body.get("model"),
                                 created if isinstance(created, (int, float)) else time.time(), "completed")
    choices = chat_body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = as_dict(choice.get("message"))
    output: list[dict[str, Any]] = []
    thoughts = reasoning_text(message)
    if thoughts:
        output.append(reasoning_item(new_item_id("reasoning"), thoughts))
    content = message.get("content")
    if isinstance(content, list):   # some servers answer with text parts
        content = "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
    refusal = message.get("refusal") if isinstance(message.get("refusal"), str) else None
    if (isinstance(content, str) and content) or refusal:
        output.append(message_item(new_item_id("message"), content if isinstance(content, str) else "",
                                   refusal=refusal))
    custom = custom_tool_names(request_body)
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        name = str(function.get("name") or "")
        arguments = function.get("arguments")
        arguments = arguments if isinstance(arguments, str) else orjson.dumps(arguments or {}).decode()
        call_id = str(call.get("id") or "call_" + secrets.token_hex(12))
        output.append(call_item(new_item_id("custom_tool_call" if name in custom else "function_call"),
                                call_id, name, arguments, name in custom))
    response["output"] = output
    finish_status(response, choice.get("finish_reason"))
    response["usage"] = responses_usage_from_chat(chat_body.get("usage"))
    return response


def replayed_response(answer: dict[str, Any], request_body: dict[str, Any]) -> dict[str, Any]:
    """A stored Response as the answer to another request with the same key: a fresh id and creation
    time, this request's ``previous_response_id`` and ``store`` (the two fields the key leaves out or
    replaces), the stored output and token counts, and ``cost_usd`` 0 (nothing was called)."""
    usage = answer.get("usage")
    return {**answer, "id": new_response_id(), "created_at": int(time.time()),
            "previous_response_id": request_body.get("previous_response_id"),
            "store": request_body.get("store", True),
            "usage": {**usage, "cost_usd": 0.0} if isinstance(usage, dict) else {"cost_usd": 0.0}}
