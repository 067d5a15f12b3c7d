"""What of an upstream's error may reach a client, and what the log keeps of it.

An upstream's error text is foreign input: it can echo the credential the gateway
sent (a 401 that quotes the key), name internal hosts, or be arbitrary. Clients
therefore never see it; they see a fixed phrase built by the providers, plus at
most the upstream's error ``type`` or ``code`` when :func:`identifier` accepts it
as a short identifier-like token. The full text goes to the log after
:func:`redact` has removed the deployment's own secrets (:func:`secrets_of`) and
anything shaped like one (``sk-...`` keys, ``Bearer`` tokens, ``x-api-key`` /
``api_key`` / ``authorization`` values, Google and AWS access keys).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from gateway.policy import Deployment

REDACTED = "[redacted]"
MAX_LOGGED = 2000           # characters of upstream text kept in one log line

_SECRET_SHAPES = re.compile(
    r"(?<![A-Za-z0-9])sk-[A-Za-z0-9*][A-Za-z0-9_*.\-]*"        # OpenAI / Anthropic style keys, masked or not
    r"|(?<![A-Za-z0-9])AIza[0-9A-Za-z_\-]{20,}"                  # Google API keys
    r"|(?<![A-Za-z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![0-9A-Z])"    # AWS access key ids
)
_BEARER = re.compile(r"(?i)\b(bearer)(\s+)[^\s\"',;}\]]+|\b(basic)(\s+)[A-Za-z0-9+/]{8,}=*")
_KEY_VALUE = re.compile(
    r"(?i)([\"']?(?:x-api-key|api[-_]?key|x-goog-api-key|authorization|access[-_]?token|secret|password)"
    r"[\"']?\s*[:=]\s*[\"']?)(?!\[redacted\])(?!bearer\s)(?!basic\s)([^\s\"',;}\]]+)")
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_.]{0,47}")
_MIN_SECRET = 6             # shorter configured values (e.g. "on") would redact ordinary words


def secrets_of(deployment: Deployment) -> tuple[str, ...]:
    """The values the gateway sends a deployment that must never be shown: its key and header values."""
    found = [deployment.api_key] if deployment.api_key else []
    found.extend(value for _, value in deployment.headers)
    return tuple(sorted({s for s in found if len(s) >= _MIN_SECRET}, key=len, reverse=True))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every known secret and every secret-shaped token replaced by ``[redacted]``."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    text = _SECRET_SHAPES.sub(REDACTED, text)
    text = _BEARER.sub(lambda m: f"{m.group(1) or m.group(3)}{m.group(2) or m.group(4)}{REDACTED}", text)
    text = _KEY_VALUE.sub(lambda m: f"{m.group(1)}{REDACTED}", text)
    if len(text) > MAX_LOGGED:
        text = text[:MAX_LOGGED] + f"... ({len(text) - MAX_LOGGED} more characters)"
    return text


def identifier(value: Any, secrets: Iterable[str] = ()) -> str | None:
    """``value`` if it is a short identifier-like token (``context_length_exceeded``, ``overloaded_error``)
    that is no secret and contains none, else None: the only upstream words a client may see."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    token = str(value)
    if not _IDENTIFIER.fullmatch(token) or _SECRET_SHAPES.search(token):
        return None
    if any(secret in token or (len(token) >= 8 and token in secret) for secret in secrets if secret):
        return None
    return token


_HTTP_DATE = re.compile(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT")
_SECONDS = re.compile(r"\d{1,7}(?:\.\d{1,3})?")


def retry_after_value(value: str | None) -> str | None:
    """An upstream ``retry-after`` fit to pass on: delay-seconds or an HTTP date, nothing else."""
    if value is None:
        return None
    value = value.strip()
    return value if _SECONDS.fullmatch(value) or _HTTP_DATE.fullmatch(value) else None
