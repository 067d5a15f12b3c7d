"""Checks on the request fields the gateway itself interprets.

Only what the gateway reads is validated here (model, messages and their content
parts, prompt, input, stream options, ``n``, token limits, tools); everything
else passes through for the upstream to judge. Each failure is a 400 naming the
offending ``param``.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequest

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
PART_TYPES = frozenset({"text", "image_url", "input_audio", "file", "refusal"})
MAX_OUTPUT_TOKENS = 2**31 - 1   # no model writes more; larger numbers are typos or probes


def _bad(message: str, param: str, code: str = "invalid_type") -> InvalidRequest:
    return InvalidRequest(message, code=code, param=param)


def _int_field(body: dict[str, Any], key: str, minimum: int, maximum: int | None = None) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or \
            (maximum is not None and value > maximum):
        bound = f" and at most {maximum}" if maximum is not None else ""
        raise _bad(f"'{key}' must be an integer of at least {minimum}{bound}.", key, "invalid_value")


def requested_model(body: Any) -> str:
    """The model an OpenAI-API body (chat, completions, embeddings, Responses) asks for; a 400 when the
    body is not an object or names no model."""
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.", "body", "invalid_json")
    model = body.get("model")
    if model is None:
        raise _bad("You must provide a 'model' parameter.", "model", "missing_field")
    if not isinstance(model, str) or not model:
        raise _bad("'model' must be a non-empty string.", "model")
    return model


def validate(endpoint: str, body: Any) -> str:
    """Validate a request body; returns the requested model name."""
    model = requested_model(body)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean.", "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object.", "stream_options")
    _int_field(body, "n", 1, 128)
    _int_field(body, "max_tokens", 1, MAX_OUTPUT_TOKENS)
    _int_field(body, "max_completion_tokens", 1, MAX_OUTPUT_TOKENS)
    if endpoint == "chat":
        _validate_messages(body.get("messages"))
        tools = body.get("tools")
        if tools is not None and (not isinstance(tools, list) or
                                  not all(isinstance(t, dict) for t in tools)):
            raise _bad("'tools' must be a list of tool objects.", "tools")
    elif endpoint == "completions":
        prompt = body.get("prompt")
        if prompt is None:
            raise _bad("You must provide a 'prompt' parameter.", "prompt", "missing_field")
        if not isinstance(prompt, (str, list)):
            raise _bad("'prompt' must be a string or a list.", "prompt")
    elif endpoint == "embeddings":
        value = body.get("input")
        if value is None:
            raise _bad("You must provide an 'input' parameter.", "input", "missing_field")
        if not isinstance(value, (str, list)) or (isinstance(value, list) and not value):
            raise _bad("'input' must be a string or a non-empty list.", "input")
    return model


def _validate_messages(messages: Any) -> None:
    if messages is None:
        raise _bad("You must provide a 'messages' parameter.", "messages", "missing_field")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of message objects.", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}] must be an object.", f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _bad(f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}.",
                       f"messages[{i}].role", "invalid_value")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _bad(f"messages[{i}].content must be a string or a list of content parts.",
                       f"messages[{i}].content")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in PART_TYPES:
                raise InvalidRequest(
                    f"messages[{i}].content[{j}] has unsupported content type {kind!r}; "
                    f"supported: {sorted(PART_TYPES)}.",
                    code="unsupported_content", param=f"messages[{i}].content[{j}].type")
