"""The Responses codec: OpenAI's Responses API as an inbound surface of the pipeline.

Decoding validates the body (:mod:`.validation`) and translates it once into the chat shape
the stages read (routing, token counts, compression). A ``previous_response_id`` is looked
up in the conversation store for the caller's team (another team's id is unknown, a 400 as
at OpenAI); its deployment is preferred (affinity), and a deployment that does not hold the
response gets the earlier items inlined (:func:`.conversation.native_body`) or, through
translation, as chat history. A deployment that speaks Responses gets the body as sent
(every field kept, the upstream model and the output cap the hold pays for; when compression
ran, on the chat translation, what it kept mapped back onto whole input items with the whole
conversation inlined: :mod:`.compressed`); any other gets the chat translation and its
answer or chat stream is turned back into a Response or Responses events. The final
``response.completed`` (or ``.incomplete`` / ``.failed``) event is held back until the
stream ends, then sent with ``usage.cost_usd``; a JSON Response carries it too. Unless the
request says ``store: false``, the final Response and its conversation are kept for the
team (:mod:`gateway.state.responses_store`). A deterministic request may be answered by the
response cache: keyed on the request with its earlier turns inlined, replayed as a Response or
as a Responses event stream under a fresh id, at $0, and stored (never as held by a deployment)
like any other answer. Errors use OpenAI's envelope.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.api.openai_codec import OpenAICodec, parse_json, usage_dict
from gateway.api.responses.compressed import compressed_input
from gateway.api.responses.conversation import inlined, native_body, previous_not_found, stored_record
from gateway.api.responses.from_chat import chat_to_response, new_response_id, replayed_response
from gateway.api.responses.stream import (
    FINAL_EVENTS,
    ChatToResponsesStream,
    ResponsesStreamTap,
    encode_event,
    replay_events,
)
from gateway.api.responses.to_chat import responses_to_chat
from gateway.api.responses.validation import validate_responses
from gateway.errors import GatewayError, error_body, error_headers
from gateway.pipeline.request import Inbound, Request, nano_float
from gateway.policy import Deployment
from gateway.pricing import Usage, upstream_cost_nano, usage_from_openai, usage_from_responses
from gateway.state.responses_store import ResponsesStore, StoredResponse, should_store
from gateway.tokens import count_completion_text


def output_text(response: dict[str, Any]) -> str:
    """The text of a Response's output items (messages, reasoning, call arguments)."""
    out: list[str] = []
    for item in response.get("output") or ():
        if not isinstance(item, dict):
            continue
        for part in item.get("content") or item.get("summary") or ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
        for key in ("arguments", "input", "name"):
            if isinstance(item.get(key), str):
                out.append(item[key])
    return "".join(out)


class ResponsesCodec:
    endpoint = "responses"
    stateful = True

    def __init__(self, store: ResponsesStore) -> None:
        self.store = store
        self.chat = OpenAICodec("chat")    # the translated path: chat requests and replies

    def decode(self, raw: bytes) -> Any:
        return parse_json(raw)

    def validate(self, inbound: Inbound) -> Request:
        body = inbound.body
        validate_responses(body)
        chat, dropped = responses_to_chat(body)
        limit = body.get("max_output_tokens")
        req = Request("responses", "chat", chat, body["model"], body.get("stream") is True, True,
                      limit if isinstance(limit, int) else None, inbound.raw_size, inbound.headers,
                      inbound.request_id, inbound.started)
        req.native, req.dropped, req.cache_body = body, dropped, body
        req.user = body.get("user") or body.get("safety_identifier")
        return req

    async def load(self, req: Request, team: str) -> None:
        """The earlier turn a ``previous_response_id`` names: its items, and its deployment first."""
        previous = req.native.get("previous_response_id")
        if not isinstance(previous, str) or not previous:
            return
        prior = await self.store.get(previous, team)
        if prior is None:
            raise previous_not_found(previous)
        req.context, req.prefer = prior, prior.deployment
        req.body, req.dropped = responses_to_chat(req.native, prior.history())
        req.cache_body = inlined(req.native, prior)    # the key covers the conversation, not its id

    async def keep(self, req: Request, team: str, deployment: Deployment, answer: dict[str, Any] | None) -> None:
        if answer is None or not should_store(req.native) or not isinstance(answer.get("id"), str):
            return
        prior = req.context if isinstance(req.context, StoredResponse) else None
        upstream_state = deployment.speaks("responses") and req.cache_result != "hit"   # a hit's id is ours
        body, response_id = req.native, answer["id"]
        await self.store.put_later(response_id, lambda: stored_record(
            body, prior, answer, team=team, deployment_id=deployment.id, upstream_state=upstream_state))

    def wire(self, req: Request, deployment: Deployment) -> str:
        return "responses" if deployment.speaks("responses") else "chat"

    def call_body(self, req: Request, deployment: Deployment) -> tuple[str, dict[str, Any]]:
        if deployment.speaks("responses"):
            prior = req.context if isinstance(req.context, StoredResponse) else None
            if req.compression is not None and isinstance(req.original_body, dict):
                # compressed in chat shape: the kept turns' own items, the whole conversation inlined
                body = {k: v for k, v in req.native.items() if k != "previous_response_id"}
                body["input"] = compressed_input(req.native, prior, req.original_body["messages"],
                                                 req.body["messages"])
                return "responses", body
            return "responses", dict(native_body(req.native, prior, deployment.id))
        return self.chat.call_body(req, deployment)

    def cap_output(self, wire: str, body: dict[str, Any], cap: int, deployment: Deployment) -> None:
        if wire == "responses":
            body["max_output_tokens"] = cap
        else:
            self.chat.cap_output(wire, body, cap, deployment)

    def reply_usage(self, wire: str, body: dict[str, Any]) -> Usage | None:
        if wire != "responses":
            return self.chat.reply_usage(wire, body)
        usage = body.get("usage")
        return usage_from_responses(usage) if isinstance(usage, dict) else None

    def upstream_cost(self, wire: str, body: dict[str, Any]) -> int | None:
        usage = body.get("usage")
        return upstream_cost_nano(usage) if isinstance(usage, dict) else None

    def estimate_output(self, wire: str, body: dict[str, Any], model: str) -> int:
        if wire != "responses":
            return self.chat.estimate_output(wire, body, model)
        return count_completion_text(output_text(body), model)

    def encode_reply(self, req: Request, wire: str, body: dict[str, Any], usage: Usage, cost_nano: int,
                     deployment: Deployment) -> tuple[bytes, dict[str, Any]]:
        response = body if wire == "responses" else chat_to_response(body, req.native, new_response_id())
        if not isinstance(response.get("usage"), dict):
            response["usage"] = {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                                 "total_tokens": usage.total_tokens}
        response["usage"]["cost_usd"] = nano_float(cost_nano)
        return orjson.dumps(response), response

    def stream(self, req: Request, wire: str, deployment: Deployment, assemble: bool) -> ResponsesStream:
        return ResponsesStream(req, wire)

    def replay(self, req: Request, answer: dict[str, Any]) -> tuple[list[bytes], dict[str, Any]]:
        response = replayed_response(answer, req.native)
        return ([orjson.dumps(response)] if not req.stream else replay_events(response)), response

    def error_body(self, exc: GatewayError) -> bytes:
        return error_body(exc)

    def error_headers(self, exc: GatewayError) -> list[tuple[bytes, bytes]]:
        return error_headers(exc)


