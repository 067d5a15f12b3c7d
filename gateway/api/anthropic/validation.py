"""Checks on the Messages API request fields the gateway itself reads.

This module owns :func:`validate_messages`: the shape of ``model``,
``max_tokens``, ``messages`` (roles and content blocks), ``system``, ``stream``,
``tools``, ``tool_choice``, ``metadata``, ``thinking``, ``stop_sequences`` and
the sampling numbers. Everything else (``cache_control`` anywhere,
``context_management``, ``output_config``, server tools, unknown future fields
and block types) passes through for the upstream to judge, as Claude Code sends
plenty of it. Each failure is an :class:`~gateway.errors.InvalidRequest` naming
the offending ``param`` in Anthropic's dotted style (``messages.0.content.1.text``).
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequest

ROLES = frozenset({"user", "assistant", "system"})   # "system" inside messages: Claude Code sends it


def _bad(message: str, param: str, code: str = "invalid_type") -> InvalidRequest:
    return InvalidRequest(message, code=code, param=param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_messages(body: Any, *, require_max_tokens: bool = True) -> None:
    """Validate a ``POST /v1/messages`` body (``require_max_tokens=False`` for ``count_tokens``)."""
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.", "body", "invalid_json")
    model = body.get("model")
    if model is None:
        raise _bad("model: Field required", "model", "missing_field")
    if not isinstance(model, str) or not model.strip():
        raise _bad("model: must be a non-empty string", "model")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        if require_max_tokens:
            raise _bad("max_tokens: Field required", "max_tokens", "missing_field")
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise _bad("max_tokens: must be an integer of at least 1", "max_tokens", "invalid_value")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream: must be a boolean", "stream")
    _validate_system(body.get("system"))
    _validate_message_list(body.get("messages"))
    _validate_tools(body.get("tools"))
    _validate_tool_choice(body.get("tool_choice"))
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _bad("metadata: must be an object", "metadata")
        user_id = metadata.get("user_id")
        if user_id is not None and not isinstance(user_id, str):
            raise _bad("metadata.user_id: must be a string", "metadata.user_id")
    thinking = body.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict) or not isinstance(thinking.get("type"), str):
            raise _bad("thinking: must be an object with a string 'type'", "thinking")
        budget = thinking.get("budget_tokens")
        if budget is not None and not _is_int(budget):
            raise _bad("thinking.budget_tokens: must be an integer", "thinking.budget_tokens")
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
        raise _bad("stop_sequences: must be a list of strings", "stop_sequences")
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None and not _is_number(value):
            raise _bad(f"{key}: must be a number", key)
    top_k = body.get("top_k")
    if top_k is not None and not _is_int(top_k):
        raise _bad("top_k: must be an integer", "top_k")


def _validate_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise _bad("system: must be a string or a list of text blocks", "system")
    for i, block in enumerate(system):
        where = f"system.{i}"
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _bad(f"{where}: system blocks must be objects of type 'text'", where)
        if not isinstance(block.get("text"), str):
            raise _bad(f"{where}.text: must be a string", f"{where}.text")


def _validate_message_list(messages: Any) -> None:
    if messages is None:
        raise _bad("messages: Field required", "messages", "missing_field")
    if not isinstance(messages, list):
        raise _bad("messages: must be a list of messages", "messages")
    if not messages:
        raise _bad("messages: at least one message is required", "messages", "invalid_value")
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise _bad(f"{where}: each message must be an object", where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _bad(f"{where}.role: must be 'user' or 'assistant'", f"{where}.role", "invalid_value")
        if "content" not in message:
            raise _bad(f"{where}.content: Field required", f"{where}.content", "missing_field")
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _bad(f"{where}.content: must be a string or a list of content blocks", f"{where}.content")
        for j, block in enumerate(content):
            _validate_block(block, f"{where}.content.{j}", role)


def _validate_block(block: Any, where: str, role: str) -> None:
    if not isinstance(block, dict):
        raise _bad(f"{where}: each content block must be an object", where)
    kind = block.get("type")
    if not isinstance(kind, str) or not kind:
        raise _bad(f"{where}.type: must be a string", f"{where}.type", "missing_field")
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise _bad(f"{where}.text: must be a string", f"{where}.text")
    elif kind in ("image", "document"):
        source = block.get("source")
        if not isinstance(source, dict) or not isinstance(source.get("type"), str):
            raise _bad(f"{where}.source: must be an object with a string 'type'", f"{where}.source")
    elif kind == "tool_use":
        if not isinstance(block.get("id"), str) or not block["id"]:
            raise _bad(f"{where}.id: must be a non-empty string", f"{where}.id")
        if not isinstance(block.get("name"), str) or not block["name"]:
            raise _bad(f"{where}.name: must be a non-empty string", f"{where}.name")
        if not isinstance(block.get("input"), dict):
            raise _bad(f"{where}.input: must be an object", f"{where}.input")
    elif kind == "tool_result":
        if not isinstance(block.get("tool_use_id"), str) or not block["tool_use_id"]:
            raise _bad(f"{where}.tool_use_id: must be a non-empty string", f"{where}.tool_use_id")
        content = block.get("content")
        if content is not None and not isinstance(content, str):
            if not isinstance(content, list):
                raise _bad(f"{where}.content: must be a string or a list of content blocks", f"{where}.content")
            for k, inner in enumerate(content):
                if not isinstance(inner, dict) or not isinstance(inner.get("type"), str):
                    raise _bad(f"{where}.content.{k}: each block must be an object with a string 'type'",
                               f"{where}.content.{k}")
                if inner["type"] == "text" and not isinstance(inner.get("text"), str):
                    raise _bad(f"{where}.content.{k}.text: must be a string", f"{where}.content.{k}.text")
    elif kind == "thinking":
        if not isinstance(block.get("thinking"), str):
            raise _bad(f"{where}.thinking: must be a string", f"{where}.thinking")
    # other block types (redacted_thinking, server tool results, search results, future ones) pass


def _validate_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise _bad("tools: must be a list of tools", "tools")
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise _bad(f"{where}: each tool must be an object", where)
        kind = tool.get("type")
        if kind is not None and not isinstance(kind, str):
            raise _bad(f"{where}.type: must be a string", f"{where}.type")
        name = tool.get("name")
        if kind in (None, "custom"):   # a client tool: name and JSON schema required
            if not isinstance(name, str) or not name:
                raise _bad(f"{where}.name: must be a non-empty string", f"{where}.name", "missing_field")
            if not isinstance(tool.get("input_schema"), dict):
                raise _bad(f"{where}.input_schema: must be an object", f"{where}.input_schema", "missing_field")
            description = tool.get("description")
            if description is not None and not isinstance(description, str):
                raise _bad(f"{where}.description: must be a string", f"{where}.description")
        elif name is not None and not isinstance(name, str):   # server and Anthropic-defined tools
            raise _bad(f"{where}.name: must be a string", f"{where}.name")


def _validate_tool_choice(choice: Any) -> None:
    if choice is None:
        return
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise _bad("tool_choice: must be an object of type 'auto', 'any', 'tool' or 'none'", "tool_choice")
    if choice["type"] == "tool" and (not isinstance(choice.get("name"), str) or not choice["name"]):
        raise _bad("tool_choice.name: must be a non-empty string", "tool_choice.name", "missing_field")
