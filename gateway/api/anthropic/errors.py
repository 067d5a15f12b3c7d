"""Gateway errors in Anthropic's error envelope, for the Messages API edge.

This module owns the mapping from the gateway's error tree (HTTP status and
``code``) to Anthropic's ``{"type": "error", "error": {"type", "message"}}``
shape, for a JSON reply (:func:`error_body`) and for a stream that has already
started (:func:`error_event`, an SSE ``error`` event), and the reply headers
(:func:`error_headers`: ``x-should-retry: false`` where retrying cannot help, which
the Anthropic SDKs and Claude Code obey instead of retrying every 429). The
gateway's own code stays readable at the front of the message, e.g.
``budget_exceeded: ...``.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import GatewayError

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


NO_RETRY_CODES = frozenset({"budget_exceeded"})   # a spent budget does not refill within a retry's backoff


def error_type_for(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status (other 4xx: invalid request, other 5xx: api error)."""
    known = ERROR_TYPES.get(status)
    if known is not None:
        return known
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_object(exc: GatewayError, request_id: str | None = None) -> dict[str, Any]:
    """The envelope as a dict: ``{"type": "error", "error": {...}}`` (plus ``request_id`` when given)."""
    message = f"{exc.code}: {exc.message}" if exc.code else exc.message
    envelope: dict[str, Any] = {"type": "error",
                                "error": {"type": error_type_for(exc.status_code), "message": message}}
    if request_id:
        envelope["request_id"] = request_id
    return envelope


def error_body(exc: GatewayError, request_id: str | None = None) -> bytes:
    """A JSON error reply body in Anthropic's envelope (the HTTP status stays ``exc.status_code``)."""
    return orjson.dumps(error_object(exc, request_id))


def error_event(exc: GatewayError, request_id: str | None = None) -> bytes:
    """The ``error`` server-sent event that ends a Messages stream which has already started."""
    return b"event: error\ndata: " + orjson.dumps(error_object(exc, request_id)) + b"\n\n"


def error_headers(exc: GatewayError) -> list[tuple[bytes, bytes]]:
    """Headers of a JSON error reply: content type, the error's own (``retry-after``, ...) and
    ``x-should-retry: false`` for errors no retry can cure."""
    headers = [(b"content-type", b"application/json")]
    headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items())
    if exc.code in NO_RETRY_CODES:
        headers.append((b"x-should-retry", b"false"))
    return headers
