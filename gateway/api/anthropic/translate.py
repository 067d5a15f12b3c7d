"""Request and reply translation between the Messages API and chat completions.

This module owns the mapping of whole bodies (streams are in
:mod:`gateway.api.anthropic.stream`): :func:`messages_to_chat` and
:func:`chat_to_messages_reply` serve a Messages client from a deployment that
speaks only chat completions; :func:`chat_to_messages` and
:func:`messages_reply_to_chat` serve a chat client from a Messages-only
deployment. Request translation returns the names of the features the target
cannot honour (server tools, thinking, ``context_management``, ...) so the edge
can report them in ``x-gateway-dropped``; ``strict=True`` refuses them with a
400 instead. Bodies are assumed validated; anything odd left is skipped or
named, never a crash.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from gateway.errors import InvalidRequest

# finish_reason -> stop_reason and back
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "function_call": "tool_use", "content_filter": "refusal"}
FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
                  "model_context_window_exceeded": "length", "tool_use": "tool_calls",
                  "refusal": "content_filter"}

# Messages fields messages_to_chat carries over (or deliberately ignores because they cost nothing)
_MESSAGES_HANDLED = frozenset({"model", "messages", "system", "max_tokens", "stream", "tools", "tool_choice",
                               "stop_sequences", "temperature", "top_p", "metadata"})
# chat fields chat_to_messages carries over or ignores harmlessly
_CHAT_HANDLED = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options",
                           "tools", "tool_choice", "parallel_tool_calls", "stop", "temperature", "top_p", "user",
                           "response_format", "n"})
DEFAULT_MAX_TOKENS = 4096


MAX_DROPPED = 16        # names reported at most (they go into a response header)
MAX_DROPPED_CHARS = 64  # characters per name
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:- ")


def _safe_name(name: str) -> str:
    """A dropped feature's name fit for a header: client-chosen keys and block types may hold anything."""
    return "".join(c if c in _NAME_CHARS else "?" for c in name[:MAX_DROPPED_CHARS]) or "?"


class _Dropped:
    """Names of features that cannot be honoured, first seen first, each once, header-safe and bounded."""

    __slots__ = ("names",)

    def __init__(self) -> None:
        self.names: dict[str, None] = {}

    def add(self, name: str) -> None:
        if len(self.names) < MAX_DROPPED:
            self.names.setdefault(_safe_name(name), None)

    def result(self, strict: bool, target: str) -> tuple[str, ...]:
        names = tuple(self.names)
        if strict and names:
            raise InvalidRequest(f"Strict mode: {target} cannot honour {', '.join(names)}; remove them or "
                                 f"use a route without strict mode.", code="unsupported_feature",
                                 param=names[0])
        return names


def _dumps(value: Any, param: str) -> str:
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        raise InvalidRequest(f"{param}: cannot be serialised as JSON (too deeply nested?)", param=param) from None


