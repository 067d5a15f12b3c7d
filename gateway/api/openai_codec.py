"""The OpenAI codec: chat completions, legacy completions and embeddings as clients send them.

Decoding parses the JSON body, refuses input the gateway cannot carry (nesting deeper than
an upstream call can be serialised with), validates the fields the gateway reads
(:mod:`gateway.api.openai_validation`) and returns the typed request. Replies are OpenAI's
own shape, passed through with ``usage.cost_usd`` added (and the gateway's estimated usage
when the upstream reported none). A stream is relayed chunk by chunk; the upstream's usage
chunk (the gateway always asks for one) is held back and sent last, with ``cost_usd``, only
when the client asked for it (``stream_options.include_usage``), then ``[DONE]``; a failure
after the first byte ends the stream with an error event. Errors use OpenAI's envelope.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.api import openai_sse
from gateway.api.openai_validation import validate
from gateway.budgets.rules import cap_output, requested_output
from gateway.errors import GatewayError, InvalidRequest, error_body, error_headers
from gateway.pipeline.codec import Stateless
from gateway.pipeline.request import Inbound, Request, nano_float
from gateway.policy import Deployment
from gateway.pricing import Usage, upstream_cost_nano, usage_from_openai
from gateway.tokens import count_completion_text
from gateway.usage import UPSTREAM_COST_KEY

MAX_DEPTH = 128     # nesting the gateway accepts; upstream serialisers give up at a few hundred


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or a 400 for malformed or too deeply nested input."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json",
                             param="body") from None
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and depth(body) > MAX_DEPTH:
        raise InvalidRequest(f"The request body is nested more than {MAX_DEPTH} levels deep.",
                             code="invalid_json", param="body")
    return body


def depth(value: Any) -> int:
    """How deeply ``value`` nests lists and objects (iteratively: no recursion limit to hit)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in item if isinstance(child, (dict, list)))
    return deepest


def choice_text(choice: dict[str, Any]) -> str:
    """The text a choice (or a stream delta) carries: content, or tool names and arguments."""
    if isinstance(choice.get("text"), str):
        return str(choice["text"])
    message = choice.get("message") or choice.get("delta") or {}
    if not isinstance(message, dict):
        return ""
    parts = [message.get("content") or ""]
    for call in message.get("tool_calls") or ():
        fn = (call.get("function") or {}) if isinstance(call, dict) else {}
        if isinstance(fn, dict):
            parts.append(str(fn.get("name") or "") + str(fn.get("arguments") or ""))
    return "".join(p if isinstance(p, str) else "" for p in parts)


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens, "estimated": usage.estimated}


