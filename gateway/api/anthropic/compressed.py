"""A compressed conversation in the Messages API's own shape: what a native deployment is sent.

Compression works on the chat translation of a Messages body (turns, tool pairs, token counts).
This module owns the way back: :func:`native_messages` traces every chat message that survived
to the Messages message it came from (by identity, through the ``origins`` the translation
recorded) and sends those messages exactly as the client wrote them (``cache_control``,
``thinking`` and ``redacted_thinking`` blocks with their signatures, images, documents, server
tool blocks). A user message whose parts went to different turns (tool results for the
previous turn, text opening the next) keeps the blocks whose turn survived; a cleared tool
output keeps its ``tool_result`` block with the placeholder as its content; the summary and its
acknowledgement become plain user and assistant messages. A message the translation had no chat
counterpart for goes (or stays out) with the message after it. Consecutive messages of one role
are merged (tool results first), as the Messages API wants. ``None`` when the chat messages cannot
be traced back (the caller then translates the chat body back).
"""

from __future__ import annotations

from typing import Any

KEPT = "kept"


def _partial(message: dict[str, Any], parts: list[tuple[dict[str, Any], str | None]]) -> dict[str, Any] | None:
    """``message`` holding only the blocks whose chat counterparts survived (``parts``: each chat message
    it became, with ``KEPT``, a cleared tool output's text, or None when its turn was dropped)."""
    content = message.get("content")
    if not isinstance(content, list):
        return None
    tools = {str(chat.get("tool_call_id")): fate for chat, fate in parts if chat.get("role") == "tool"}
    rest_kept = any(fate is not None for chat, fate in parts if chat.get("role") != "tool")
    blocks = []
    for block in content:
        call = str(block.get("tool_use_id")) if isinstance(block, dict) and block.get("type") == "tool_result" else None
        if call is not None and call in tools:
            fate = tools[call]
            if fate == KEPT:
                blocks.append(block)
            elif fate is not None:
                blocks.append({**block, "content": fate})
        elif rest_kept:
            blocks.append(block)
    return {**message, "content": blocks} if blocks else None


def _blocks(content: Any) -> list[Any]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return list(content) if isinstance(content, list) else []


def _merged(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive messages of one role as one, its tool results first (the Messages API's rules)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if out and out[-1].get("role") == message.get("role"):
            blocks = [*_blocks(out[-1].get("content")), *_blocks(message.get("content"))]
            results = [b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"]
            others = [b for b in blocks if not (isinstance(b, dict) and b.get("type") == "tool_result")]
            out[-1] = {**out[-1], "content": [*results, *others]}
        else:
            out.append(message)
    return out


def _anchors(count: int, by_native: dict[int, list[int]]) -> dict[int, list[int]]:
    """Native messages without a chat counterpart, by the message they go (or stay out) with: the next one
    that has a counterpart, else the last one."""
    traced = sorted(by_native)
    anchors: dict[int, list[int]] = {}
    for j in range(count):
        if j in by_native or not traced:
            continue
        anchor = next((i for i in traced if i > j), traced[-1])
        anchors.setdefault(anchor, []).append(j)
    return anchors


def native_messages(native: list[Any], origins: list[tuple[int, ...]], before: list[dict[str, Any]],
                    after: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The Messages ``messages`` standing for the compressed chat ``after`` (``before``: the chat translation
    of ``native``, one ``origins`` entry per message), or None when they cannot be traced back."""
    if len(origins) != len(before):
        return None
    position = {id(m): k for k, m in enumerate(before)}
    tools: dict[str, int] = {}
    by_native: dict[int, list[int]] = {}
    for k, (chat, came) in enumerate(zip(before, origins, strict=True)):
        if chat.get("role") == "tool":
            tools.setdefault(str(chat.get("tool_call_id")), k)
        for i in came:
            by_native.setdefault(i, []).append(k)
    fate: dict[int, str] = {}
    order: list[int | dict[str, Any]] = []
    seen: set[int] = set()
    for message in after:
        at = position.get(id(message))
        if at is None and message.get("role") == "tool":   # a cleared tool output
            at = tools.get(str(message.get("tool_call_id")))
            if at is None or not isinstance(message.get("content"), str):
                return None
            fate[at] = message["content"]
        elif at is None:                                  # the summary and its acknowledgement
            order.append({"role": message.get("role"), "content": message.get("content")})
            continue
        else:
            fate[at] = KEPT
        for i in origins[at]:
            if i not in seen:
                seen.add(i)
                order.append(i)
    anchors = _anchors(len(native), by_native)
    out: list[dict[str, Any]] = []
    for item in order:
        if isinstance(item, dict):
            out.append(item)
            continue
        ks = by_native[item]
        kept = native[item] if all(fate.get(k) == KEPT for k in ks) else _partial(
            native[item], [(before[k], fate.get(k)) for k in ks])
        if kept is None:
            continue
        riders = anchors.get(item, [])
        out.extend(native[j] for j in riders if j < item)
        out.append(kept)
        out.extend(native[j] for j in riders if j > item)
    return _merged(out)
