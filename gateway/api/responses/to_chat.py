"""A Responses API request rewritten as a chat completions request, for deployments that
speak only chat (the simulated model, vLLM or Ollama without Responses, litellm providers).

``instructions`` and ``system``/``developer`` items become system messages; message
items (``input_text``, ``output_text``, ``input_image``, ``input_file`` parts) become
chat messages; function tools become chat tools and ``function_call`` /
``function_call_output`` items become an assistant's ``tool_calls`` and ``tool``
messages. Custom (free-form) tools become function tools taking one string
``input`` (:data:`CUSTOM_INPUT`), which :mod:`.from_chat` turns back into
``custom_tool_call`` items. ``reasoning.effort`` becomes ``reasoning_effort``,
``max_output_tokens`` ``max_tokens``, ``text.format`` ``response_format``, and a stream
always asks for usage. What chat cannot honour (hosted and namespace tools,
``include`` items, ``reasoning.summary``, items such as ``web_search_call``, ...) is
left out and named in the returned tuple (short, header-safe names, at most
:data:`MAX_DROPPED`), or refused with a 400 in strict mode.
Reasoning items of earlier turns are skipped without a name: chat models take no
earlier reasoning as input.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from gateway.api.responses.items import request_input_items
from gateway.errors import InvalidRequest

CUSTOM_INPUT = "input"   # the one string parameter a custom tool becomes as a chat function
PASSED_AS_IS = ("temperature", "top_p", "user", "parallel_tool_calls")
NAMED_WHEN_SET = ("background", "conversation", "prompt", "max_tool_calls", "top_logprobs")
SILENT_ITEM_TYPES = frozenset({"reasoning"})
MAX_DROPPED, MAX_NAME = 16, 64   # the names go into the x-gateway-dropped header
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:/-]")


class _Builder:
    def __init__(self, track: bool = False) -> None:
        self.messages: list[dict[str, Any]] = []
        self.dropped: list[str] = []
        # with ``track``: per message, the positions of the input items it came from (see ``origins``)
        self.origins: list[list[int]] | None = [] if track else None
        self._pending: list[int] = []    # items no message carries (reasoning, left out): the next one's
        self._at = -1                    # the position of the item being translated

    def _added(self) -> None:
        """Note the message just appended: it came from the current item (and carries the pending ones:
        with it, or, when it opens a turn, with the message before, whose turn they belong to)."""
        if self.origins is None:
            return
        own = [self._at] if self._at >= 0 else []
        if self._pending and self.messages[-1]["role"] in ("user", "system") and self.origins:
            self.origins[-1].extend(self._pending)
            self._pending = []
        self.origins.append(self._pending + own)
        self._pending = []

    def _unplaced(self) -> None:
        if self.origins is not None and self._at >= 0:
            self._pending.append(self._at)

    def finish(self) -> None:
        if self.origins is not None and self._pending:
            if self.origins:
                self.origins[-1].extend(self._pending)
            self._pending = []

    def drop(self, name: str) -> None:
        # names carry client-chosen type strings and end up in a response header: keep them short and plain
        safe = _UNSAFE.sub("?", name)[:MAX_NAME]
        if safe not in self.dropped and len(self.dropped) < MAX_DROPPED:
            self.dropped.append(safe)

    def item(self, item: dict[str, Any]) -> None:
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            self._message(item)
        elif kind in ("function_call", "custom_tool_call"):
            if kind == "function_call":
                arguments = item.get("arguments") if isinstance(item.get("arguments"), str) else "{}"
            else:
                arguments = orjson.dumps({CUSTOM_INPUT: item.get("input", "")}).decode()
            call = {"id": str(item.get("call_id") or item.get("id") or ""), "type": "function",
                    "function": {"name": str(item.get("name") or ""), "arguments": arguments}}
            last = self.messages[-1] if self.messages else None
            if last is not None and last["role"] == "assistant":   # the same turn's text, or a parallel call
                last.setdefault("tool_calls", []).append(call)
                if self.origins is not None:
                    self.origins[-1].extend([*self._pending, self._at])
                    self._pending = []
            else:
                self.messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                self._added()
        elif kind in ("function_call_output", "custom_tool_call_output"):
            self.messages.append({"role": "tool", "tool_call_id": str(item.get("call_id") or ""),
                                  "content": self._output_text(item.get("output"))})
            self._added()
        elif kind in SILENT_ITEM_TYPES:
            self._unplaced()
        else:
            self.drop(f"input:{kind}")
            self._unplaced()

    def _message(self, item: dict[str, Any]) -> None:
        role = item.get("role")
        chat_role = "system" if role in ("system", "developer") else role
        content = item.get("content")
        if isinstance(content, str):
            self.messages.append({"role": chat_role, "content": content})
            self._added()
            return
        parts: list[dict[str, Any]] = []
        for part in content if isinstance(content, list) else []:
            converted = self._part(part)
            if converted is not None:
                parts.append(converted)
        if all(p["type"] == "text" for p in parts):   # plain text: a string every server accepts
            self.messages.append({"role": chat_role, "content": "".join(p["text"] for p in parts)})
        else:
            self.messages.append({"role": chat_role, "content": parts})
        self._added()

    def _output_text(self, output: Any) -> str:
        """A tool result as the string a ``tool`` message carries (text parts joined; others named)."""
        if isinstance(output, str):
            return output
        if not isinstance(output, list):
            try:
                return orjson.dumps(output).decode()
            except TypeError:    # e.g. an integer beyond 64 bits
                return str(output)
        texts = []
        for part in output:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("input_text", "output_text", "text"):
                texts.append(str(part.get("text") or ""))
            else:
                self.drop(f"tool_output:{kind}")
        return "".join(texts)

    def _part(self, part: Any) -> dict[str, Any] | None:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            return {"type": "text", "text": str(part.get("text") or "")}
        if kind == "refusal":
            return {"type": "text", "text": str(part.get("refusal") or "")}
        if kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                self.drop("input_image:file_id")
                return None
            image: dict[str, Any] = {"url": url}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            return {"type": "image_url", "image_url": image}
        if kind == "input_file":
            file = {k: part[k] for k in ("file_data", "file_id", "filename") if isinstance(part.get(k), str)}
            if "file_data" not in file and "file_id" not in file:
                self.drop("input_file:file_url")
                return None
            return {"type": "file", "file": file}
        self.drop(f"content:{kind}")
        return None


def _tools(tools: Any, b: _Builder) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for tool in tools if isinstance(tools, list) else []:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function":
            function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
            function.setdefault("parameters", {"type": "object", "properties": {}})
            out.append({"type": "function", "function": function})
        elif kind == "custom" and isinstance(tool.get("name"), str):
            fmt = tool.get("format")
            if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
                b.drop(f"custom_tool_format:{fmt.get('type')}")
            description = str(tool.get("description") or "")
            out.append({"type": "function", "function": {
                "name": tool["name"], "description": description,
                "parameters": {"type": "object", "properties": {CUSTOM_INPUT: {"type": "string"}},
                               "required": [CUSTOM_INPUT]}}})
        else:
            b.drop(f"tools:{kind}")
    return out


def custom_tool_names(request_body: dict[str, Any]) -> frozenset[str]:
    """Names of the request's custom tools (their chat calls become ``custom_tool_call`` items)."""
    tools = request_body.get("tools")
    return frozenset(t["name"] for t in tools if isinstance(t, dict) and t.get("type") == "custom"
                     and isinstance(t.get("name"), str)) if isinstance(tools, list) else frozenset()


