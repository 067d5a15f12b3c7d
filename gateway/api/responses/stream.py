"""Responses API streaming: events made from chat chunks, and a watcher of native events.

:class:`ChatToResponsesStream` turns the chunks of a chat completions stream into the
event sequence OpenAI's Responses API sends (``response.created``,
``response.in_progress``, per output item ``response.output_item.added``, its
deltas and ``.done`` events, ``response.output_item.done``, and finally
``response.completed``, ``response.incomplete`` or ``response.failed`` carrying the
whole response and its usage), each with a ``sequence_number``.
:func:`encode_event` writes one as a server-sent event. :class:`ResponsesStreamTap`
watches the events of a deployment that speaks Responses natively and keeps what
accounting and the conversation store need: the final response, its usage, and
what was delivered before a stream was cut. :func:`replay_events` spells a finished Response
(a response-cache hit) as the events of a stream.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import orjson

from gateway.api.responses.from_chat import (
    as_dict,
    call_item,
    custom_input,
    finish_status,
    message_item,
    reasoning_item,
    reasoning_text,
    response_envelope,
    responses_usage_from_chat,
)
from gateway.api.responses.items import new_item_id
from gateway.api.responses.to_chat import custom_tool_names

FINAL_EVENTS = frozenset({"response.completed", "response.failed", "response.incomplete"})


def encode_event(event: dict[str, Any]) -> bytes:
    """One server-sent event: ``event: <type>\\ndata: <json>\\n\\n``."""
    return b"event: " + str(event.get("type", "message")).encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


class _Item:
    """One output item being streamed: its index, kind and the text or arguments so far."""

    __slots__ = ("index", "kind", "id", "text", "call_id", "name", "custom")

    def __init__(self, index: int, kind: str, item_id: str) -> None:
        self.index, self.kind, self.id = index, kind, item_id
        self.text = ""
        self.call_id = self.name = ""
        self.custom = False

    def snapshot(self, status: str) -> dict[str, Any]:
        if self.kind == "message":
            return message_item(self.id, self.text, status) if status == "completed" else \
                {"id": self.id, "type": "message", "status": status, "role": "assistant", "content": []}
        if self.kind == "reasoning":
            return reasoning_item(self.id, self.text, status) if status == "completed" else \
                {"id": self.id, "type": "reasoning", "status": status, "summary": [], "content": []}
        arguments = self.text if status == "completed" else ""
        return call_item(self.id, self.call_id, self.name, arguments, self.custom, status)


class ChatToResponsesStream:
    """Stateful translator of one chat completions stream into Responses events.

    Call :meth:`feed` with each chat chunk (a dict) and :meth:`finish` once the stream ended
    (with the usage the pipeline settled on, or None to use the chunks' own); both return
    the events to send, in order. :meth:`start` (implied by the first ``feed``) returns the
    opening events; :meth:`fail` ends the stream with ``response.failed`` instead."""

    def __init__(self, request_body: dict[str, Any], response_id: str, *, created_at: float | None = None) -> None:
        self.request_body = request_body
        self.response = response_envelope(request_body, response_id, None,
                                          time.time() if created_at is None else created_at, "in_progress")
        self._custom = custom_tool_names(request_body)
        self._seq = 0
        self._started = self._ended = False
        self._items: list[_Item] = []
        self._open: list[_Item] = []             # items added but not done yet
        self._calls: dict[int, _Item] = {}       # chat tool-call index -> its item
        self._text: _Item | None = None
        self._reasoning: _Item | None = None
        self._finish_reason: Any = None
        self._usage: Any = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def _response_copy(self) -> dict[str, Any]:
        return dict(self.response, output=list(self.response["output"]))

    def start(self) -> list[dict[str, Any]]:
        if self._started:
            return []
        self._started = True
        return [self._event("response.created", response=self._response_copy()),
                self._event("response.in_progress", response=self._response_copy())]

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.start()
        if self._ended or not isinstance(chunk, dict):
            return events
        if isinstance(chunk.get("model"), str) and chunk["model"]:
            self.response["model"] = chunk["model"]
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = as_dict(choice.get("delta"))
            thoughts = reasoning_text(delta)
            if thoughts:
                events += self._reasoning_delta(thoughts)
            for key in ("content", "refusal"):
                if isinstance(delta.get(key), str) and delta[key]:
                    events += self._text_delta(delta[key])
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    events += self._call_delta(call)
            if choice.get("finish_reason") is not None:
                self._finish_reason = choice["finish_reason"]
        return events

    def _add(self, kind: str) -> _Item:
        item = _Item(len(self._items), kind, new_item_id(kind))
        self._items.append(item)
        self._open.append(item)
        return item

    def _reasoning_delta(self, text: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        item = self._reasoning
        if item is None or item not in self._open:
            events += self._close_all()
            item = self._add("reasoning")
            self._reasoning = item
            events.append(self._event("response.output_item.added", output_index=item.index,
                                      item=item.snapshot("in_progress")))
            events.append(self._event("response.content_part.added", item_id=item.id, output_index=item.index,
                                      content_index=0, part={"type": "reasoning_text", "text": ""}))
        item.text += text
        events.append(self._event("response.reasoning_text.delta", item_id=item.id, output_index=item.index,
                                  content_index=0, delta=text))
        return events

    def _text_delta(self, text: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        item = self._text
        if item is None or item not in self._open:
            events += self._close_all()
            item = self._add("message")
            self._text = item
            events.append(self._event("response.output_item.added", output_index=item.index,
                                      item=item.snapshot("in_progress")))
            events.append(self._event("response.content_part.added", item_id=item.id, output_index=item.index,
                                      content_index=0,
                                      part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
        item.text += text
        events.append(self._event("response.output_text.delta", item_id=item.id, output_index=item.index,
                                  content_index=0, delta=text, logprobs=[]))
        return events

    def _call_delta(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        index = call.get("index", 0) if isinstance(call.get("index"), int) else 0
        function = as_dict(call.get("function"))
        item = self._calls.get(index)
        if item is None:
            # text and reasoning come before the calls; calls stay open to the end, as chat may interleave them
            events += self._close_all(calls=False)
            name = str(function.get("name") or "")
            item = self._add("custom_tool_call" if name in self._custom else "function_call")
            item.name, item.custom = name, name in self._custom
            item.call_id = str(call.get("id") or "call_" + secrets.token_hex(12))
            self._calls[index] = item
            events.append(self._event("response.output_item.added", output_index=item.index,
                                      item=item.snapshot("in_progress")))
        fragment = function.get("arguments")
        if isinstance(fragment, str) and fragment and item in self._open:
            item.text += fragment
            if not item.custom:   # a custom tool's input is known only once its JSON arguments are whole
                events.append(self._event("response.function_call_arguments.delta", item_id=item.id,
                                          output_index=item.index, delta=fragment))
        return events

    def _close(self, item: _Item) -> list[dict[str, Any]]:
        self._open.remove(item)
        events: list[dict[str, Any]] = []
        where = {"item_id": item.id, "output_index": item.index}
        if item.kind == "message":
            part = {"type": "output_text", "text": item.text, "annotations": [], "logprobs": []}
            events.append(self._event("response.output_text.done", **where, content_index=0, text=item.text,
                                      logprobs=[]))
            events.append(self._event("response.content_part.done", **where, content_index=0, part=part))
        elif item.kind == "reasoning":
            events.append(self._event("response.reasoning_text.done", **where, content_index=0, text=item.text))
            events.append(self._event("response.content_part.done", **where, content_index=0,
                                      part={"type": "reasoning_text", "text": item.text}))
        elif item.custom:
            text = custom_input(item.text)
            events.append(self._event("response.custom_tool_call_input.delta", **where, delta=text))
            events.append(self._event("response.custom_tool_call_input.done", **where, input=text))
        else:
            events.append(self._event("response.function_call_arguments.done", **where, name=item.name,
                                      arguments=item.text))
        done = item.snapshot("completed")
        self.response["output"].append(done)
        events.append(self._event("response.output_item.done", output_index=item.index, item=done))
        return events

    def _close_all(self, calls: bool = True) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for item in list(self._open):
            if calls or item.kind in ("message", "reasoning"):
                events += self._close(item)
        return events

    def finish(self, chat_usage: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Close every open item and end with ``response.completed`` (``response.incomplete`` when the
        chat stream stopped at the token limit or a content filter) carrying the full response and the
        usage: ``chat_usage`` (chat names, ``cost_usd`` kept) or else the usage the chunks carried."""
        events = self.start()
        if self._ended:
            return events
        events += self._close_all()
        self._ended = True
        finish_status(self.response, self._finish_reason)
        self.response["usage"] = responses_usage_from_chat(chat_usage if chat_usage is not None else self._usage)
        kind = "response.incomplete" if self.response["status"] == "incomplete" else "response.completed"
        events.append(self._event(kind, response=self._response_copy()))
        return events

    def fail(self, message: str, code: str = "server_error",
             chat_usage: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """End with ``response.failed`` (the items finished so far, the usage delivered so far)."""
        events = self.start()
        if self._ended:
            return events
        self._ended = True
        self._open.clear()
        self.response["status"] = "failed"
        self.response["error"] = {"code": code, "message": message}
        self.response["usage"] = responses_usage_from_chat(chat_usage if chat_usage is not None else self._usage)
        events.append(self._event("response.failed", response=self._response_copy()))
        return events

    @property
    def delivered_text(self) -> str:
        """Everything generated so far (reasoning, text, call arguments): to count a cut stream's tokens."""
        return "".join(item.text for item in self._items)


class ResponsesStreamTap:
    """Watches a native Responses event stream (:meth:`observe` each event dict, unchanged).

    ``response`` is the final response object once ``response.completed``, ``response.failed``
    or ``response.incomplete`` arrived (``status`` says which), ``usage`` its usage; ``response_id``
    is known from ``response.created``; ``output_items`` are the items finished so far;
    ``error`` the message of an ``error`` event; ``delivered_text`` the deltas delivered, to count
    the tokens of a stream cut before its final event."""

    __slots__ = ("response", "response_id", "output_items", "error", "_deltas")

    def __init__(self) -> None:
        self.response: dict[str, Any] | None = None
        self.response_id: str | None = None
        self.output_items: list[dict[str, Any]] = []
        self.error: str | None = None
        self._deltas: list[str] = []

    def observe(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if not isinstance(kind, str):
            return
        if kind.endswith(".delta"):
            delta = event.get("delta")
            if isinstance(delta, str):
                self._deltas.append(delta)
        elif kind == "response.output_item.done" and isinstance(event.get("item"), dict):
            self.output_items.append(event["item"])
        elif kind in FINAL_EVENTS and isinstance(event.get("response"), dict):
            self.response = event["response"]
            self.response_id = self.response_id or _str(self.response.get("id"))
        elif kind in ("response.created", "response.in_progress") and isinstance(event.get("response"), dict):
            self.response_id = self.response_id or _str(event["response"].get("id"))
        elif kind == "error":
            self.error = str(event.get("message") or event.get("code") or "stream error")

    @property
    def status(self) -> str | None:
        return _str(self.response.get("status")) if self.response is not None else None

    @property
    def usage(self) -> dict[str, Any] | None:
        usage = self.response.get("usage") if self.response is not None else None
        return usage if isinstance(usage, dict) else None

    @property
    def delivered_text(self) -> str:
        return "".join(self._deltas)


def _part_events(event: Callable[..., dict[str, Any]], where: dict[str, Any], index: int,
                 part: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of one finished content part of a message: added empty, its text in one delta, done."""
    at = {**where, "content_index": index}
    kind = part.get("type")
    if kind == "output_text":
        text = str(part.get("text") or "")
        return [event("response.content_part.added", **at, part={**part, "text": ""}),
                event("response.output_text.delta", **at, delta=text, logprobs=[]),
                event("response.output_text.done", **at, text=text, logprobs=[]),
                event("response.content_part.done", **at, part=part)]
    if kind == "refusal":
        refusal = str(part.get("refusal") or "")
        return [event("response.content_part.added", **at, part={**part, "refusal": ""}),
                event("response.refusal.delta", **at, delta=refusal),
                event("response.refusal.done", **at, refusal=refusal),
                event("response.content_part.done", **at, part=part)]
    return [event("response.content_part.added", **at, part=part),
            event("response.content_part.done", **at, part=part)]


def replay_events(response: dict[str, Any]) -> list[bytes]:
    """A finished Response as a stream: ``response.created`` and ``response.in_progress`` (no output
    yet), per output item ``response.output_item.added``, its content parts and deltas (a message's
    text and a function call's arguments each in one delta) and ``response.output_item.done``, then
    ``response.completed`` (or ``.incomplete`` / ``.failed``, as the status says) with the whole
    Response; every event numbered in ``sequence_number``."""
    sequence = iter(range(1 << 62))

    def event(kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "sequence_number": next(sequence), **fields}

    opening = {**response, "status": "in_progress", "output": [], "usage": None}
    events = [event("response.created", response=opening), event("response.in_progress", response=opening)]
    for index, item in enumerate(response.get("output") or ()):
        if not isinstance(item, dict):
            continue
        where = {"item_id": item.get("id"), "output_index": index}
        kind = item.get("type")
        if kind == "message":
            events.append(event("response.output_item.added", output_index=index,
                                item={**item, "status": "in_progress", "content": []}))
            for part_index, part in enumerate(item.get("content") or ()):
                if isinstance(part, dict):
                    events += _part_events(event, where, part_index, part)
        elif kind == "function_call":
            arguments = str(item.get("arguments") or "")
            events.append(event("response.output_item.added", output_index=index,
                                item={**item, "status": "in_progress", "arguments": ""}))
            events.append(event("response.function_call_arguments.delta", **where, delta=arguments))
            events.append(event("response.function_call_arguments.done", **where, name=item.get("name"),
                                arguments=arguments))
        else:   # reasoning, custom tool calls, hosted tool calls: whole, as they were
            events.append(event("response.output_item.added", output_index=index, item=item))
        events.append(event("response.output_item.done", output_index=index, item=item))
    status = response.get("status")
    final = f"response.{status}" if f"response.{status}" in FINAL_EVENTS else "response.completed"
    events.append(event(final, response=response))
    return [encode_event(e) for e in events]


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