def as_object(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def _text_of(content: Any) -> str:
    """The text of a string or a list of blocks/parts (non-text entries skipped)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "".join(b["text"] for b in content
                   if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str))


# ----------------------------------------------------------------------------------------------------------
# Messages request -> chat request


def messages_to_chat(body: dict[str, Any], *, strict: bool = False,
                     origins: list[tuple[int, ...]] | None = None) -> tuple[dict[str, Any], tuple[str, ...]]:
    """A chat-completions body for a Messages body, and the names of the features dropped.

    ``origins``, when given, receives one entry per chat message: the indexes of the Messages
    ``messages`` it came from (empty for the ``system`` field; several for system turns merged into one)."""
    dropped = _Dropped()
    messages: list[dict[str, Any]] = []
    keep = origins if origins is not None else []
    system = body.get("system")
    if isinstance(system, list):
        if any(isinstance(b, dict) and "cache_control" in b for b in system):
            dropped.add("cache_control")
        system = "\n\n".join(b["text"] for b in system
                             if isinstance(b, dict) and isinstance(b.get("text"), str) and b["text"])
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
        keep.append(())
    for i, message in enumerate(body.get("messages") or ()):
        if not isinstance(message, dict):
            continue
        for turn in _chat_messages(message, i, dropped):
            if turn["role"] == "system" and messages and messages[-1]["role"] == "system":
                messages[-1]["content"] = f"{messages[-1]['content']}\n\n{turn['content']}"   # one system turn
                keep[-1] = (*keep[-1], i)
            else:
                messages.append(turn)
                keep.append((i,))
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if body.get("max_tokens") is not None:
        chat["max_tokens"] = body["max_tokens"]
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("stop_sequences"):
        chat["stop"] = list(body["stop_sequences"])
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str) and metadata["user_id"]:
        chat["user"] = metadata["user_id"]
    tools = _chat_tools(body.get("tools"), dropped)
    if tools:
        chat["tools"] = tools
        _chat_tool_choice(body.get("tool_choice"), chat)
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") != "disabled":
        dropped.add("thinking")
    output = body.get("output_config")
    if isinstance(output, dict):
        fmt = output.get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
            chat["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": fmt["schema"]}}
        for key, value in output.items():
            if value is not None and key != "format":
                dropped.add(f"output_config.{key}")   # effort, ...
    for key in body:
        if key not in _MESSAGES_HANDLED and key not in ("thinking", "output_config") and body[key] is not None:
            dropped.add(key)   # context_management, output_config, top_k, cache_control, service_tier, ...
    return chat, dropped.result(strict, "the chosen deployment (chat completions)")


def _chat_messages(message: dict[str, Any], i: int, dropped: _Dropped) -> list[dict[str, Any]]:
    role, content = message.get("role"), message.get("content")
    if role == "system":
        if isinstance(content, list) and any(isinstance(b, dict) and "cache_control" in b for b in content):
            dropped.add("cache_control")
        return [{"role": "system", "content": _text_of(content)}]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        return []
    if role == "assistant":
        return [_assistant_message(content, i, dropped)]
    tool_messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        if "cache_control" in block:
            dropped.add("cache_control")
        kind = block.get("type")
        if kind == "tool_result":
            tool_messages.append(_tool_message(block, parts, dropped))
        else:
            part = _chat_part(block, dropped)
            if part is not None:
                parts.append(part)
    out = tool_messages
    if parts:
        if all(p["type"] == "text" for p in parts):   # plain text: the form every chat server accepts
            out.append({"role": "user", "content": "\n".join(p["text"] for p in parts)})
        else:
            out.append({"role": "user", "content": parts})
    return out


def _chat_part(block: dict[str, Any], dropped: _Dropped) -> dict[str, Any] | None:
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": block.get("text") if isinstance(block.get("text"), str) else ""}
    if kind == "image":
        source = as_object(block.get("source"))
        if source.get("type") == "base64" and isinstance(source.get("data"), str):
            media = source.get("media_type") if isinstance(source.get("media_type"), str) else "image/png"
            return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{source['data']}"}}
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            return {"type": "image_url", "image_url": {"url": source["url"]}}
        dropped.add(f"image source {source.get('type')}")
        return None
    if kind == "document":
        source = as_object(block.get("source"))
        if source.get("type") == "text" and isinstance(source.get("data"), str):
            return {"type": "text", "text": source["data"]}
        dropped.add("document")
        return None
    if kind in ("thinking", "redacted_thinking"):
        dropped.add("thinking")
        return None
    dropped.add(str(kind))
    return None


def _tool_message(block: dict[str, Any], parts: list[dict[str, Any]], dropped: _Dropped) -> dict[str, Any]:
    """A chat tool message for a tool_result; images in the result join the user message that follows."""
    content = block.get("content")
    if isinstance(content, list):
        texts = []
        for inner in content:
            if not isinstance(inner, dict):
                continue
            if "cache_control" in inner:
                dropped.add("cache_control")
            part = _chat_part(inner, dropped)
            if part is None:
                continue
            if part["type"] == "text":
                texts.append(part["text"])
            else:
                parts.append(part)
        text = "\n".join(texts)
    else:
        text = content if isinstance(content, str) else ""
    if block.get("is_error") is True:
        text = f"Error: {text}" if text else "Error"
    return {"role": "tool", "tool_call_id": str(block.get("tool_use_id")), "content": text}


def _assistant_message(content: list[Any], i: int, dropped: _Dropped) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        if not isinstance(block, dict):
            continue
        if "cache_control" in block:
            dropped.add("cache_control")
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use":
            args = _dumps(as_object(block.get("input")),
                          f"messages.{i}.content.{j}.input")
            calls.append({"id": str(block.get("id")), "type": "function",
                          "function": {"name": str(block.get("name")), "arguments": args}})
        elif kind in ("thinking", "redacted_thinking"):
            dropped.add("thinking")
        else:
            dropped.add(str(kind))   # server_tool_use, web_search_tool_result, ...
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        message["content"] = ""
    return message


def _chat_tools(tools: Any, dropped: _Dropped) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for tool in tools or ():
        if not isinstance(tool, dict):
            continue
        if tool.get("type") not in (None, "custom") or not isinstance(tool.get("input_schema"), dict):
            dropped.add(f"tools.{tool.get('type') or tool.get('name')}")   # server / Anthropic-defined tool
            continue
        if "cache_control" in tool:
            dropped.add("cache_control")
        function: dict[str, Any] = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        if isinstance(tool.get("strict"), bool):
            function["strict"] = tool["strict"]
        out.append({"type": "function", "function": function})
    return out


def _chat_tool_choice(choice: Any, chat: dict[str, Any]) -> None:
    if not isinstance(choice, dict):
        return
    kind = choice.get("type")
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        chat["parallel_tool_calls"] = False


# ----------------------------------------------------------------------------------------------------------
# chat reply -> Messages reply


def message_id(chat_id: Any) -> str:
    """A Messages id (``msg_...``) derived from a chat completion id, or a fresh one."""
    if isinstance(chat_id, str) and chat_id:
        tail = chat_id.removeprefix("chatcmpl-").removeprefix("msg_")
        if tail and all(c.isalnum() or c in "-_" for c in tail):
            return f"msg_{tail}"
    return f"msg_{uuid.uuid4().hex[:24]}"


def _tool_input(arguments: Any) -> dict[str, Any]:
    """Parsed tool-call arguments; not a JSON object -> ``{}`` (Anthropic's ``input`` must be one)."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def messages_usage(chat_usage: Any) -> dict[str, Any]:
    """Anthropic usage for a chat usage mapping (``input_tokens`` excludes cache reads and writes)."""
    usage = chat_usage if isinstance(chat_usage, dict) else {}
    details = as_object(usage.get("prompt_tokens_details"))
    read = _count(details.get("cached_tokens")) or _count(usage.get("cache_read_input_tokens"))
    write = _count(usage.get("cache_creation_input_tokens")) or _count(details.get("cache_creation_tokens")) \
        or _count(details.get("cache_write_tokens"))
    prompt = _count(usage.get("prompt_tokens"))
    out: dict[str, Any] = {"input_tokens": max(0, prompt - read - write),
                           "cache_creation_input_tokens": write, "cache_read_input_tokens": read,
                           "output_tokens": _count(usage.get("completion_tokens"))}
    if "cost_usd" in usage:   # the gateway's own figure rides along
        out["cost_usd"] = usage["cost_usd"]
    return out


def chat_to_messages_reply(chat_body: dict[str, Any], model: str) -> dict[str, Any]:
    """A Messages reply for a chat completion reply (first choice)."""
    choices = chat_body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = as_object(choice.get("message"))
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, list):
        text = _text_of(text)
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        content.append({"type": "text", "text": refusal})
    for call in message.get("tool_calls") or ():
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            continue
        function = call["function"]
        content.append({"type": "tool_use", "id": str(call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}"),
                        "name": str(function.get("name") or ""), "input": _tool_input(function.get("arguments"))})
    finish = choice.get("finish_reason")
    stop_reason = STOP_REASONS.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"
    if isinstance(refusal, str) and refusal:
        stop_reason = "refusal"
    elif stop_reason == "end_turn" and any(b["type"] == "tool_use" for b in content):
        stop_reason = "tool_use"   # servers that end a tool call with finish_reason "stop" (Ollama)
    return {"id": message_id(chat_body.get("id")), "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop_reason, "stop_sequence": None,
            "usage": messages_usage(chat_body.get("usage"))}


# ----------------------------------------------------------------------------------------------------------
# chat request -> Messages request


def chat_to_messages(body: dict[str, Any], *, strict: bool = False,
                     default_max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[dict[str, Any], tuple[str, ...]]:
    """A Messages body for a chat-completions body, and the names of the features dropped.

    System and developer messages (wherever they stand) become ``system``; tool messages become
    ``tool_result`` blocks of a user turn; consecutive turns of one role are merged, as the
    Messages API wants. ``max_tokens`` is required there: ``default_max_tokens`` when the client
    set none."""
    dropped = _Dropped()
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(body.get("messages") or ()):
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role in ("system", "developer"):
            text = _text_of(message.get("content"))
            if text:
                system.append(text)
            continue
        if role == "tool":
            blocks: list[dict[str, Any]] = [{"type": "tool_result", "tool_use_id": str(message.get("tool_call_id")),
                                             "content": _text_of(message.get("content"))}]
            role = "user"
        elif role == "user":
            blocks = _messages_blocks(message.get("content"), dropped)
        elif role == "assistant":
            blocks = _assistant_blocks(message, i, dropped)
        else:
            dropped.add(f"{role} messages")
            continue
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    out: dict[str, Any] = {"model": body.get("model")}
    if system:
        out["system"] = "\n\n".join(system)
    out["messages"] = turns
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    out["max_tokens"] = max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) \
        and max_tokens > 0 else default_max_tokens
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        out["temperature"] = min(float(temperature), 1.0)   # OpenAI's scale goes to 2, Anthropic's to 1
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if isinstance(stop, str) and stop:
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = [s for s in stop if isinstance(s, str)]
    if body.get("stream"):
        out["stream"] = True
    if isinstance(body.get("user"), str) and body["user"]:
        out["metadata"] = {"user_id": body["user"]}
    tools = [_messages_tool(t) for t in body.get("tools") or () if isinstance(t, dict)]
    if any(t is None for t in tools):
        dropped.add("non-function tools")
    if any(t is not None for t in tools):
        out["tools"] = [t for t in tools if t is not None]
        choice = _messages_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        schema = as_object(fmt.get("json_schema"))
        if fmt.get("type") == "json_schema" and isinstance(schema.get("schema"), dict):
            out["output_config"] = {"format": {"type": "json_schema", "schema": schema["schema"]}}
        else:
            dropped.add("response_format")
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        dropped.add("n")
    for key in body:
        if key not in _CHAT_HANDLED and body[key] is not None:
            dropped.add(key)   # logprobs, seed, presence_penalty, reasoning_effort, ...
    return out, dropped.result(strict, "the chosen deployment (Messages API)")


def _messages_blocks(content: Any, dropped: _Dropped) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            block = _image_block(url)
            if block is None:
                dropped.add("image_url")
            else:
                blocks.append(block)
        else:
            dropped.add(str(kind))   # input_audio, file, ...
    return blocks


def _image_block(url: Any) -> dict[str, Any] | None:
    if not isinstance(url, str):
        return None
    if url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        media, _, encoding = head.partition(";")
        if not sep or encoding != "base64" or not media:
            return None
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    return None


def _assistant_blocks(message: dict[str, Any], i: int, dropped: _Dropped) -> list[dict[str, Any]]:
    blocks = _messages_blocks(message.get("content"), dropped)
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        blocks.append({"type": "text", "text": refusal})
    for j, call in enumerate(message.get("tool_calls") or ()):
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            continue
        function = call["function"]
        args = function.get("arguments")
        try:
            parsed = orjson.loads(args) if isinstance(args, str) and args.strip() else {}
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            param = f"messages[{i}].tool_calls[{j}].function.arguments"
            raise InvalidRequest(f"{param} must be a JSON object to be sent to a Messages API deployment.",
                                 param=param)
        blocks.append({"type": "tool_use", "id": str(call.get("id")), "name": str(function.get("name")),
                       "input": parsed})
    if message.get("function_call") is not None:
        dropped.add("function_call")
    return blocks


def _messages_tool(tool: dict[str, Any]) -> dict[str, Any] | None:
    function = tool.get("function")
    if tool.get("type") != "function" or not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return None
    params = function.get("parameters")
    out: dict[str, Any] = {"name": function["name"],
                           "input_schema": params if isinstance(params, dict) else {"type": "object",
                                                                                     "properties": {}}}
    if isinstance(function.get("description"), str):
        out["description"] = function["description"]
    return out


def _messages_tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    out: dict[str, Any] | None = None
    if choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        out = {"type": "none"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name")}
    if parallel is False:
        out = out or {"type": "auto"}
        if out["type"] != "none":
            out["disable_parallel_tool_use"] = True
    return out


# ----------------------------------------------------------------------------------------------------------
# Messages reply -> chat reply


def chat_id(msg_id: Any) -> str:
    if isinstance(msg_id, str) and msg_id:
        return "chatcmpl-" + msg_id.removeprefix("msg_")
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chat_usage(usage: Any) -> dict[str, Any]:
    """Chat usage for an Anthropic usage mapping: ``prompt_tokens`` counts cache reads and writes too."""
    u = usage if isinstance(usage, dict) else {}
    uncached, read, write = _count(u.get("input_tokens")), _count(u.get("cache_read_input_tokens")), \
        _count(u.get("cache_creation_input_tokens"))
    output = _count(u.get("output_tokens"))
    out: dict[str, Any] = {"prompt_tokens": uncached + read + write, "completion_tokens": output,
                           "total_tokens": uncached + read + write + output,
                           "prompt_tokens_details": {"cached_tokens": read}}
    if write:
        out["cache_creation_input_tokens"] = write
        tiers = u.get("cache_creation")
        if isinstance(tiers, dict):
            out["cache_creation"] = dict(tiers)
    if "cost_usd" in u:
        out["cost_usd"] = u["cost_usd"]
    return out


def messages_reply_to_chat(reply: dict[str, Any]) -> dict[str, Any]:
    """A chat completion reply for a Messages reply (thinking text as ``reasoning_content``)."""
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in reply.get("content") or ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            thinking.append(block["thinking"])
        elif kind == "tool_use":
            calls.append({"id": str(block.get("id")), "type": "function",
                          "function": {"name": str(block.get("name")),
                                       "arguments": _dumps(block.get("input") or {}, "content.input")}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    stop = reply.get("stop_reason")
    finish = FINISH_REASONS.get(stop, "stop") if isinstance(stop, str) else "stop"
    return {"id": chat_id(reply.get("id")), "object": "chat.completion", "created": int(time.time()),
            "model": reply.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": chat_usage(reply.get("usage"))}
