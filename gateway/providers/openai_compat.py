"""OpenAI-compatible upstreams (OpenAI, vLLM, Ollama, llama.cpp, ...) over the pooled client.

The fast path: the request body is serialised once and written to a kept-alive
connection; the response is parsed once. Streams are read as server-sent events
and yielded as chunk dicts. Network and HTTP failures become gateway upstream
errors here and nowhere else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from gateway.policy import Deployment
from gateway.providers.base import ENDPOINT_PATHS, Call, error_for_status, upstream_message
from gateway.providers.httpclient import ConnectFailed, HttpClient, HttpClientError, Origin, Response, Timeout

USER_AGENT = "llm-gateway/0.1"


class _Target:
    __slots__ = ("deployment", "origin", "paths", "headers")

    def __init__(self, deployment: Deployment) -> None:
        assert deployment.api_base is not None
        self.deployment = deployment
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

    async def _send(self, call: Call) -> Response:
        target = self._target(call.deployment)
        try:
            resp = await self.client.request(
                "POST", target.origin, target.paths[call.endpoint], target.headers,
                orjson.dumps(call.body), call.timeout_s,
            )
        except HttpClientError as exc:
            raise _translate(exc, call.deployment) from None
        if resp.status >= 400:
            try:
                raw = await resp.read(call.timeout_s)
            except HttpClientError:
                raw = b""
            raise _status_error(resp, raw, call.deployment)
        return resp

    async def complete(self, call: Call) -> dict[str, Any]:
        resp = await self._send(call)
        try:
            raw = await resp.read(call.timeout_s)
        except HttpClientError as exc:
            raise _translate(exc, call.deployment) from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"deployment {call.deployment.id} returned invalid JSON") from None
        if not isinstance(body, dict):
            raise UpstreamError(f"deployment {call.deployment.id} returned a non-object JSON body")
        return body

    async def stream(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        resp = await self._send(call)
        deployment = call.deployment
        try:
            async for event in _sse_events(resp, call.timeout_s):
                if event == b"[DONE]":
                    return
                try:
                    chunk = orjson.loads(event)
                except orjson.JSONDecodeError:
                    raise UpstreamError(f"deployment {deployment.id} sent an invalid stream event") from None
                if isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk:
                    msg, _, _ = upstream_message(chunk, "stream error")
                    raise UpstreamError(f"deployment {deployment.id} failed mid-stream: {msg}")
                if isinstance(chunk, dict):
                    yield chunk
        except HttpClientError as exc:
            raise _translate(exc, deployment) from None
        finally:
            resp.close()

    async def check(self, deployment: Deployment, timeout_s: float) -> None:
        """A health check: ``GET {api_base}/models`` must answer 2xx within ``timeout_s``."""
        target = self._target(deployment)
        try:
            resp = await self.client.request("GET", target.origin, target.origin.base_path + "/models",
                                             target.headers, b"", timeout_s)
            await resp.read(timeout_s)
        except HttpClientError as exc:
            raise _translate(exc, deployment) from None
        if resp.status >= 300:
            raise UpstreamError(f"deployment {deployment.id} health check answered HTTP {resp.status}")

    async def aclose(self) -> None:
        self._targets.clear()


async def _sse_events(resp: Response, timeout: float) -> AsyncIterator[bytes]:
    """The ``data`` payload of each server-sent event (multi-line data joined by newlines)."""
    buffer = b""
    data: list[bytes] = []
    async for chunk in resp.iter_chunks(timeout):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    yield b"\n".join(data)
                    data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
            # comments (":"), "event:", "id:" and "retry:" lines carry nothing we use
    if buffer.startswith(b"data:"):
        data.append(buffer[5:].lstrip(b" "))
    if data:
        yield b"\n".join(data)


def _status_error(resp: Response, raw: bytes, deployment: Deployment) -> UpstreamError:
    try:
        payload = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        payload = None
    fallback = raw[:300].decode("utf-8", "replace") or f"HTTP {resp.status}"
    message, code, param = upstream_message(payload, fallback)
    retry_after = resp.header(b"retry-after")
    return error_for_status(resp.status, message, deployment, code=code, param=param,
                            retry_after=retry_after.decode("latin-1") if retry_after else None)


def _translate(exc: HttpClientError, deployment: Deployment) -> UpstreamError:
    if isinstance(exc, Timeout):
        return UpstreamTimeout(f"deployment {deployment.id} timed out")
    if isinstance(exc, ConnectFailed):
        return UpstreamUnreachable(f"deployment {deployment.id} is unreachable: {exc}")
    return UpstreamError(f"deployment {deployment.id} broke the connection: {exc}")
