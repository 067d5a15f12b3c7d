"""Between Messages streams and stored answers: assemble a streamed answer, replay a stored one.

:class:`MessagesAssembler` folds the Messages events a client was sent (passed through from a
native upstream, or translated from chat chunks) into the Message they spell, for the response
cache: ``message_start``'s message, each content block from its ``content_block_start`` and
deltas (``text_delta``, ``citations_delta``, ``thinking_delta``, ``signature_delta``,
``input_json_delta`` parsed at ``content_block_stop``), then ``message_delta``'s stop reason and
usage; only a stream that reached ``message_stop`` without an ``error`` event gives one.
:func:`replayed` is a stored Message as the answer to another request with the same key (a fresh
``msg_`` id, ``usage.cost_usd`` 0), and :func:`replay_events` spells it as a stream:
``message_start`` (no content yet), per block ``content_block_start`` / one delta of each kind /
``content_block_stop`` (blocks without deltas, such as ``redacted_thinking`` or server tool
results, whole in their start), ``message_delta`` with the stop reason and the whole usage, and
``message_stop``. The ``anthropic`` SDK's ``messages.stream`` accumulates these into the Message
the JSON would have been.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from gateway.api.anthropic.stream import encode_event

_TOOL_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})   # input streamed as input_json_delta


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


class MessagesAssembler:
    """The Message a stream's events spell (module docstring); one instance per stream."""

    __slots__ = ("message", "blocks", "json", "stopped", "broken")

    def __init__(self) -> None:
        self.message: dict[str, Any] | None = None
        self.blocks: dict[int, dict[str, Any]] = {}
        self.json: dict[int, list[str]] = {}   # block index -> input_json_delta fragments
        self.stopped = False
        self.broken = False

    def add(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            if isinstance(message, dict):
                self.message = {**message, "content": []}
        elif kind == "content_block_start":
            index, block = event.get("index"), event.get("content_block")
            if isinstance(index, int) and isinstance(block, dict):
                self.blocks[index] = dict(block)
        elif kind == "content_block_delta":
            self._delta(event.get("index"), event.get("delta"))
        elif kind == "content_block_stop":
            self._stop(event.get("index"))
        elif kind == "message_delta":
            self._message_delta(event)
        elif kind == "message_stop":
            self.stopped = True
        elif kind == "error":
            self.broken = True

    def _delta(self, index: Any, delta: Any) -> None:
        block = self.blocks.get(index) if isinstance(index, int) else None
        if block is None or not isinstance(delta, dict):
            self.broken = True       # a delta for a block never started: not a stream to keep
            return
        kind = delta.get("type")
        if kind == "text_delta":
            block["text"] = str(block.get("text") or "") + str(delta.get("text") or "")
        elif kind == "thinking_delta":
            block["thinking"] = str(block.get("thinking") or "") + str(delta.get("thinking") or "")
        elif kind == "signature_delta":
            block["signature"] = delta.get("signature")
        elif kind == "input_json_delta":
            self.json.setdefault(index, []).append(str(delta.get("partial_json") or ""))
        elif kind == "citations_delta":
            block["citations"] = [*(block.get("citations") or []), delta.get("citation")]
        else:
            self.broken = True       # a delta this gateway does not know how to fold

    def _stop(self, index: Any) -> None:
        fragments = self.json.pop(index, None) if isinstance(index, int) else None
        if fragments is None:
            return
        text = "".join(fragments)
        try:
            self.blocks[index]["input"] = orjson.loads(text) if text else {}
        except orjson.JSONDecodeError:
            self.broken = True

    def _message_delta(self, event: dict[str, Any]) -> None:
        if self.message is None:
            self.broken = True
            return
        delta = event.get("delta")
        if isinstance(delta, dict):
            for key in ("stop_reason", "stop_sequence"):
                if key in delta:
                    self.message[key] = delta[key]
        usage = event.get("usage")
        if isinstance(usage, dict):
            before = self.message.get("usage")
            self.message["usage"] = {**(before if isinstance(before, dict) else {}),
                                     **{k: v for k, v in usage.items() if v is not None}}

    def answer(self) -> dict[str, Any] | None:
        """The whole Message, or None when the stream did not finish cleanly."""
        if self.message is None or not self.stopped or self.broken or self.json:
            return None
        return {**self.message, "content": [self.blocks[i] for i in sorted(self.blocks)]}


def replayed(answer: dict[str, Any]) -> dict[str, Any]:
    """A stored Message as the answer to another request with the same key: a fresh id, the stored
    content, stop reason and token counts, and ``cost_usd`` 0 (nothing was called)."""
    usage = answer.get("usage")
    return {**answer, "id": new_message_id(),
            "usage": {**usage, "cost_usd": 0.0} if isinstance(usage, dict) else {"cost_usd": 0.0}}


def _block_events(index: int, block: dict[str, Any]) -> list[dict[str, Any]]:
    """``content_block_start``, the deltas and ``content_block_stop`` of one finished block."""
    kind = block.get("type")
    deltas: list[dict[str, Any]] = []
    if kind == "text":
        start = {**block, "text": ""}
        if "citations" in block:
            start["citations"] = []
            deltas += [{"type": "citations_delta", "citation": c} for c in block.get("citations") or ()]
        deltas.append({"type": "text_delta", "text": str(block.get("text") or "")})
    elif kind == "thinking":
        start = {**block, "thinking": "", "signature": ""}
        deltas.append({"type": "thinking_delta", "thinking": str(block.get("thinking") or "")})
        if block.get("signature"):
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
    elif kind in _TOOL_BLOCKS:
        start = {**block, "input": {}}
        deltas.append({"type": "input_json_delta", "partial_json": orjson.dumps(block.get("input") or {}).decode()})
    else:   # redacted_thinking, server tool results, future blocks: whole, as they were
        start = block
    return [{"type": "content_block_start", "index": index, "content_block": start},
            *({"type": "content_block_delta", "index": index, "delta": d} for d in deltas),
            {"type": "content_block_stop", "index": index}]


def replay_events(message: dict[str, Any]) -> list[bytes]:
    """A finished Message (a response-cache hit, already :func:`replayed`) as the SSE events of a stream."""
    usage: dict[str, Any] = message["usage"] if isinstance(message.get("usage"), dict) else {}
    opening = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {k: v for k, v in usage.items() if k != "cost_usd"} | {"output_tokens": 0}}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": opening}]
    blocks = [b for b in message.get("content") or () if isinstance(b, dict)]
    for index, block in enumerate(blocks):
        events += _block_events(index, block)
    events.append({"type": "message_delta", "delta": {"stop_reason": message.get("stop_reason"),
                                                      "stop_sequence": message.get("stop_sequence")},
                   "usage": usage})
    events.append({"type": "message_stop"})
    return [encode_event(e) for e in events]
