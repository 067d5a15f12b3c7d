"""Input items of a Responses request as the gateway keeps and lists them.

:func:`request_input_items` turns a request's ``input`` (a string or a list) into
items; :func:`with_item_ids` gives every item an id the way OpenAI does when it
stores them (``msg_...``, ``fc_...``, ...), so ``GET /v1/responses/{id}/input_items``
can page by id; :func:`input_items_page` renders that listing (``limit``,
``order``, ``after``) with OpenAI's list envelope, refusing bad query values with
a 400 naming the parameter.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from gateway.errors import InvalidRequest

ID_PREFIXES = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_",
               "custom_tool_call": "ctc_", "custom_tool_call_output": "ctco_", "reasoning": "rs_"}


def new_item_id(kind: str) -> str:
    return ID_PREFIXES.get(kind, "item_") + secrets.token_hex(24)


def request_input_items(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The request's ``input`` as a list of items (a plain string is one user message)."""
    value = body.get("input")
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    return [dict(item) for item in value if isinstance(item, dict)]


def with_item_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``items`` where each has an ``id`` (and a ``type``: a bare role means a message).

    New ids share one random stem per call and end in the item's position (48 hex digits, as
    OpenAI's): one call to the system's random source per stored response, not one per item."""
    out = []
    stem = ""
    for position, item in enumerate(items):
        kind = item.get("type") or ("message" if "role" in item else "item")
        copy = dict(item, type=kind)
        if not isinstance(copy.get("id"), str) or not copy["id"]:
            stem = stem or secrets.token_hex(20)
            copy["id"] = f"{ID_PREFIXES.get(kind, 'item_')}{stem}{position:08x}"
        out.append(copy)
    return out


def input_items_page(items: list[dict[str, Any]], query: Mapping[str, str]) -> dict[str, Any]:
    """OpenAI's ``input_items`` list for ``items`` (oldest first) under the query's ``limit``
    (1-100, default 20), ``order`` (``desc``, the default, or ``asc``) and ``after`` (an item id)."""
    raw_limit = query.get("limit", "20")
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise InvalidRequest(f"'limit' must be an integer from 1 to 100, got {raw_limit!r}.",
                             code="invalid_value", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest(f"'order' must be 'asc' or 'desc', got {order!r}.", code="invalid_value", param="order")
    ordered = list(items) if order == "asc" else list(reversed(items))
    after = query.get("after")
    if after is not None:
        position = next((i for i, item in enumerate(ordered) if item.get("id") == after), None)
        if position is None:
            raise InvalidRequest(f"No input item with id {after!r} in this response.",
                                 code="invalid_value", param="after")
        ordered = ordered[position + 1:]
    data = ordered[:limit]
    return {"object": "list", "data": data,
            "first_id": data[0].get("id") if data else None,
            "last_id": data[-1].get("id") if data else None,
            "has_more": len(ordered) > limit}
