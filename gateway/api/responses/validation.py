"""Checks on the fields of a Responses API request that the gateway itself reads.

``model``, ``input`` (a string or a list of items, each an object with a known
shape where the gateway translates it), ``instructions``, ``stream``, ``store``,
``max_output_tokens``, ``tools``, ``previous_response_id``, ``metadata``,
``reasoning``, ``text.format`` and ``include``. Everything else (``prompt_cache_key``,
``client_metadata``, ``parallel_tool_calls``, future fields) passes through for the
upstream to judge, and item or tool types the gateway does not know are accepted
as long as they are objects with a ``type``. Each failure is an
:class:`~gateway.errors.InvalidRequest` naming the offending ``param``.
"""

from __future__ import annotations

from typing import Any

from gateway.api.openai_validation import requested_model
from gateway.errors import InvalidRequest

MESSAGE_ROLES = frozenset({"user", "assistant", "system", "developer"})


def _bad(message: str, param: str, code: str = "invalid_type") -> InvalidRequest:
    return InvalidRequest(message, code=code, param=param)


def _optional(body: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if value is not None and not isinstance(value, kind):
        raise _bad(f"'{key}' must be {what}.", key)
    return value


def validate_responses(body: Any) -> None:
    """Raise :class:`InvalidRequest` for a Responses request the gateway cannot read; else return."""
    requested_model(body)
    _optional(body, "instructions", str, "a string")
    _optional(body, "stream", bool, "a boolean")
    _optional(body, "store", bool, "a boolean")
    _optional(body, "background", bool, "a boolean")
    _optional(body, "parallel_tool_calls", bool, "a boolean")
    _optional(body, "stream_options", dict, "an object")
    limit = body.get("max_output_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise _bad("'max_output_tokens' must be an integer of at least 1.", "max_output_tokens", "invalid_value")
    previous = body.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous):
        raise _bad("'previous_response_id' must be a non-empty string.", "previous_response_id")
    _validate_metadata(body.get("metadata"))
    _validate_input(body)
    _validate_tools(body.get("tools"))
    _validate_reasoning(body.get("reasoning"))
    _validate_text(body.get("text"))
    include = body.get("include")
    if include is not None and (not isinstance(include, list) or not all(isinstance(i, str) for i in include)):
        raise _bad("'include' must be a list of strings.", "include")


def _validate_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise _bad("'metadata' must be an object of string values.", "metadata")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise _bad(f"metadata.{key} must be a string.", f"metadata.{key}")


def _validate_input(body: dict[str, Any]) -> None:
    value = body.get("input")
    if value is None:
        if body.get("previous_response_id") is None and body.get("prompt") is None \
                and body.get("conversation") is None:
            raise _bad("You must provide an 'input' parameter.", "input", "missing_field")
        return
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise _bad("'input' must be a string or a list of input items.", "input")
    for i, item in enumerate(value):
        _validate_item(item, f"input[{i}]")


def _validate_item(item: Any, where: str) -> None:
    if not isinstance(item, dict):
        raise _bad(f"{where} must be an object.", where)
    kind = item.get("type")
    if kind is None and "role" in item:
        kind = "message"
    if not isinstance(kind, str) or not kind:
        raise _bad(f"{where} must have a string 'type' (or a 'role' for a message).", f"{where}.type")
    if kind == "message":
        role = item.get("role")
        if role not in MESSAGE_ROLES:
            raise _bad(f"{where}.role must be one of {sorted(MESSAGE_ROLES)}, got {role!r}.",
                       f"{where}.role", "invalid_value")
        content = item.get("content")
        if isinstance(content, str):
            return
        if not isinstance(content, list):
            raise _bad(f"{where}.content must be a string or a list of content parts.", f"{where}.content")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _bad(f"{where}.content[{j}] must be an object with a string 'type'.",
                           f"{where}.content[{j}]")
            text = part.get("text")
            if part["type"] in ("input_text", "output_text") and not isinstance(text, str):
                raise _bad(f"{where}.content[{j}].text must be a string.", f"{where}.content[{j}].text")
    elif kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            if not isinstance(item.get(key), str):
                raise _bad(f"{where}.{key} must be a string.", f"{where}.{key}")
    elif kind in ("function_call_output", "custom_tool_call_output"):
        if not isinstance(item.get("call_id"), str):
            raise _bad(f"{where}.call_id must be a string.", f"{where}.call_id")
        if item.get("output") is None:
            raise _bad(f"{where}.output is required (a string or a list of content parts).", f"{where}.output",
                       "missing_field")
    elif kind == "custom_tool_call":
        for key in ("call_id", "name", "input"):
            if not isinstance(item.get(key), str):
                raise _bad(f"{where}.{key} must be a string.", f"{where}.{key}")


def _validate_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list of tool objects.", "tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise _bad(f"tools[{i}] must be an object with a string 'type'.", f"tools[{i}]")
        if tool["type"] == "function":
            if not isinstance(tool.get("name"), str) or not tool["name"]:
                raise _bad(f"tools[{i}].name must be a non-empty string.", f"tools[{i}].name")
            params = tool.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise _bad(f"tools[{i}].parameters must be a JSON schema object.", f"tools[{i}].parameters")


def _validate_reasoning(reasoning: Any) -> None:
    if reasoning is None:
        return
    if not isinstance(reasoning, dict):
        raise _bad("'reasoning' must be an object.", "reasoning")
    for key in ("effort", "summary", "generate_summary"):
        value = reasoning.get(key)
        if value is not None and not isinstance(value, str):
            raise _bad(f"reasoning.{key} must be a string.", f"reasoning.{key}")


def _validate_text(text: Any) -> None:
    if text is None:
        return
    if not isinstance(text, dict):
        raise _bad("'text' must be an object.", "text")
    fmt = text.get("format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise _bad("text.format must be an object with a string 'type'.", "text.format")
    if fmt["type"] == "json_schema":
        if not isinstance(fmt.get("name"), str) or not fmt["name"]:
            raise _bad("text.format.name must be a non-empty string.", "text.format.name")
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("text.format.schema must be a JSON schema object.", "text.format.schema")
