"""gateway.providers.redaction: what of an upstream's error text may be logged or shown."""

from __future__ import annotations

import pytest

from gateway.providers.redaction import MAX_LOGGED, REDACTED, identifier, redact, retry_after_value


@pytest.mark.parametrize(("text", "gone"), [
    ("Incorrect API key provided: sk-proj-abc123DEF456ghi", "sk-proj-abc123DEF456ghi"),
    ("masked sk-********************************abcd here", "abcd"),
    ("Authorization: Bearer eyJhbGciOi.payload.sig", "eyJhbGciOi"),
    ('{"x-api-key": "ant-key-987654"}', "ant-key-987654"),
    ("api_key=zz9plural; other", "zz9plural"),
    ("x-goog-api-key: AIzaSyA1234567890abcdefghijklmnop", "AIzaSyA1234567890"),
    ("aws AKIAIOSFODNN7EXAMPLE in text", "AKIAIOSFODNN7EXAMPLE"),
    ("basic auth Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA"),
])
def test_secret_shapes_are_redacted(text: str, gone: str) -> None:
    out = redact(text)
    assert gone not in out and REDACTED in out


def test_known_secrets_are_redacted_whatever_their_shape_and_ordinary_text_stays() -> None:
    out = redact("the key you sent, hunter2-plain-key, is not valid; basic tier; retry later",
                 ("hunter2-plain-key",))
    assert out == f"the key you sent, {REDACTED}, is not valid; basic tier; retry later"


def test_long_text_is_cut_for_the_log() -> None:
    out = redact("x" * (MAX_LOGGED + 500))
    assert out.startswith("x" * MAX_LOGGED) and out.endswith("(500 more characters)")


@pytest.mark.parametrize(("value", "secrets", "shown"), [
    ("context_length_exceeded", (), "context_length_exceeded"),
    ("overloaded_error", (), "overloaded_error"),
    ("sk-abc", (), None),
    ("has spaces", (), None),
    ("<script>", (), None),
    ("x" * 49, (), None),
    (429, (), None),
    (True, (), None),
    (None, (), None),
    ("mysecretvalue_1", ("mysecretvalue_1",), None),
    ("secretvalue", ("a-secretvalue-b",), None),        # a sizeable part of a secret
])
def test_only_short_identifiers_that_are_no_secret_are_shown(value: object, secrets: tuple[str, ...],
                                                             shown: str | None) -> None:
    assert identifier(value, secrets) == shown


@pytest.mark.parametrize(("value", "passed"), [
    ("7", "7"), (" 30 ", "30"), ("1.5", "1.5"), ("Wed, 21 Oct 2026 07:28:00 GMT", "Wed, 21 Oct 2026 07:28:00 GMT"),
    ("7; key=sk-x", None), ("soon", None), ("", None), (None, None),
])
def test_retry_after_passes_only_when_well_formed(value: str | None, passed: str | None) -> None:
    assert retry_after_value(value) == passed
