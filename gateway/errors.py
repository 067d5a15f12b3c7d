"""The gateway's error tree and its one mapping to HTTP.

Every failure a client can see is a ``GatewayError`` subclass carrying its HTTP
``status_code``, OpenAI ``error_type`` and a machine-readable ``code``. The edge
renders them with :func:`error_body` (OpenAI's envelope) and nothing else turns
exceptions into responses. Foreign errors (network, Redis, litellm) are
translated into this tree at the boundary that calls them.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

log = logging.getLogger("gateway")


class GatewayError(Exception):
    status_code = 500
    error_type = "api_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "code": self.code,
                "param": self.param,
            }
        }


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    """The prompt fits no candidate's context window."""

    code = "context_length_exceeded"


class RequestTooLarge(InvalidRequest):
    status_code = 413
    code = "request_too_large"


class ModelNotFound(InvalidRequest):
    status_code = 404
    code = "model_not_found"


class NotFound(InvalidRequest):
    status_code = 404
    code = "not_found"


class MethodNotAllowed(InvalidRequest):
    status_code = 405
    code = "method_not_allowed"


class AuthenticationFailed(GatewayError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status_code = 403
    error_type = "permission_error"
    code = "model_not_allowed"


class RateLimited(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class BudgetExceeded(GatewayError):
    status_code = 429
    error_type = "insufficient_quota"
    code = "budget_exceeded"


class UpstreamError(GatewayError):
    """An upstream failed. ``failure`` names the kind (a route's ``retry_on`` lists the kinds that
    fall back to the next candidate; metrics use it as a bounded label); ``retryable`` says whether
    another candidate can help at all."""

    status_code = 502
    error_type = "api_error"
    code = "upstream_error"
    retryable = True
    failure = "server_error"

    def __init__(self, message: str, *, failure: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        if failure is not None:
            self.failure = failure


class UpstreamUnreachable(UpstreamError):
    """No connection to the upstream (refused, reset, DNS): nothing was sent, nothing billed."""

    failure = "connection"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    code = "upstream_timeout"
    failure = "timeout"


class UpstreamRateLimited(UpstreamError):
    """The provider said 429; the client sees 429 with the provider's message."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"
    failure = "rate_limit"


class UpstreamRejected(UpstreamError):
    """The provider refused the request itself (its 400/422): the client's problem, not retryable."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "upstream_rejected"
    retryable = False
    failure = "rejected"


class ServiceUnavailable(GatewayError):
    status_code = 503
    error_type = "api_error"
    code = "service_unavailable"


def error_body(exc: GatewayError) -> bytes:
    return orjson.dumps(exc.body())


def error_headers(exc: GatewayError) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json")]
    headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items())
    return headers


def internal_error() -> GatewayError:
    """What a client sees for a bug in the gateway: no traceback, a stable envelope."""
    return GatewayError("The gateway hit an internal error; it has been logged.")


def state_unavailable(exc: Exception, what: str | None = None) -> ServiceUnavailable:
    """The translator for the state store's (Redis's) failures: a 503 ``state_unavailable``.

    Without ``what``: Redis is down and the fail mode is ``refuse``. With it (``"Key, budget and
    ledger state"``): an admin operation could not reach the store. The store's own error text
    (it names Redis's host and port) goes to the debug log (an outage would otherwise log once per
    request), never into the client's message.
    """
    log.debug("state store unreachable: %s: %s", type(exc).__name__, exc)
    if what is not None:
        return ServiceUnavailable(f"{what} is unreachable; try again when the state store is back.",
                                  code="state_unavailable")
    return ServiceUnavailable("Budget and key state is unreachable, so requests are refused "
                              "(GATEWAY_REDIS_FAIL_MODE=refuse).", code="state_unavailable")
