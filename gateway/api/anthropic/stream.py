"""Stream translation between chat-completion chunks and Messages API events.

This module owns the two stateful stream translators and the SSE framing of
Messages events. :class:`ChatToMessagesStream` turns ``chat.completion.chunk``
dicts from a chat-only deployment into Anthropic events (``message_start``,
``content_block_start/delta/stop`` for text and ``tool_use`` with
``input_json_delta``, ``message_delta`` with usage, ``message_stop``);
:class:`MessagesToChatStream` does the reverse for a chat client served by a
Messages-only deployment. Each event dict's ``type`` is its SSE event name;
:func:`encode_event` frames one as ``event: <type>\\ndata: <json>\\n\\n``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from gateway.api.anthropic.translate import (
    FINISH_REASONS,
    STOP_REASONS,
    as_object,
    chat_id,
    chat_usage,
    messages_usage,
)
from gateway.errors import UpstreamError


def encode_event(event: dict[str, Any]) -> bytes:
    """One Messages SSE event: ``event: <type>\\ndata: <json>\\n\\n``."""
    return b"event: " + str(event.get("type", "message")).encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def _index(event: dict[str, Any]) -> int:
    index = event.get("index")
    return index if isinstance(index, int) else -1


class ChatToMessagesStream:
    """Chat chunks in, Messages events out; one instance per stream.

    ``input_tokens`` is what ``message_start`` reports before the upstream's usage is known (the
    gateway's prompt estimate); the final ``message_delta`` carries the real input side and output."""

    def __init__(self, model: str, *, input_tokens: int = 0, message_id: str | None = None) -> None:
        self.model = model
        self.input_tokens = input_tokens
        self.message_id = message_id or f"msg_{uuid.uuid4().hex[:24]}"
        self.started = False
        self.finished = False
        self.index = -1                  # index of the last block opened
        self.open_kind: str | None = None   # "text" / "tool_use" while a block is open
        self.tools: dict[int, int] = {}  # chat tool_calls index -> block index
        self.stop_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def _start(self) -> list[dict[str, Any]]:
        self.started = True
        message: dict[str, Any] = {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.input_tokens, "cache_creation_input_tokens": 0,
                             "cache_read_input_tokens": 0, "output_tokens": 0}}
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def _close(self) -> list[dict[str, Any]]:
        if self.open_kind is None:
            return []
        self.open_kind = None
        return [{"type": "content_block_stop", "index": self.index}]

    def _open(self, kind: str, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self.index += 1
        self.open_kind = kind
        events.append({"type": "content_block_start", "index": self.index, "content_block": block})
        return events

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The events for one chat chunk (possibly none)."""
        if self.finished or not isinstance(chunk, dict):
            return []
        events = [] if self.started else self._start()
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
        if choice is None:
            return events
        delta = as_object(choice.get("delta"))
        for text in (delta.get("content"), delta.get("refusal")):
            if isinstance(text, str) and text:
                if self.open_kind != "text":
                    events += self._open("text", {"type": "text", "text": ""})
                events.append({"type": "content_block_delta", "index": self.index,
                               "delta": {"type": "text_delta", "text": text}})
        if isinstance(delta.get("refusal"), str) and delta["refusal"]:
            self.stop_reason = "refusal"
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                events += self._tool_delta(call)
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and self.stop_reason != "refusal":
            self.stop_reason = STOP_REASONS.get(finish, "end_turn")
        return events

    def _tool_delta(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        raw_index, raw_id = call.get("index"), call.get("id")
        if isinstance(raw_index, int):
            position = raw_index
        elif self.tools and not raw_id:   # no index, no id: more of the call before (servers without indexes)
            position = max(self.tools)
        else:
            position = max(self.tools, default=-1) + 1
        function = as_object(call.get("function"))
        events: list[dict[str, Any]] = []
        if position not in self.tools:
            tool_id = call.get("id") if isinstance(call.get("id"), str) and call["id"] \
                else f"toolu_{uuid.uuid4().hex[:24]}"
            name = function.get("name") if isinstance(function.get("name"), str) else ""
            events += self._open("tool_use", {"type": "tool_use", "id": tool_id, "name": name, "input": {}})
            self.tools[position] = self.index
        block = self.tools[position]
        args = function.get("arguments")
        if isinstance(args, str) and args:
            if block != self.index or self.open_kind != "tool_use":
                return events   # a fragment for a block already closed (interleaved calls): cannot be sent
            events.append({"type": "content_block_delta", "index": block,
                           "delta": {"type": "input_json_delta", "partial_json": args}})
        return events

    def finish(self, chat_usage: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The closing events: the open block's stop, ``message_delta`` with usage, ``message_stop``.

        ``chat_usage`` (the chat usage to report) defaults to the last usage a chunk carried."""
        if self.finished:
            return []
        events = [] if self.started else self._start()
        self.finished = True
        events += self._close()
        usage = messages_usage(chat_usage if chat_usage is not None else self.usage)
        if chat_usage is None and self.usage is None:
            usage["input_tokens"] = self.input_tokens
        stop_reason = self.stop_reason or "end_turn"
        if stop_reason == "end_turn" and self.tools:
            stop_reason = "tool_use"   # servers that end a tool call with finish_reason "stop" (Ollama)
        events.append({"type": "message_delta",
                       "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                       "usage": usage})
        events.append({"type": "message_stop"})
        return events


class MessagesToChatStream:
    """Messages events in, chat chunks out; one instance per stream.

    Usage comes from ``message_start`` (input side) and ``message_delta`` (cumulative output,
    sometimes the input side too); :meth:`finish` returns the usage chunk (``choices: []``)."""

    def __init__(self, model: str | None = None) -> None:
        self.model = model
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.usage: dict[str, Any] = {}
        self.tools: dict[int, int] = {}   # block index -> tool_calls index
        self.finish_reason: str | None = None
        self.sent_finish = False
        self.finished = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    def _merge_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.usage.update({k: v for k, v in usage.items() if v is not None})

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The chat chunks for one Messages event; an ``error`` event raises :class:`UpstreamError`."""
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "message_start":
            message = as_object(event.get("message"))
            self.id = chat_id(message.get("id"))
            if self.model is None and isinstance(message.get("model"), str):
                self.model = message["model"]
            self._merge_usage(message.get("usage"))
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = as_object(event.get("content_block"))
            if block.get("type") == "tool_use":
                position = len(self.tools)
                self.tools[_index(event)] = position
                call = {"index": position, "id": str(block.get("id")), "type": "function",
                        "function": {"name": str(block.get("name")), "arguments": ""}}
                return [self._chunk({"tool_calls": [call]})]
            if block.get("type") == "text" and isinstance(block.get("text"), str) and block["text"]:
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = as_object(event.get("delta"))
            dtype = delta.get("type")
            if dtype == "text_delta" and isinstance(delta.get("text"), str):
                return [self._chunk({"content": delta["text"]})]
            if dtype == "thinking_delta" and isinstance(delta.get("thinking"), str):
                return [self._chunk({"reasoning_content": delta["thinking"]})]
            if dtype == "input_json_delta" and isinstance(delta.get("partial_json"), str) and delta["partial_json"]:
                found = self.tools.get(_index(event))
                if found is not None:
                    return [self._chunk({"tool_calls": [{"index": found,
                                                         "function": {"arguments": delta["partial_json"]}}]})]
            return []   # signature_delta, citations_delta, ...
        if kind == "message_delta":
            self._merge_usage(event.get("usage"))
            delta = as_object(event.get("delta"))
            stop = delta.get("stop_reason")
            if isinstance(stop, str) and not self.sent_finish:
                self.sent_finish = True
                self.finish_reason = FINISH_REASONS.get(stop, "stop")
                return [self._chunk({}, self.finish_reason)]
            return []
        if kind == "error":
            error = as_object(event.get("error"))
            raise UpstreamError(f"the upstream failed mid-stream: {error.get('type', 'error')}: "
                                f"{error.get('message', '')}")
        return []   # ping, content_block_stop, message_stop, unknown future events

    def finish(self) -> list[dict[str, Any]]:
        """The closing chunks: a finish_reason if none came, then the usage chunk."""
        if self.finished:
            return []
        self.finished = True
        chunks = [] if self.sent_finish else [self._chunk({}, "stop")]
        self.sent_finish = True
        usage_chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                       "model": self.model, "choices": [], "usage": chat_usage(self.usage)}
        return chunks + [usage_chunk]