def _tool_choice(choice: Any, b: _Builder) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    named = isinstance(choice, dict) and isinstance(choice.get("name"), str)
    if named and choice.get("type") in ("function", "custom"):
        return {"type": "function", "function": {"name": choice["name"]}}
    b.drop(f"tool_choice:{choice.get('type') if isinstance(choice, dict) else type(choice).__name__}")
    return None


def _response_format(text: Any, b: _Builder) -> dict[str, Any] | None:
    if not isinstance(text, dict):
        return None
    if text.get("verbosity") is not None:
        b.drop("text.verbosity")
    fmt = text.get("format")
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "description", "schema", "strict") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": schema}
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") not in (None, "text"):
        b.drop(f"text.format:{fmt.get('type')}")
    return None


def message_origins(body: dict[str, Any], history_items: list[dict[str, Any]] | None = None) -> list[list[int]]:
    """For each message of ``responses_to_chat(body, history_items)``, the positions (in
    ``history_items`` followed by the request's input items) of the items it was made from: a
    message item's own, an assistant message's merged function calls, and the items no chat message
    carries (reasoning, left-out kinds), placed with the message after them, or with the one before
    when the next opens a turn. ``instructions`` come from no item. What compression keeps of the chat
    messages maps back to whole input items through this."""
    b = _Builder(track=True)
    _translate(b, body, history_items)
    assert b.origins is not None
    return b.origins


def _translate(b: _Builder, body: dict[str, Any], history_items: list[dict[str, Any]] | None) -> None:
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        b.messages.append({"role": "system", "content": instructions})
        b._added()
    for position, item in enumerate([*(history_items or ()), *request_input_items(body)]):
        b._at = position
        b.item(item)
    b._at = -1
    b.finish()


def responses_to_chat(body: dict[str, Any], history_items: list[dict[str, Any]] | None = None, *,
                      strict: bool = False) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The chat completions body for a validated Responses ``body`` and the names of what was left
    out. ``history_items`` are the earlier turns' input and output items (``previous_response_id``
    resolved by the caller). ``strict``: refuse with :class:`InvalidRequest` instead of leaving out."""
    b = _Builder()
    _translate(b, body, history_items)
    chat: dict[str, Any] = {"model": body.get("model"), "messages": b.messages}
    tools = _tools(body.get("tools"), b)
    if tools:
        chat["tools"] = tools
        choice = _tool_choice(body.get("tool_choice"), b)
        if choice is not None:
            chat["tool_choice"] = choice
    for key in PASSED_AS_IS:
        if body.get(key) is not None and (key != "parallel_tool_calls" or tools):
            chat[key] = body[key]
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict):
        if reasoning.get("effort") is not None:
            chat["reasoning_effort"] = reasoning["effort"]
        if reasoning.get("summary") is not None or reasoning.get("generate_summary") is not None:
            b.drop("reasoning.summary")
    response_format = _response_format(body.get("text"), b)
    if response_format is not None:
        chat["response_format"] = response_format
    for name in body.get("include") or ():
        b.drop(f"include:{name}")
    for key in NAMED_WHEN_SET:
        if body.get(key) not in (None, False):
            b.drop(key)
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    if not chat["messages"]:
        raise InvalidRequest("The request has no input a chat model can take.", code="missing_field", param="input")
    if strict and b.dropped:
        raise InvalidRequest(
            f"The chosen deployment speaks only chat completions and cannot honour: {', '.join(b.dropped)} "
            f"(strict mode refuses instead of leaving them out).",
            code="unsupported_feature", param=_param_of(b.dropped[0]))
    return chat, tuple(b.dropped)


def _param_of(name: str) -> str:
    head = name.split(":", 1)[0]
    return {"input": "input", "content": "input", "input_image": "input", "input_file": "input", "tool_output": "input",
            "custom_tool_format": "tools"}.get(head, head)