def _frame(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class OpenAICodec(Stateless):
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint       # chat | completions | embeddings

    def decode(self, raw: bytes) -> Any:
        return parse_json(raw)

    def validate(self, inbound: Inbound) -> Request:
        body = inbound.body
        model = validate(self.endpoint, body)
        stream = body.get("stream") is True and self.endpoint != "embeddings"
        opts = body.get("stream_options")
        req = Request(self.endpoint, self.endpoint, body, model, stream,
                      stream and isinstance(opts, dict) and opts.get("include_usage") is True,
                      requested_output(body), inbound.raw_size, inbound.headers, inbound.request_id,
                      inbound.started)
        req.user = body.get("user")
        return req

    def wire(self, req: Request, deployment: Deployment) -> str:
        return req.shape

    def call_body(self, req: Request, deployment: Deployment) -> tuple[str, dict[str, Any]]:
        body = dict(req.body)
        if req.stream:   # the gateway always asks for the usage chunk; the client sees it only if it asked
            opts = body.get("stream_options")
            body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
        return req.shape, body

    def cap_output(self, wire: str, body: dict[str, Any], cap: int, deployment: Deployment) -> None:
        cap_output(body, cap, deployment, wire)

    def reply_usage(self, wire: str, body: dict[str, Any]) -> Usage | None:
        usage = body.get("usage")
        return usage_from_openai(usage if isinstance(usage, dict) else None, service_tier=body.get("service_tier"))

    def upstream_cost(self, wire: str, body: dict[str, Any]) -> int | None:
        usage = body.get("usage")
        return upstream_cost_nano(usage) if isinstance(usage, dict) else None

    def estimate_output(self, wire: str, body: dict[str, Any], model: str) -> int:
        return sum(count_completion_text(choice_text(c), model) for c in body.get("choices") or ()
                   if isinstance(c, dict))

    def encode_reply(self, req: Request, wire: str, body: dict[str, Any], usage: Usage, cost_nano: int,
                     deployment: Deployment) -> tuple[bytes, dict[str, Any]]:
        if not isinstance(body.get("usage"), dict):   # the upstream reported none: the gateway's count
            body["usage"] = usage_dict(usage)
        body["usage"].pop(UPSTREAM_COST_KEY, None)
        body["usage"]["cost_usd"] = nano_float(cost_nano)
        return orjson.dumps(body), body

    def stream(self, req: Request, wire: str, deployment: Deployment, assemble: bool) -> OpenAIStream:
        return OpenAIStream(req, deployment, assemble)

    def replay(self, req: Request, answer: dict[str, Any]) -> tuple[list[bytes], dict[str, Any]]:
        if req.stream:
            return openai_sse.replay_events(answer, req.endpoint, req.wants_usage), answer
        if isinstance(answer.get("usage"), dict):
            answer = {**answer, "usage": {**answer["usage"], "cost_usd": 0.0}}
        return [orjson.dumps(answer)], answer

    def error_body(self, exc: GatewayError) -> bytes:
        return error_body(exc)

    def error_headers(self, exc: GatewayError) -> list[tuple[bytes, bytes]]:
        return error_headers(exc)


class OpenAIStream:
    """Relays one OpenAI stream (see the module docstring)."""

    __slots__ = ("req", "deployment", "texts", "reported", "usage_chunk", "assembler", "service_tier")

    def __init__(self, req: Request, deployment: Deployment, assemble: bool) -> None:
        self.req = req
        self.deployment = deployment
        self.texts: dict[int, list[str]] = {}
        self.reported: dict[str, Any] | None = None
        self.usage_chunk: dict[str, Any] | None = None
        self.assembler = openai_sse.StreamAssembler(req.endpoint) if assemble else None
        self.service_tier: Any = None

    def feed(self, chunk: dict[str, Any]) -> bytes | None:
        if self.assembler is not None:
            self.assembler.add(chunk)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.reported = usage
            self.service_tier = chunk.get("service_tier")
            if UPSTREAM_COST_KEY in usage:   # the upstream's own cost: for the drift counter, never the client
                usage = {k: v for k, v in usage.items() if k != UPSTREAM_COST_KEY}
                chunk = {**chunk, "usage": usage}
        choices = chunk.get("choices")
        if isinstance(usage, dict) and not choices:
            self.usage_chunk = chunk           # held back: priced, then sent last if asked for
            return None
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    index = choice.get("index", 0)
                    self.texts.setdefault(index if isinstance(index, int) else 0, []).append(choice_text(choice))
        if usage is not None and not self.req.wants_usage:
            chunk = {k: v for k, v in chunk.items() if k != "usage"}
        return _frame(chunk)

    def usage(self) -> Usage | None:
        return usage_from_openai(self.reported, service_tier=self.service_tier) if self.reported else None

    def upstream_cost(self) -> int | None:
        return upstream_cost_nano(self.reported) if self.reported else None

    def output_tokens(self, model: str) -> int:
        return sum(count_completion_text("".join(parts), model) for parts in self.texts.values())

    def _usage_event(self, usage: Usage | None, cost_nano: int) -> bytes:
        if not self.req.wants_usage or usage is None:
            return b""
        chunk = self.usage_chunk
        if chunk is None:
            chunk = {"id": f"chatcmpl-{self.req.request_id}", "object": "chat.completion.chunk",
                     "created": int(time.time()), "model": self.deployment.upstream_model,
                     "choices": [], "usage": usage_dict(usage)}
        usage_body = chunk["usage"] if isinstance(chunk.get("usage"), dict) else usage_dict(usage)
        return _frame({**chunk, "usage": {**usage_body, "cost_usd": nano_float(cost_nano)}})

    def close(self, usage: Usage, cost_nano: int) -> bytes:
        return self._usage_event(usage, cost_nano) + b"data: [DONE]\n\n"

    def error(self, exc: GatewayError, usage: Usage | None, cost_nano: int) -> bytes:
        return self._usage_event(usage, cost_nano) + _frame(exc.body())

    def answer(self) -> dict[str, Any] | None:
        if self.assembler is None or not self.assembler.complete():
            return None
        return self.assembler.answer()
