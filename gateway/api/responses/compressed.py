"""A compressed conversation as Responses input items, for a deployment that speaks Responses.

Compression (:mod:`gateway.savings.compression`) works on the chat translation of a request
(earlier turns of a ``previous_response_id`` included), removing, clearing or summarising whole
turns. :func:`compressed_input` maps what it kept back onto the conversation's own input items
(:func:`~gateway.api.responses.to_chat.message_origins` says which items each chat message was
made from), so the native call keeps everything chat cannot carry: a kept message is its items as
they were (reasoning items with their encrypted content, hosted tool calls, images, ids of the
request's own items) and a dropped or summarised one takes all its items with it, never part of
one; a function call and its output are in one turn, so they stay or go together. A cleared tool
result is its ``function_call_output`` item with the placeholder as ``output``; the summary pair
becomes two message items. ``instructions`` and tools are not input items and stay as sent.
"""

from __future__ import annotations

from typing import Any

from gateway.api.responses.items import request_input_items
from gateway.api.responses.to_chat import message_origins
from gateway.state.responses_store import StoredResponse

OUTPUT_ITEMS = ("function_call_output", "custom_tool_call_output")


def conversation_items(body: dict[str, Any], prior: StoredResponse | None) -> tuple[list[dict[str, Any]], int]:
    """The whole conversation's input items (earlier turns without the gateway's ids, then the request's)
    and how many of them are earlier turns."""
    history = [{k: v for k, v in item.items() if k != "id"} for item in prior.history()] if prior else []
    return history + request_input_items(body), len(history)


def compressed_input(body: dict[str, Any], prior: StoredResponse | None, original: list[dict[str, Any]],
                     compressed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input items for what compression kept: ``original`` is the chat translation of ``body`` (with
    ``prior``'s turns), ``compressed`` the messages compression made of it (the kept ones are the same
    objects; a cleared tool result is a copy with other content; the summary pair is new)."""
    items, _ = conversation_items(body, prior)
    origins = message_origins(body, prior.history() if prior is not None else None)
    if len(origins) != len(original):
        raise AssertionError("the chat translation of a Responses request changed between two calls")
    position = {id(message): i for i, message in enumerate(original)}
    out: list[dict[str, Any]] = []
    after = 0     # compression keeps the order: a cleared result is looked for past the last kept message
    for message in compressed:
        i = position.get(id(message))
        if i is not None and original[i] is message:
            out += [items[j] for j in origins[i]]
            after = i + 1
        elif message.get("role") == "tool":
            i = next(k for k in range(after, len(original)) if original[k].get("role") == "tool"
                     and original[k].get("tool_call_id") == message.get("tool_call_id"))
            for j in origins[i]:
                item = items[j]
                out.append({**item, "output": message.get("content")} if item.get("type") in OUTPUT_ITEMS else item)
            after = i + 1
        else:     # the summary and its acknowledgement
            out.append({"type": "message", "role": message.get("role"), "content": message.get("content")})
    return out
