"""OpenAI-compatible upstreams (OpenAI, vLLM, Ollama, llama.cpp, ...) over the pooled client.

The fast path: the request body is serialised once and written to a kept-alive
connection; the response is parsed once. Streams are read as server-sent events
and yielded as chunk dicts. Network and HTTP failures become gateway upstream
errors here and nowhere else (through :class:`upstream_errors` and
:func:`error_for_status`, which keep upstream text and hosts out of client messages).

Timeouts: a non-streaming call (connect, headers, whole body) must finish within the
deployment's ``timeout_s`` (the call's ``timeout_s``), however slowly bytes trickle in.
A stream must deliver its headers and first event within that deadline; after that
the same value is an idle limit between events (each event restarts it), so a long
stream may run as long as events keep coming. One SSE line (and one event's data) may
hold at most :data:`MAX_EVENT_BYTES`; a longer one fails the stream with an
``UpstreamError`` instead of growing memory. An upstream that answers a stream request
with a plain JSON completion (it ignored ``stream``) is converted into stream chunks,
its usage in a final usage chunk; a 200 that is neither JSON nor SSE (by
``content-type``; none means SSE) is an ``UpstreamError`` so the route falls back.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson

from gateway.errors import UpstreamError
from gateway.policy import Deployment
from gateway.providers.base import ENDPOINT_PATHS, Call, error_for_status, upstream_kind, upstream_message
from gateway.providers.httpclient import (
    HttpClient,
    HttpClientError,
    Origin,
    ProtocolViolation,
    Response,
    upstream_errors,
)
from gateway.providers.redaction import identifier, redact, secrets_of

log = logging.getLogger("gateway")

MAX_EVENT_BYTES = 1 << 20       # one SSE line, and one event's joined data, at most (1 MiB)
MAX_ERROR_BODY = 64 << 10       # bytes of an upstream error body read (for the log); the rest is dropped

USER_AGENT = "llm-gateway/0.1"


class _Target:
    __slots__ = ("deployment", "label", "origin", "paths", "headers")

    def __init__(self, deployment: Deployment) -> None:
        assert deployment.api_base is not None
        self.deployment = deployment
        self.label = f"deployment {deployment.id}"
        self.origin = Origin.parse(deployment.api_base)
        self.paths = {k: self.origin.base_path + v for k, v in ENDPOINT_PATHS.items()}
        lines = [f"User-Agent: {USER_AGENT}", "Content-Type: application/json", "Accept: */*"]
        if deployment.api_key:
            lines.append(f"Authorization: Bearer {deployment.api_key}")
        lines.extend(f"{k}: {v}" for k, v in deployment.headers)
        self.headers = "".join(f"{line}\r\n" for line in lines).encode("latin-1")


class OpenAICompatProvider:
    def __init__(self, client: HttpClient) -> None:
        self.client = client
        self._targets: dict[int, _Target] = {}

    def _target(self, deployment: Deployment) -> _Target:
        target = self._targets.get(id(deployment))
        if target is None or target.deployment is not deployment:
            target = _Target(deployment)
            self._targets[id(deployment)] = target
        return target

    async def _send(self, call: Call, target: _Target) -> Response:
        resp = await self.client.request(
            "POST", target.origin, target.paths[call.endpoint], target.headers,
            orjson.dumps(call.body), call.timeout_s,
        )
        if resp.status >= 400:
            try:
                raw = await resp.read_prefix(MAX_ERROR_BODY)
            except HttpClientError:
                raw = b""
            raise _status_error(resp, raw, call.deployment)
        return resp

    async def complete(self, call: Call) -> dict[str, Any]:
        target = self._target(call.deployment)
        with upstream_errors(target.label):
            resp = await self._send(call, target)
            raw = await resp.read()
        return _json_object(raw, call.deployment)

    async def stream(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        target = self._target(call.deployment)
        deployment = call.deployment
        resp: Response | None = None
        with upstream_errors(target.label):
            try:
                resp = await self._send(call, target)
                ctype = resp.header(b"content-type")
                if ctype is not None and not ctype.startswith(b"text/event-stream") and \
                        not ctype.lower().startswith(b"text/event-stream"):
                    if b"json" not in ctype.lower():        # neither SSE nor JSON: a bad answer, fall back
                        log.warning("%s answered a stream request with content-type %r", target.label,
                                    redact(ctype.decode("latin-1"))[:100])
                        raise UpstreamError(f"{target.label} answered a stream request with neither "
                                            f"server-sent events nor JSON", failure="server_error")
                    body = _json_object(await resp.read(), deployment)   # it ignored "stream": convert
                    for chunk in _as_chunks(body, call.endpoint, deployment):
                        yield chunk
                    return
                async for event in sse_events(resp, call.timeout_s):
                    if event == b"[DONE]":
                        return
                    try:
                        chunk = orjson.loads(event)
                    except orjson.JSONDecodeError:
                        raise UpstreamError(f"{target.label} sent an invalid stream event") from None
                    if isinstance(chunk, dict):
                        if "error" in chunk and "choices" not in chunk:
                            raise _stream_error(chunk, deployment)
                        yield chunk
            finally:
                if resp is not None:
                    resp.close()

    async def check(self, deployment: Deployment, timeout_s: float) -> None:
        """A health check: ``GET {api_base}/models`` must answer 2xx within ``timeout_s``."""
        target = self._target(deployment)
        with upstream_errors(target.label):
            resp = await self.client.request("GET", target.origin, target.origin.base_path + "/models",
                                             target.headers, b"", timeout_s)
            await resp.read()
        if resp.status >= 300:
            raise UpstreamError(f"{target.label} health check answered HTTP {resp.status}")

    async def aclose(self) -> None:
        self._targets.clear()


async def sse_events(resp: Response, idle: float, limit: int = MAX_EVENT_BYTES) -> AsyncIterator[bytes]:
    """The ``data`` payload of each server-sent event (multi-line data joined by newlines).

    The first event must arrive by the response's deadline (the call's); each later one within
    ``idle`` seconds of the one before (of the first wait for more after it, precisely: the clock is
    read only when a wait begins). A line or an event's data over ``limit`` bytes raises
    :class:`ProtocolViolation`.
    """
    resp.idle = idle
    buffer = b""
    data: list[bytes] = []
    async for chunk in resp.iter_chunks():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        if len(buffer) > limit:
            raise ProtocolViolation(f"stream line of more than {limit} bytes without a newline",
                                    "stream event too large")
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    yield b"\n".join(data)
                    resp.rearm = True
                    data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
                if len(data) > 1 and sum(map(len, data)) > limit:
                    raise ProtocolViolation(f"stream event of more than {limit} bytes", "stream event too large")
            # comments (":"), "event:", "id:" and "retry:" lines carry nothing we use
    if buffer.startswith(b"data:"):
        data.append(buffer[5:].lstrip(b" "))
    if data:
        yield b"\n".join(data)


def _json_object(raw: bytes, deployment: Deployment) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamError(f"deployment {deployment.id} returned invalid JSON") from None
    if not isinstance(body, dict):
        raise UpstreamError(f"deployment {deployment.id} returned a non-object JSON body")
    return body


_MESSAGE_AS_DELTA = ("role", "content", "refusal", "reasoning_content", "reasoning", "audio")


def _as_chunks(body: dict[str, Any], endpoint: str, deployment: Deployment) -> Iterator[dict[str, Any]]:
    """A whole completion (from an upstream that ignored ``stream``) as the stream it should have sent:
    per choice a content chunk and a finish chunk, then a usage chunk with ``choices: []``."""
    if "error" in body and "choices" not in body:
        raise _stream_error(body, deployment)
    choices = body.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise UpstreamError(f"deployment {deployment.id} answered a stream request with JSON that is no completion")
    text = endpoint == "completions"
    base: dict[str, Any] = {"id": body.get("id") or "", "object": "text_completion" if text else
                            "chat.completion.chunk", "created": body.get("created") or 0,
                            "model": body.get("model") or deployment.upstream_model}
    if body.get("system_fingerprint") is not None:
        base["system_fingerprint"] = body["system_fingerprint"]
    for position, choice in enumerate(choices):
        index = choice.get("index", position)
        if text:
            yield {**base, "choices": [{"index": index, "text": choice.get("text") or "",
                                        "logprobs": choice.get("logprobs"), "finish_reason": None}]}
            yield {**base, "choices": [{"index": index, "text": "", "logprobs": None,
                                        "finish_reason": choice.get("finish_reason") or "stop"}]}
            continue
        message = choice.get("message")
        message = message if isinstance(message, dict) else {}
        delta: dict[str, Any] = {k: message[k] for k in _MESSAGE_AS_DELTA if message.get(k) is not None}
        delta.setdefault("role", "assistant")
        calls = message.get("tool_calls")
        if isinstance(calls, list) and calls:
            delta["tool_calls"] = [{"index": i, **call} if isinstance(call, dict) else call
                                   for i, call in enumerate(calls)]
        first: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": None}
        if choice.get("logprobs") is not None:
            first["logprobs"] = choice["logprobs"]
        yield {**base, "choices": [first]}
        yield {**base, "choices": [{"index": index, "delta": {},
                                    "finish_reason": choice.get("finish_reason") or "stop"}]}
    usage = body.get("usage")
    if isinstance(usage, dict):
        yield {**base, "choices": [], "usage": usage}


def _stream_error(payload: dict[str, Any], deployment: Deployment) -> UpstreamError:
    """An error object inside a 200 stream (or JSON body): a clean message, the details logged."""
    secrets = secrets_of(deployment)
    message, code, _ = upstream_message(payload, "stream error")
    log.warning("deployment %s failed mid-stream: %s", deployment.id, redact(message, secrets))
    tag = identifier(code, secrets) or identifier(upstream_kind(payload), secrets)
    return UpstreamError(f"deployment {deployment.id} failed mid-stream" + (f" ({tag})" if tag else ""))


def _status_error(resp: Response, raw: bytes, deployment: Deployment) -> UpstreamError:
    try:
        payload = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        payload = None
    fallback = raw.decode("utf-8", "replace") or f"HTTP {resp.status}"
    message, code, param = upstream_message(payload, fallback)
    retry_after = resp.header(b"retry-after")
    return error_for_status(resp.status, message, deployment, code=code, param=param,
                            retry_after=retry_after.decode("latin-1") if retry_after else None,
                            kind=upstream_kind(payload))
