"""Content detectors for routing rules: personal data and secrets in a request's text.

A rule with ``match.contains: [personal_data]`` (or ``email``, ``phone``,
``card_number``, ``secrets``) matches when a detector fires on the text the model
would read: message contents (text parts), tool-call arguments, a legacy prompt or
embedding inputs. Detection leans towards firing (a phone-like or e-mail-like
string is enough) but keeps cheap guards against false positives: card numbers
must pass the Luhn check, and phone numbers must have a phone's shape and length
and stand apart from words, longer digit runs, dates, versions and IPs. Pure
functions, run only when a rule asks for them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# Phone numbers. Every shape is bounded so that it is not part of a word, of a longer run of
# digits or of a dotted or dashed code (order numbers, card numbers, IPs, versions, dates).
# Shapes that are phone-like by their grouping alone: North-American 3-3-4 with separators,
# a bare 10-digit North-American number, a bare 10-11 digit national number with a trunk 0.
# Shapes that must also have a phone's number of digits: international (+CC or 00CC, 8-15
# digits) and national with a trunk 0 and separators (UK 07700 900123, DE 030 12345678,
# FR 01 23 45 67 89: 10-12 digits; groups after the area code share one separator, a space or a
# dash; dots only in the French 01.23.45.67.89 form, so that zero-padded IPs do not count).
_LEFT = r"(?<![\w+#/.-])(?<!\d )"
_RIGHT = r"(?![\w/]|[.:/-]\w|[ ,]\d)"
_PHONE_SHAPED = re.compile(
    _LEFT + r"(?:(?:1[ .-])?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}"
    r"|[2-9]\d{2}[2-9]\d{6}"
    r"|0[1-9]\d{8,9}"
    r"|0[1-9](?:\.\d{2}){4})" + _RIGHT)
_PHONE_COUNTED = (
    (re.compile(_LEFT + r"(?:\+\d{1,3}[ .-]?|00[1-9]\d{0,2}[ .-])(?:\(\d{1,4}\)[ .-]?)?\d{1,4}"
                r"(?:[ .-]?\d{2,4}){1,4}" + _RIGHT), 8, 15),
    (re.compile(_LEFT + r"(?:\(0[1-9]\d{0,3}\) ?|0[1-9]\d{0,3}[ /-])\d{2,8}"
                r"(?:([ -])\d{2,8}(?:\1\d{2,8}){0,3})?" + _RIGHT), 10, 12),
)
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
_SECRETS = re.compile(
    r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"
    r"|\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"       # OpenAI / Anthropic style API keys
    r"|\bAKIA[0-9A-Z]{16}\b"                          # AWS access key id
    r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b"                # GitHub tokens
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"                # Slack tokens
    r"|\bAIza[0-9A-Za-z_-]{35}\b"                     # Google API key
    r"|\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}")  # JWT


def luhn_ok(digits: str) -> bool:
    total, odd = 0, False
    for ch in reversed(digits):
        d = ord(ch) - 48
        if odd:
            d *= 2
            if d > 9:
                d -= 9
        total += d
        odd = not odd
    return total % 10 == 0


def has_card_number(text: str) -> bool:
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            return True
    return False


def has_email(text: str) -> bool:
    return _EMAIL.search(text) is not None


def has_phone(text: str) -> bool:
    if _PHONE_SHAPED.search(text) is not None:
        return True
    return any(low <= sum(ch.isdigit() for ch in m.group()) <= high
               for pattern, low, high in _PHONE_COUNTED for m in pattern.finditer(text))


def has_secret(text: str) -> bool:
    return _SECRETS.search(text) is not None


_CHECKS = {
    "email": has_email,
    "phone": has_phone,
    "card_number": has_card_number,
    "secrets": has_secret,
}
_EXPANDS = {"personal_data": ("email", "phone", "card_number")}


def detector_names(name: str) -> tuple[str, ...]:
    return _EXPANDS.get(name, (name,))


def request_text(endpoint: str, body: dict[str, Any]) -> str:
    """The text a model would read, joined by newlines (roles, ids and structure left out)."""
    return "\n".join(_texts(endpoint, body))


def _texts(endpoint: str, body: dict[str, Any]) -> Iterator[str]:
    if endpoint == "chat":
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                yield content
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        yield part["text"]
            for call in message.get("tool_calls") or ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    yield fn["arguments"]
        return
    value = body.get("prompt") if endpoint == "completions" else body.get("input")
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        yield from (v for v in value if isinstance(v, str))


def detect(names: frozenset[str], text: str) -> list[str]:
    """The detectors among ``names`` (``personal_data`` expands to its parts) that fire on ``text``."""
    fired: list[str] = []
    for name in sorted(names):
        for part in detector_names(name):
            if part not in fired and _CHECKS[part](text):
                fired.append(part)
    return fired
