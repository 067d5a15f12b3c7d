"""The one small interface every provider implements, and what crosses it.

A provider gets a :class:`Call` (endpoint, OpenAI-shaped body with the upstream
model name already in place, the deployment) and either returns the OpenAI-shaped
response body (``complete``) or yields OpenAI-shaped stream chunks (``stream``).
Providers raise only :mod:`gateway.errors` upstream errors; translating their
own library's or the network's failures is their job, at their boundary, and
:func:`error_for_status` is the one rule from an upstream HTTP status to an error
whose client message holds no upstream text (the text is logged, redacted).
"""

from __future__ import annotations

import logging
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
from gateway.providers.redaction import identifier, redact, retry_after_value, secrets_of

log = logging.getLogger("gateway")

ENDPOINT_PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings",
                  "responses": "/responses"}


@dataclass(slots=True)
class Call:
    endpoint: str   # wire format of body: chat, completions, embeddings, messages, responses
    body: dict[str, Any]
    deployment: Deployment
    timeout_s: float    # the call's deadline; a stream's until its first chunk, then the idle limit between chunks
    headers: dict[str, str] = field(default_factory=dict)   # client headers forwarded as is (anthropic-beta, ...)


class Provider(Protocol):
    async def complete(self, call: Call) -> dict[str, Any]: ...

    def stream(self, call: Call) -> AsyncIterator[dict[str, Any]]: ...

    async def aclose(self) -> None: ...


def error_for_status(status: int, message: str, deployment: Deployment, *,
                     code: str | None = None, param: str | None = None,
                     retry_after: str | None = None, kind: str | None = None) -> UpstreamError:
    """Map an upstream HTTP status to the gateway's error tree (one rule for every provider).

    ``message`` is the upstream's own text: it is logged with secrets redacted and never
    reaches the client, whose message names the deployment, the status and a fixed reason,
    plus the upstream's ``code`` (or else its error ``kind``/type) when that is a short
    identifier. ``param`` and ``retry-after`` pass only when well-formed.
    """
    secrets = secrets_of(deployment)
    log.warning("deployment %s answered HTTP %d: %s", deployment.id, status, redact(message, secrets))
    safe_code = identifier(code, secrets)
    tag = safe_code or identifier(kind, secrets)
    detail = f"HTTP {status}, {tag}" if tag else f"HTTP {status}"
    where = f"deployment {deployment.id}"
    if status == 429:
        wait = retry_after_value(retry_after)
        return UpstreamRateLimited(f"{where} is rate limited by the provider ({detail})",
                                   headers={"retry-after": wait} if wait else None)
    if status in (400, 413, 422):
        rejected = UpstreamRejected(f"{where} rejected the request ({detail})",
                                    code=safe_code or "upstream_rejected", param=_param(param, secrets))
        if rejected.code == "context_length_exceeded":   # a candidate with a larger window may still fit
            rejected.failure, rejected.retryable = "context_length", True
        return rejected
    if status in (408, 504):
        return UpstreamTimeout(f"{where} timed out upstream ({detail})")
    if status in (401, 403):
        return UpstreamError(f"{where}: the provider refused the gateway's credentials ({detail})",
                             failure="auth")
    if status >= 500:
        return UpstreamError(f"{where} failed with a server error ({detail})")
    return UpstreamError(f"{where} failed ({detail})")


def _param(param: str | None, secrets: tuple[str, ...]) -> str | None:
    """An upstream ``param`` such as ``messages[0].content``, if it looks like one."""
    if param is None or len(param) > 64:
        return None
    return param if identifier(param.replace("[", "_").replace("]", "_"), secrets) else None


def upstream_kind(payload: Any) -> str | None:
    """The ``type`` of an upstream error body (``{"error": {"type": ...}}`` or Anthropic's), if any."""
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict) and isinstance(err.get("type"), str):
            return str(err["type"])
    return None


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
