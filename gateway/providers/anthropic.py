"""Native Anthropic Messages API upstreams (Anthropic itself, or any compatible server) over the pooled client.

This provider serves calls whose ``endpoint`` is ``messages``: the body goes to
``{api_base}/v1/messages`` exactly as given (every field kept), authenticated
with the deployment's key as ``x-api-key`` (the client's key is never
forwarded), with the client's ``anthropic-version`` (default ``2023-06-01``)
and ``anthropic-beta`` and the deployment's own headers. ``complete`` returns
the reply JSON; ``stream`` yields every SSE event's data dict unchanged, ending
after ``message_stop``; ``count_tokens`` asks ``/v1/messages/count_tokens``
and ``check`` (a health probe) ``GET /v1/models``.
Network and HTTP failures, an ``error`` event and a stream cut before
``message_stop`` become gateway upstream errors here and nowhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson

from gateway.errors import InvalidRequest, UpstreamError, UpstreamTimeout, UpstreamUnreachable
from gateway.policy import Deployment
from gateway.providers.base import Call, error_for_status, upstream_message
from gateway.providers.httpclient import ConnectFailed, HttpClient, HttpClientError, Origin, Response, Timeout
from gateway.providers.openai_compat import MAX_ERROR_BODY, sse_events

USER_AGENT = "llm-gateway/0.1"
DEFAULT_API_BASE = "https://api.anthropic.com"
DEFAULT_VERSION = "2023-06-01"
DRAIN_S = 1.0   # how long the end of a finished stream's body is awaited for connection reuse
FORWARDED = ("anthropic-version", "anthropic-beta")   # the only client headers sent upstream
# an Anthropic error event's type -> the HTTP status it stands for (for error_for_status)
EVENT_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
                "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
                "timeout_error": 504, "overloaded_error": 529}


class _Target:
    """What is fixed per deployment: the origin, the paths and the pre-rendered static headers."""

    __slots__ = ("deployment", "origin", "messages_path", "models_path", "count_path", "headers", "version", "beta")

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.origin = Origin.parse(deployment.api_base or DEFAULT_API_BASE)
        base = self.origin.base_path
        prefix = base if base.endswith("/v1") else base + "/v1"   # api_base may or may not end in /v1
        self.messages_path = prefix + "/messages"
        self.models_path = prefix + "/models"
        self.count_path = prefix + "/messages/count_tokens"
        lines = [f"User-Agent: {USER_AGENT}", "Content-Type: application/json", "Accept: application/json"]
        if deployment.api_key:
            lines.append(f"x-api-key: {deployment.api_key}")
        self.version: str | None = None
        self.beta: list[str] = []
        for name, value in deployment.headers:
            low = name.lower()
            if low == "anthropic-version":
                self.version = value
            elif low == "anthropic-beta":
                self.beta = _beta_list(value)
            else:
                lines.append(f"{name}: {value}")
        self.headers = "".join(f"{line}\r\n" for line in lines).encode("latin-1")

    def render(self, call_headers: dict[str, str]) -> bytes:
        """Static headers plus the version (the deployment's, else the client's, else the default)
        and the union of the deployment's and the client's beta flags."""
        client = {k.lower(): v for k, v in call_headers.items() if k.lower() in FORWARDED}
        version = self.version or _clean(client.get("anthropic-version"), "anthropic-version") or DEFAULT_VERSION
        beta = list(self.beta)
        for flag in _beta_list(_clean(client.get("anthropic-beta"), "anthropic-beta") or ""):
            if flag not in beta:
                beta.append(flag)
        extra = f"anthropic-version: {version}\r\n"
        if beta:
            extra += f"anthropic-beta: {','.join(beta)}\r\n"
        return self.headers + extra.encode("latin-1")


def _beta_list(value: str) -> list[str]:
    return [flag.strip() for flag in value.split(",") if flag.strip()]


def _clean(value: str | None, name: str) -> str | None:
    """A client header value safe to write into a request head (visible ASCII and spaces only)."""
    if value is None:
        return None
    if not all(" " <= c <= "~" or c == "\t" for c in value):
        raise InvalidRequest(f"The {name} header holds characters that cannot be forwarded.", param=name)
    return value.strip() or None


class AnthropicProvider:
    def __init__(self, client: HttpClient) -> None:
        self.client = client
        self._targets: dict[int, _Target] = {}

    def _target(self, deployment: Deployment) -> _Target:
        target = self._targets.get(id(deployment))
        if target is None or target.deployment is not deployment:
            target = _Target(deployment)
            self._targets[id(deployment)] = target
        return target

    async def _send(self, call: Call, path: str | None = None) -> Response:
        if call.endpoint not in ("messages", "count_tokens"):
            raise UpstreamError(f"deployment {call.deployment.id} speaks the Messages API only, "
                                f"not {call.endpoint!r}", failure="rejected")
        target = self._target(call.deployment)
        try:
            resp = await self.client.request("POST", target.origin, path or target.messages_path,
                                             target.render(call.headers), orjson.dumps(call.body), call.timeout_s)
        except HttpClientError as exc:
            raise _translate(exc, call.deployment) from None
        if resp.status >= 400:
            try:
                raw = await resp.read_prefix(MAX_ERROR_BODY)
            except HttpClientError:
                raw = b""
            raise _status_error(resp, raw, call.deployment)
        return resp

    async def _json(self, call: Call, path: str | None = None) -> dict[str, Any]:
        resp = await self._send(call, path)
        try:
            raw = await resp.read()
        except HttpClientError as exc:
            raise _translate(exc, call.deployment) from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"deployment {call.deployment.id} returned invalid JSON") from None
        if not isinstance(body, dict):
            raise UpstreamError(f"deployment {call.deployment.id} returned a non-object JSON body")
        return body

    async def complete(self, call: Call) -> dict[str, Any]:
        return await self._json(call)

    async def count_tokens(self, call: Call) -> int:
        """Input tokens of ``call.body`` by the upstream's ``/v1/messages/count_tokens``."""
        body = await self._json(call, self._target(call.deployment).count_path)
        tokens = body.get("input_tokens")
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise UpstreamError(f"deployment {call.deployment.id} answered count_tokens without input_tokens")
        return tokens

    async def stream(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        resp = await self._send(call)
        deployment = call.deployment
        try:
            async for data in sse_events(resp, call.timeout_s):
                try:
                    event = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise UpstreamError(f"deployment {deployment.id} sent an invalid stream event") from None
                if not isinstance(event, dict):
                    raise UpstreamError(f"deployment {deployment.id} sent a non-object stream event")
                kind = event.get("type")
                if kind == "error":
                    raise _event_error(event, deployment)
                yield event
                if kind == "message_stop":
                    await _drain(resp, call.timeout_s)
                    return
            raise UpstreamError(f"deployment {deployment.id} ended the stream before message_stop")
        except HttpClientError as exc:
            raise _translate(exc, deployment) from None
        finally:
            resp.close()

    async def check(self, deployment: Deployment, timeout_s: float) -> None:
        """A health check: ``GET {api_base}/v1/models`` must answer 2xx within ``timeout_s``."""
        target = self._target(deployment)
        try:
            resp = await self.client.request("GET", target.origin, target.models_path, target.render({}), b"",
                                             timeout_s)
            await resp.read()
        except HttpClientError as exc:
            raise _translate(exc, deployment) from None
        if resp.status >= 300:
            raise UpstreamError(f"deployment {deployment.id} health check answered HTTP {resp.status}")

    async def aclose(self) -> None:
        self._targets.clear()


async def _drain(resp: Response, timeout: float) -> None:
    """Read the end of the body after ``message_stop`` (briefly) so the connection can be reused."""
    try:
        await asyncio.wait_for(resp.read(), min(timeout, DRAIN_S))
    except (HttpClientError, TimeoutError):
        pass   # closed below; the stream itself is complete


def _event_error(event: dict[str, Any], deployment: Deployment) -> UpstreamError:
    error = event.get("error")
    kind = error.get("type") if isinstance(error, dict) else None
    message, _, _ = upstream_message(event, "stream error")
    status = EVENT_STATUS.get(kind, 500) if isinstance(kind, str) else 500
    return error_for_status(status, f"mid-stream {kind or 'error'}: {message}", deployment,
                            kind=kind if isinstance(kind, str) else None)


def _status_error(resp: Response, raw: bytes, deployment: Deployment) -> UpstreamError:
    try:
        payload = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        payload = None
    fallback = raw[:300].decode("utf-8", "replace") or f"HTTP {resp.status}"
    message, code, param = upstream_message(payload, fallback)
    if resp.status == 400 and message.startswith("prompt is too long"):
        code = "context_length_exceeded"   # Anthropic's wording; a larger window may still fit
    retry_after = resp.header(b"retry-after")
    error = payload.get("error") if isinstance(payload, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    return error_for_status(resp.status, message, deployment, code=code, param=param,
                            retry_after=retry_after.decode("latin-1") if retry_after else None,
                            kind=kind if isinstance(kind, str) else None)


def _translate(exc: HttpClientError, deployment: Deployment) -> UpstreamError:
    if isinstance(exc, Timeout):
        return UpstreamTimeout(f"deployment {deployment.id} timed out")
    if isinstance(exc, ConnectFailed):
        return UpstreamUnreachable(f"deployment {deployment.id} is unreachable: {exc}")
    return UpstreamError(f"deployment {deployment.id} broke the connection: {exc}")
