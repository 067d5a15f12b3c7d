"""The one small interface every provider implements, and what crosses it.

A provider gets a :class:`Call` (endpoint, OpenAI-shaped body with the upstream
model name already in place, the deployment) and either returns the OpenAI-shaped
response body (``complete``) or yields OpenAI-shaped stream chunks (``stream``).
Providers raise only :mod:`gateway.errors` upstream errors; translating their
own library's or the network's failures is their job, at their boundary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.errors import (
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
)
from gateway.policy import Deployment

ENDPOINT_PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings",
                  "responses": "/responses"}


@dataclass(slots=True)
class Call:
    endpoint: str   # wire format of body: chat, completions, embeddings, messages, responses
    body: dict[str, Any]
    deployment: Deployment
    timeout_s: float
    headers: dict[str, str] = field(default_factory=dict)   # client headers forwarded as is (anthropic-beta, ...)


class Provider(Protocol):
    async def complete(self, call: Call) -> dict[str, Any]: ...

    def stream(self, call: Call) -> AsyncIterator[dict[str, Any]]: ...

    async def aclose(self) -> None: ...


def error_for_status(status: int, message: str, deployment: Deployment, *,
                     code: str | None = None, param: str | None = None,
                     retry_after: str | None = None) -> UpstreamError:
    """Map an upstream HTTP status to the gateway's error tree (one rule for every provider)."""
    where = f"deployment {deployment.id}"
    if status == 429:
        headers = {"retry-after": retry_after} if retry_after else None
        return UpstreamRateLimited(f"{where} is rate limited by the provider: {message}", headers=headers)
    if status in (400, 413, 422):
        rejected = UpstreamRejected(f"{where} rejected the request: {message}",
                                    code=code or "upstream_rejected", param=param)
        if rejected.code == "context_length_exceeded":   # a candidate with a larger window may still fit
            rejected.failure, rejected.retryable = "context_length", True
        return rejected
    if status in (408, 504):
        return UpstreamTimeout(f"{where} timed out upstream (HTTP {status}): {message}")
    if status in (401, 403):
        return UpstreamError(f"{where}: the provider refused the gateway's credentials (HTTP {status}): {message}",
                             failure="auth")
    return UpstreamError(f"{where} failed with HTTP {status}: {message}")


def upstream_message(payload: Any, fallback: str) -> tuple[str, str | None, str | None]:
    """(message, code, param) out of an upstream error body of any common shape."""
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or fallback
            code = err.get("code")
            param = err.get("param")
            return str(msg), str(code) if isinstance(code, (str, int)) else None, \
                str(param) if isinstance(param, str) else None
        if isinstance(err, str):
            return err, None, None
    return fallback, None, None