class ResponsesStream:
    """One Responses stream: native events passed through (the final one held back), or chat chunks
    translated into Responses events."""

    def __init__(self, req: Request, wire: str) -> None:
        self.req = req
        self.tap = ResponsesStreamTap() if wire == "responses" else None
        self.final: dict[str, Any] | None = None
        self.chat_usage: dict[str, Any] | None = None
        self.translator = None if self.tap is not None else ChatToResponsesStream(req.native, new_response_id())
        self.sequence = 0

    def feed(self, chunk: dict[str, Any]) -> bytes | None:
        if self.translator is not None:
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                self.chat_usage = usage
            return b"".join(encode_event(e) for e in self.translator.feed(chunk)) or None
        assert self.tap is not None
        self.tap.observe(chunk)
        sequence = chunk.get("sequence_number")
        if isinstance(sequence, int):
            self.sequence = sequence + 1
        if chunk.get("type") in FINAL_EVENTS:
            self.final = chunk            # held back: sent with the cost once the stream ends
            return None
        return encode_event(chunk)

    def usage(self) -> Usage | None:
        if self.translator is not None:
            return usage_from_openai(self.chat_usage) if self.chat_usage else None
        assert self.tap is not None
        return usage_from_responses(self.tap.usage) if self.tap.usage else None

    def upstream_cost(self) -> int | None:
        if self.translator is not None:
            return upstream_cost_nano(self.chat_usage) if self.chat_usage else None
        return None

    def output_tokens(self, model: str) -> int:
        text = self.translator.delivered_text if self.translator is not None else \
            self.tap.delivered_text if self.tap is not None else ""
        return count_completion_text(text, model)

    def close(self, usage: Usage, cost_nano: int) -> bytes:
        if self.translator is not None:
            reported = self.chat_usage if self.chat_usage is not None else usage_dict(usage)
            events = self.translator.finish({**reported, "cost_usd": nano_float(cost_nano)})
            return b"".join(encode_event(e) for e in events)
        if self.final is None:
            return b""
        response = dict(self.final.get("response") or {})
        response["usage"] = {**(response.get("usage") or {}), "cost_usd": nano_float(cost_nano)}
        self.final = {**self.final, "response": response}
        return encode_event(self.final)

    def error(self, exc: GatewayError, usage: Usage | None, cost_nano: int) -> bytes:
        if self.translator is not None:
            events = self.translator.fail(exc.message, exc.code or "server_error")
            return b"".join(encode_event(e) for e in events)
        return encode_event({"type": "error", "code": exc.code, "message": exc.message, "param": None,
                             "sequence_number": self.sequence})

    def answer(self) -> dict[str, Any] | None:
        if self.translator is not None:
            return self.translator.response if self.translator.response.get("status") != "in_progress" else None
        return self.final.get("response") if self.final is not None else None
