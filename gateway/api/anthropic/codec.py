"""The Messages codec: Anthropic's Messages API as an inbound surface of the pipeline.

Decoding validates the body (:mod:`.validation`) and translates it once into the chat shape
the stages read (routing, token counts, compression, the response cache key); the body as
sent is kept. A deployment that speaks Messages (``apis: [messages]``, Anthropic's own by
default) gets the body as sent, every field kept, with the upstream model and the output
cap the hold pays for (a compressed conversation keeps the messages that survived exactly as
sent, :mod:`.compressed`); any other deployment gets the chat translation, and its reply or
chat stream is translated back into a Messages reply or Messages events. Usage comes from
the upstream in its own shape: ``message_start`` and ``message_delta`` on the native path.
The final ``message_delta`` of a stream is held back until the stream ends, then sent with
``usage.cost_usd``; a JSON reply carries it too. Errors use Anthropic's envelope, and a
started stream ends with an ``error`` event. The response cache keys on the body as sent; a
cacheable streamed miss is folded back into its Message to be stored (:mod:`.replay`), and a
hit is replayed under a fresh id as a Message or as Messages events, at $0.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.api.anthropic.compressed import native_messages
from gateway.api.anthropic.errors import error_body, error_event, error_headers
from gateway.api.anthropic.replay import MessagesAssembler, new_message_id, replay_events, replayed
from gateway.api.anthropic.stream import ChatToMessagesStream, encode_event
from gateway.api.anthropic.translate import chat_to_messages, chat_to_messages_reply, messages_to_chat
from gateway.api.anthropic.validation import validate_messages
from gateway.api.openai_codec import OpenAICodec, parse_json
from gateway.errors import GatewayError
from gateway.pipeline.codec import Stateless
from gateway.pipeline.request import Inbound, Request, nano_float
from gateway.policy import Deployment
from gateway.pricing import Usage, upstream_cost_nano, usage_from_anthropic, usage_from_openai
from gateway.tokens import count_completion_text


def _text_of(blocks: Any) -> str:
    """The text and tool input a Messages content list carries (for the gateway's own output count)."""
    out = []
    for block in blocks if isinstance(blocks, list) else ():
        if isinstance(block, dict):
            for key in ("text", "thinking"):
                if isinstance(block.get(key), str):
                    out.append(block[key])
            if block.get("type") == "tool_use":
                out.append(str(block.get("name") or "") + orjson.dumps(block.get("input") or {}).decode())
    return "".join(out)


def compressed_messages(req: Request) -> list[dict[str, Any]]:
    """The native ``messages`` of a compressed request: traced back (:mod:`.compressed`), or, when that is not
    possible, the compressed chat conversation translated back."""
    before = req.original_body.get("messages") if isinstance(req.original_body, dict) else None
    native = req.native.get("messages")
    if isinstance(before, list) and isinstance(native, list) and req.origins is not None:
        traced = native_messages(native, req.origins, before, req.body["messages"])
        if traced is not None:
            return traced
    shrunk, _ = chat_to_messages(req.body)
    return list(shrunk["messages"])


class MessagesCodec(Stateless):
    endpoint = "messages"

    def __init__(self) -> None:
        self.chat = OpenAICodec("chat")    # the translated path: chat requests and replies
    def decode(self, raw: bytes) -> Any:
        return parse_json(raw)

    def validate(self, inbound: Inbound) -> Request:
        body = inbound.body
        validate_messages(body)
        origins: list[tuple[int, ...]] = []
        chat, dropped = messages_to_chat(body, origins=origins)
        stream = body.get("stream") is True
        req = Request("messages", "chat", chat, body["model"], stream, True, body["max_tokens"], inbound.raw_size,
                      inbound.headers, inbound.request_id, inbound.started)
        req.native, req.dropped, req.origins, req.cache_body = body, dropped, origins, body
        metadata = body.get("metadata")
        req.user = metadata.get("user_id") if isinstance(metadata, dict) else None
        return req

    def wire(self, req: Request, deployment: Deployment) -> str:
        return "messages" if deployment.speaks("messages") else "chat"

    def call_body(self, req: Request, deployment: Deployment) -> tuple[str, dict[str, Any]]:
        if deployment.speaks("messages"):
            body = dict(req.native)
            if req.compression is not None:   # compressed in chat shape: the surviving messages, as sent
                body["messages"] = compressed_messages(req)
            return "messages", body
        return self.chat.call_body(req, deployment)

    def cap_output(self, wire: str, body: dict[str, Any], cap: int, deployment: Deployment) -> None:
        if wire == "messages":
            body["max_tokens"] = cap
        else:
            self.chat.cap_output(wire, body, cap, deployment)

    def reply_usage(self, wire: str, body: dict[str, Any]) -> Usage | None:
        if wire != "messages":
            return self.chat.reply_usage(wire, body)
        usage = body.get("usage")
        return usage_from_anthropic(usage) if isinstance(usage, dict) else None

    def upstream_cost(self, wire: str, body: dict[str, Any]) -> int | None:
        return self.chat.upstream_cost(wire, body) if wire != "messages" else None

    def estimate_output(self, wire: str, body: dict[str, Any], model: str) -> int:
        if wire != "messages":
            return self.chat.estimate_output(wire, body, model)
        return count_completion_text(_text_of(body.get("content")), model)

    def encode_reply(self, req: Request, wire: str, body: dict[str, Any], usage: Usage, cost_nano: int,
                     deployment: Deployment) -> tuple[bytes, dict[str, Any]]:
        reply = body if wire == "messages" else chat_to_messages_reply(body, req.model)
        if not isinstance(reply.get("usage"), dict):
            reply["usage"] = _usage_body(usage)
        reply["usage"]["cost_usd"] = nano_float(cost_nano)
        return orjson.dumps(reply), reply

    def stream(self, req: Request, wire: str, deployment: Deployment, assemble: bool) -> MessagesStream:
        return MessagesStream(req, wire, assemble)

    def replay(self, req: Request, answer: dict[str, Any]) -> tuple[list[bytes], dict[str, Any]]:
        message = replayed(answer)
        return ([orjson.dumps(message)] if not req.stream else replay_events(message)), message

    def error_body(self, exc: GatewayError) -> bytes:
        return error_body(exc)

    def error_headers(self, exc: GatewayError) -> list[tuple[bytes, bytes]]:
        return error_headers(exc)


def _usage_body(usage: Usage) -> dict[str, Any]:
    cached = usage.cached_input_tokens + usage.cache_write_tokens + usage.cache_write_1h_tokens
    return {"input_tokens": max(0, usage.input_tokens - cached), "output_tokens": usage.output_tokens,
            "cache_read_input_tokens": usage.cached_input_tokens,
            "cache_creation_input_tokens": usage.cache_write_tokens + usage.cache_write_1h_tokens}


class MessagesStream:
    """One Messages stream: native events passed through, or chat chunks translated (module docstring)."""

    def __init__(self, req: Request, wire: str, assemble: bool = False) -> None:
        self.req = req
        self.native = wire == "messages"
        self.start_usage: dict[str, Any] = {}
        self.delta_usage: dict[str, Any] = {}
        self.final: dict[str, Any] | None = None        # the held-back message_delta
        self.texts: list[str] = []
        self.chat_usage: dict[str, Any] | None = None
        self.translator = None if self.native else ChatToMessagesStream(req.model, message_id=new_message_id())
        # the events the client gets, folded into the Message for the response cache (a cacheable miss only)
        self.assembler = MessagesAssembler() if assemble else None
        self.finish_seen = False   # translated: the chat stream said how it finished (not cut)

    def feed(self, chunk: dict[str, Any]) -> bytes | None:
        if self.translator is not None:
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                self.chat_usage = usage
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                    self.texts.append(delta["content"])
                if self.assembler is not None and isinstance(choice, dict) and choice.get("finish_reason"):
                    self.finish_seen = True
            events = self.translator.feed(chunk)
            if self.assembler is not None:
                for event in events:
                    self.assembler.add(event)
            return b"".join(encode_event(e) for e in events) or None
        if self.assembler is not None:
            self.assembler.add(chunk)
        kind = chunk.get("type")
        if kind == "message_start":
            message = chunk.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self.start_usage = usage
        elif kind == "content_block_delta":
            delta = chunk.get("delta")
            if isinstance(delta, dict):
                for key in ("text", "thinking", "partial_json"):
                    if isinstance(delta.get(key), str):
                        self.texts.append(delta[key])
        elif kind == "message_delta":
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                self.delta_usage = {**self.delta_usage, **usage}
            self.final = chunk                 # held back: sent with the cost once the stream ends
            return None
        elif kind == "message_stop":
            return None
        return encode_event(chunk)

    def usage(self) -> Usage | None:
        if self.translator is not None:
            return usage_from_openai(self.chat_usage) if self.chat_usage else None
        if not self.start_usage and not self.delta_usage:
            return None
        return usage_from_anthropic({**self.start_usage, **self.delta_usage})

    def upstream_cost(self) -> int | None:
        return upstream_cost_nano(self.chat_usage) if self.chat_usage else None

    def output_tokens(self, model: str) -> int:
        return count_completion_text("".join(self.texts), model)

    def close(self, usage: Usage, cost_nano: int) -> bytes:
        if self.translator is not None:
            events = self.translator.finish(self.chat_usage)
            for event in events:
                if event.get("type") == "message_delta":
                    event["usage"] = {**event.get("usage", {}), "cost_usd": nano_float(cost_nano)}
                if self.assembler is not None and self.finish_seen:   # a cut chat stream is never stored
                    self.assembler.add(event)
            return b"".join(encode_event(e) for e in events)
        final = self.final or {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": usage.output_tokens}}
        final = {**final, "usage": {**(final.get("usage") or {}), "cost_usd": nano_float(cost_nano)}}
        return encode_event(final) + encode_event({"type": "message_stop"})

    def error(self, exc: GatewayError, usage: Usage | None, cost_nano: int) -> bytes:
        return error_event(exc)

    def answer(self) -> dict[str, Any] | None:
        return self.assembler.answer() if self.assembler is not None else None



