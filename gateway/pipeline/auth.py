"""Who is calling: the caller's key out of the headers, and the one constant-time secret check.

:func:`caller_key` reads ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (the
Anthropic SDK's header); :func:`secret_matches` compares a presented secret with a
configured one in constant time. The proxy, ``/metrics`` and the admin API all
authenticate through these two, and the pipeline's authenticate stage resolves the key
to a team (:class:`gateway.pipeline.lifecycle.Pipeline`).
"""

from __future__ import annotations

import hmac


def caller_key(headers: dict[str, str]) -> str | None:
    """The caller's key (lower-cased header names), or None when none was sent."""
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return headers.get("x-api-key") or None


def secret_matches(presented: str | None, secret: str) -> bool:
    """Whether ``presented`` is ``secret``, in time independent of where they differ."""
    return presented is not None and hmac.compare_digest(presented.encode(), secret.encode())
