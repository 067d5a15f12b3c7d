"""The Messages API codec without I/O: validation, translation both ways, error envelopes, the token
estimate; replies checked against the official SDKs' own models (anthropic.types / openai.types)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest
from canned_http import Canned, canned, canned_server  # noqa: F401  (fixtures)

from gateway import tokens
from gateway.api.anthropic import (
    chat_to_messages,
    chat_to_messages_reply,
    count_tokens_estimate,
    error_body,
    error_event,
    error_headers,
    messages_reply_to_chat,
    messages_to_chat,
    validate_messages,
)
from gateway.errors import (
    AuthenticationFailed,
    BudgetExceeded,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    PermissionDenied,
    RateLimited,
    RequestTooLarge,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.pricing import usage_from_openai

IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
EPHEMERAL = {"type": "ephemeral"}

# Shaped like a Claude Code request: system blocks with cache_control, role "system" inside messages,
# adaptive thinking with display omitted, output_config, context_management edits, server tools,
# thinking blocks in history, a tool round trip, metadata, beta fields and an unknown future field.
CLAUDE_CODE: dict[str, Any] = {
    "model": "claude-sonnet-4-5", "max_tokens": 32000, "stream": True,
    "system": [{"type": "text", "text": "You are Claude Code."},
               {"type": "text", "text": "Follow the rules.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
    "messages": [
        {"role": "system", "content": "The date is 2026-12-06."},
        {"role": "user", "content": [{"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                                     {"type": "text", "text": "List the files", "cache_control": EPHEMERAL}, IMAGE]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should call ls.", "signature": "c2ln"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "Listing."},
            {"type": "tool_use", "id": "toolu_01", "name": "Bash", "input": {"command": "ls", "timeout": 5}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "a.py\nb.py"}],
             "cache_control": EPHEMERAL},
            {"type": "text", "text": "Now read a.py"}]},
    ],
    "tools": [{"name": "Bash", "description": "Run a command",
               "input_schema": {"type": "object", "properties": {"command": {"type": "string"}},
                                "required": ["command"]}, "cache_control": EPHEMERAL},
              {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
    "tool_choice": {"type": "auto"},
    "thinking": {"type": "adaptive", "display": "omitted"},
    "output_config": {"effort": "high"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "metadata": {"user_id": "user_0f3a_account_9_session_42"},
    "temperature": 1,
    "future_field_2027": {"deep": [[[{"x": [1, {"y": None}]}]]]},
}


def with_(body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    out.update(changes)
    return out


def minimal(**changes: Any) -> dict[str, Any]:
    return with_({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}, **changes)


# ------------------------------------------------------------------ validation


def test_claude_code_request_is_accepted() -> None:
    validate_messages(copy.deepcopy(CLAUDE_CODE))


def test_count_tokens_body_needs_no_max_tokens() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    validate_messages(body, require_max_tokens=False)
    with pytest.raises(InvalidRequest) as info:
        validate_messages(body)
    assert info.value.param == "max_tokens"


def _msgs(*contents: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": c} for c in contents]


BAD: list[tuple[Any, str]] = [
    ([minimal()], "body"),
    ("not json", "body"),
    ({"max_tokens": 1, "messages": _msgs("x")}, "model"),
    (minimal(model=["claude"]), "model"),
    (minimal(model="  "), "model"),
    (minimal(max_tokens=0), "max_tokens"),
    (minimal(max_tokens="100"), "max_tokens"),
    (minimal(max_tokens=True), "max_tokens"),
    (minimal(max_tokens=1.5), "max_tokens"),
    (minimal(messages=None), "messages"),
    (minimal(messages={"role": "user"}), "messages"),
    (minimal(messages=[]), "messages"),
    (minimal(messages=["hi"]), "messages.0"),
    (minimal(messages=[{"role": "tool", "content": "x"}]), "messages.0.role"),
    (minimal(messages=[{"role": ["user"], "content": "x"}]), "messages.0.role"),
    (minimal(messages=[{"role": "user"}]), "messages.0.content"),
    (minimal(messages=_msgs(5)), "messages.0.content"),
    (minimal(messages=_msgs({"type": "text", "text": "x"})), "messages.0.content"),
    (minimal(messages=_msgs("ok", ["bare string"])), "messages.1.content.0"),
    (minimal(messages=_msgs([{"text": "no type"}])), "messages.0.content.0.type"),
    (minimal(messages=_msgs([{"type": ["text"], "text": "x"}])), "messages.0.content.0.type"),
    (minimal(messages=_msgs([{"type": "text", "text": ["a", "b"]}])), "messages.0.content.0.text"),
    (minimal(messages=_msgs([{"type": "image"}])), "messages.0.content.0.source"),
    (minimal(messages=_msgs([{"type": "tool_use", "id": "t", "name": "f", "input": "{}"}])),
     "messages.0.content.0.input"),
    (minimal(messages=_msgs([{"type": "tool_use", "id": 7, "name": "f", "input": {}}])), "messages.0.content.0.id"),
    (minimal(messages=_msgs([{"type": "tool_result", "content": "x"}])), "messages.0.content.0.tool_use_id"),
    (minimal(messages=_msgs([{"type": "tool_result", "tool_use_id": "t", "content": 5}])),
     "messages.0.content.0.content"),
    (minimal(messages=_msgs([{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": 1}]}])),
     "messages.0.content.0.content.0.text"),
    (minimal(messages=_msgs([{"type": "tool_result", "tool_use_id": "t", "content": ["x"]}])),
     "messages.0.content.0.content.0"),
    (minimal(messages=_msgs([{"type": "thinking", "thinking": None}])), "messages.0.content.0.thinking"),
    (minimal(system=5), "system"),
    (minimal(system={"type": "text", "text": "x"}), "system"),
    (minimal(system=[{"type": "image", "source": {}}]), "system.0"),
    (minimal(system=[{"type": "text", "text": ["x"]}]), "system.0.text"),
    (minimal(stream="yes"), "stream"),
    (minimal(tools={"name": "f"}), "tools"),
    (minimal(tools=["f"]), "tools.0"),
    (minimal(tools=[{"name": "f"}]), "tools.0.input_schema"),
    (minimal(tools=[{"input_schema": {}}]), "tools.0.name"),
    (minimal(tools=[{"name": "f", "input_schema": {}, "description": ["d"]}]), "tools.0.description"),
    (minimal(tools=[{"type": 3, "name": "f"}]), "tools.0.type"),
    (minimal(tools=[{"type": "web_search_20250305", "name": {"n": 1}}]), "tools.0.name"),
    (minimal(tool_choice="auto"), "tool_choice"),
    (minimal(tool_choice={"type": "sometimes"}), "tool_choice"),
    (minimal(tool_choice={"type": "tool"}), "tool_choice.name"),
    (minimal(metadata=["u"]), "metadata"),
    (minimal(metadata={"user_id": 5}), "metadata.user_id"),
    (minimal(thinking="on"), "thinking"),
    (minimal(thinking={}), "thinking"),
    (minimal(thinking={"type": "enabled", "budget_tokens": "lots"}), "thinking.budget_tokens"),
    (minimal(stop_sequences="END"), "stop_sequences"),
    (minimal(stop_sequences=["END", 5]), "stop_sequences"),
    (minimal(temperature="hot"), "temperature"),
    (minimal(top_p=[1]), "top_p"),
    (minimal(top_k=1.5), "top_k"),
]


@pytest.mark.parametrize(("body", "param"), BAD, ids=[f"{i}-{p}" for i, (_, p) in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_param(body: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_messages(body)
    assert info.value.status_code == 400 and info.value.param == param
    assert info.value.message


def test_unknown_block_types_and_fields_pass() -> None:
    validate_messages(minimal(messages=_msgs([{"type": "server_tool_use", "id": "s", "name": "web_search",
                                               "input": {"query": "q"}},
                                              {"type": "search_result", "source": "x", "title": "t", "content": []},
                                              {"type": "container_upload", "file_id": "f"},
                                              {"type": "brand_new_block_2027", "payload": [1, [2, [3]]]}]),
                              cache_control=EPHEMERAL, service_tier="auto", container="c", mcp_servers=[]))


def test_deep_nesting_is_a_clear_400_not_a_crash() -> None:
    deep: Any = "bottom"
    for _ in range(600):
        deep = {"d": deep}
    body = minimal(messages=[{"role": "user", "content": "x"},
                             {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                                                "input": deep}]}],
                   future=deep)
    validate_messages(body)                       # validation never walks unknown nesting
    with pytest.raises(InvalidRequest) as info:   # the translation has to serialise the tool input
        messages_to_chat(body)
    assert info.value.param == "messages.1.content.0.input"


# ------------------------------------------------------------------ Messages -> chat


def test_claude_code_request_translated_to_chat() -> None:
    chat, dropped = messages_to_chat(copy.deepcopy(CLAUDE_CODE))
    assert chat == {
        "model": "claude-sonnet-4-5",
        "messages": [
            {"role": "system", "content": "You are Claude Code.\n\nFollow the rules.\n\nThe date is 2026-12-06."},
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                {"type": "text", "text": "List the files"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]},
            {"role": "assistant", "content": "Listing.", "tool_calls": [
                {"id": "toolu_01", "type": "function",
                 "function": {"name": "Bash", "arguments": '{"command":"ls","timeout":5}'}}]},
            {"role": "tool", "tool_call_id": "toolu_01", "content": "a.py\nb.py"},
            {"role": "user", "content": "Now read a.py"},
        ],
        "max_tokens": 32000, "temperature": 1, "stream": True, "stream_options": {"include_usage": True},
        "user": "user_0f3a_account_9_session_42",
        "tools": [{"type": "function", "function": {
            "name": "Bash", "description": "Run a command",
            "parameters": {"type": "object", "properties": {"command": {"type": "string"}},
                           "required": ["command"]}}}],
        "tool_choice": "auto",
    }
    assert dropped == ("cache_control", "thinking", "tools.web_search_20250305", "output_config.effort",
                       "context_management", "future_field_2027")


def test_strict_mode_refuses_naming_every_dropped_feature() -> None:
    with pytest.raises(InvalidRequest) as info:
        messages_to_chat(copy.deepcopy(CLAUDE_CODE), strict=True)
    assert info.value.code == "unsupported_feature" and info.value.param == "cache_control"
    for name in ("thinking", "tools.web_search_20250305", "output_config.effort", "context_management"):
        assert name in info.value.message


def test_strict_mode_passes_a_plain_request() -> None:
    body = minimal(system="Be brief.", stop_sequences=["END"], top_p=0.5, thinking={"type": "disabled"})
    chat, dropped = messages_to_chat(body, strict=True)
    assert dropped == ()
    assert chat == {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "hi"}],
                    "max_tokens": 10, "top_p": 0.5, "stop": ["END"]}   # no stream, no stream_options


def test_structured_output_format_becomes_response_format() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    chat, dropped = messages_to_chat(minimal(output_config={"format": {"type": "json_schema", "schema": schema}}),
                                     strict=True)
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    assert dropped == ()
    back, _ = chat_to_messages(chat)
    assert back["output_config"] == {"format": {"type": "json_schema", "schema": schema}}


def test_dropped_names_are_header_safe_and_bounded() -> None:
    body = minimal(messages=_msgs([{"type": "evil\r\nset-cookie: x=1"}, {"type": "é" * 200}]),
                   **{f"field_{i}": i for i in range(40)})
    _, dropped = messages_to_chat(body)
    assert dropped[:2] == ("evil??set-cookie: x?1", "?" * 64)
    assert len(dropped) == 16
    for name in dropped:
        assert name.isascii() and name.isprintable() and len(name) <= 64


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, {"tool_choice": "auto"}),
    ({"type": "any"}, {"tool_choice": "required"}),
    ({"type": "none"}, {"tool_choice": "none"}),
    ({"type": "tool", "name": "f"}, {"tool_choice": {"type": "function", "function": {"name": "f"}}}),
    ({"type": "auto", "disable_parallel_tool_use": True}, {"tool_choice": "auto", "parallel_tool_calls": False}),
    (None, {}),
])
def test_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    body = minimal(tools=[{"name": "f", "input_schema": {"type": "object"}}])
    if choice is not None:
        body["tool_choice"] = choice
    chat, _ = messages_to_chat(body)
    assert {k: chat[k] for k in ("tool_choice", "parallel_tool_calls") if k in chat} == expected


def test_tool_results_with_errors_and_images() -> None:
    body = minimal(messages=[
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}},
                                          {"type": "tool_use", "id": "b", "name": "g", "input": {"x": [1]}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "a", "content": "boom", "is_error": True},
            {"type": "tool_result", "tool_use_id": "b", "content": [{"type": "text", "text": "shot"}, IMAGE]},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc text"}},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}]}])
    chat, dropped = messages_to_chat(body)
    assert chat["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": '{"x":[1]}'}}]}
    assert chat["messages"][2:] == [
        {"role": "tool", "tool_call_id": "a", "content": "Error: boom"},
        {"role": "tool", "tool_call_id": "b", "content": "shot"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                                     {"type": "text", "text": "doc text"}]}]
    assert dropped == ("document",)


# ------------------------------------------------------------------ chat reply -> Messages reply


def chat_reply(message: dict[str, Any], finish: str | None = "stop", usage: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    return {"id": "chatcmpl-abc123", "object": "chat.completion", "created": 1, "model": "local",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
            "usage": usage or {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}


def test_chat_reply_to_messages_reply_validates_as_an_sdk_message() -> None:
    reply = chat_to_messages_reply(chat_reply(
        {"content": "Let me check.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "Bash", "arguments": '{"command": "ls"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "Read", "arguments": "not json"}}]},
        "tool_calls",
        {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107,
         "prompt_tokens_details": {"cached_tokens": 60}, "cost_usd": 0.000123}), "claude-sonnet-4-5")
    assert reply == {
        "id": "msg_abc123", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls"}},
                    {"type": "tool_use", "id": "call_2", "name": "Read", "input": {}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 40, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 60,
                  "output_tokens": 7, "cost_usd": 0.000123}}
    message = anthropic.types.Message.model_validate(reply)
    assert message.usage.cache_read_input_tokens == 60 and message.content[1].type == "tool_use"


@pytest.mark.parametrize(("finish", "stop"), [("stop", "end_turn"), ("length", "max_tokens"),
                                              ("tool_calls", "tool_use"), ("content_filter", "refusal"),
                                              (None, "end_turn"), ("weird", "end_turn")])
def test_stop_reasons(finish: str | None, stop: str) -> None:
    assert chat_to_messages_reply(chat_reply({"content": "x"}, finish), "m")["stop_reason"] == stop


def test_tool_calls_with_a_stop_finish_are_tool_use() -> None:
    reply = chat_to_messages_reply(chat_reply({"content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, "stop"), "m")
    assert reply["stop_reason"] == "tool_use"


def test_empty_or_odd_chat_reply_still_makes_a_message() -> None:
    for body in ({}, {"choices": []}, {"choices": ["x"], "usage": "none"}, chat_reply({"content": None})):
        reply = chat_to_messages_reply(body, "m")
        assert reply["content"] == [] and reply["stop_reason"] == "end_turn"
        anthropic.types.Message.model_validate(reply)


def test_refusal_becomes_text_and_refusal_stop() -> None:
    reply = chat_to_messages_reply(chat_reply({"content": None, "refusal": "I can't."}), "m")
    assert reply["content"] == [{"type": "text", "text": "I can't."}] and reply["stop_reason"] == "refusal"


# ------------------------------------------------------------------ chat request -> Messages request


def test_chat_request_translated_to_messages() -> None:
    body = {
        "model": "claude", "max_completion_tokens": 300, "max_tokens": 50, "temperature": 1.6, "top_p": 0.9,
        "stop": "END", "user": "u-7", "stream": True, "stream_options": {"include_usage": True},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": [{"type": "text", "text": "What is here?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/"}},
                                         {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
                                         {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": '{"at": "desk"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "look", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a lamp"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "a cup"}]},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [{"type": "function", "function": {"name": "look", "description": "Look",
                                                    "parameters": {"type": "object"}}},
                  {"type": "function", "function": {"name": "noop"}}],
        "tool_choice": "required", "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}},
        "seed": 7, "logprobs": True, "n": 1,
    }
    out, dropped = chat_to_messages(body)
    assert out == {
        "model": "claude", "system": "Be brief.\n\nUse tools.",
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is here?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/"}},
                {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "call_1", "name": "look", "input": {"at": "desk"}},
                {"type": "tool_use", "id": "call_2", "name": "look", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "a lamp"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "a cup"},
                {"type": "text", "text": "Thanks"}]},
        ],
        "max_tokens": 300, "temperature": 1.0, "top_p": 0.9, "stop_sequences": ["END"], "stream": True,
        "metadata": {"user_id": "u-7"},
        "tools": [{"name": "look", "input_schema": {"type": "object"}, "description": "Look"},
                  {"name": "noop", "input_schema": {"type": "object", "properties": {}}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
    }
    assert dropped == ("input_audio", "seed", "logprobs")


def test_chat_request_defaults_and_strict() -> None:
    out, dropped = chat_to_messages({"model": "c", "messages": [{"role": "user", "content": "hi"}]},
                                    default_max_tokens=1234)
    assert out == {"model": "c", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                   "max_tokens": 1234}
    assert dropped == ()
    with pytest.raises(InvalidRequest) as info:
        chat_to_messages({"model": "c", "messages": [{"role": "user", "content": "hi"}], "n": 3,
                          "response_format": {"type": "json_object"}}, strict=True)
    assert info.value.code == "unsupported_feature" and "n" in info.value.message
    assert "response_format" in info.value.message


def test_chat_tool_call_with_bad_arguments_is_a_400() -> None:
    body = {"model": "c", "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                              "function": {"name": "f", "arguments": "[1, 2]"}}]}]}
    with pytest.raises(InvalidRequest) as info:
        chat_to_messages(body)
    assert info.value.param == "messages[1].tool_calls[0].function.arguments"


# ------------------------------------------------------------------ Messages reply -> chat reply


def test_messages_reply_to_chat_validates_as_an_openai_completion() -> None:
    reply = {"id": "msg_01XYZ", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
             "content": [{"type": "thinking", "thinking": "Hmm.", "signature": "c2ln"},
                         {"type": "text", "text": "Calling."},
                         {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}],
             "stop_reason": "tool_use", "stop_sequence": None,
             "usage": {"input_tokens": 25, "cache_read_input_tokens": 40, "cache_creation_input_tokens": 50,
                       "cache_creation": {"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 20},
                       "output_tokens": 12}}
    chat = messages_reply_to_chat(reply)
    completion = openai.types.chat.ChatCompletion.model_validate(chat)
    assert completion.id == "chatcmpl-01XYZ" and completion.model == "claude-sonnet-4-5"
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Calling."
    assert choice.message.tool_calls is not None
    assert choice.message.tool_calls[0].function.arguments == '{"command":"ls"}'
    assert chat["choices"][0]["message"]["reasoning_content"] == "Hmm."
    assert chat["usage"]["prompt_tokens"] == 115 and chat["usage"]["completion_tokens"] == 12
    assert chat["usage"]["prompt_tokens_details"] == {"cached_tokens": 40}


@pytest.mark.parametrize("usage", [
    {"input_tokens": 25, "cache_read_input_tokens": 40, "cache_creation_input_tokens": 50,
     "cache_creation": {"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 20}, "output_tokens": 12},
    {"input_tokens": 7, "output_tokens": 3},
    {"input_tokens": 1, "cache_read_input_tokens": 900, "cache_creation_input_tokens": 0, "output_tokens": 0},
])
def test_translated_usage_prices_like_the_raw_anthropic_usage(usage: dict[str, Any]) -> None:
    """The chat usage built for a chat client keeps every cache tier the pricing reads."""
    chat = messages_reply_to_chat({"content": [], "stop_reason": "end_turn", "usage": usage})
    assert usage_from_openai(chat["usage"]) == usage_from_openai(usage)
    back = chat_to_messages_reply(chat, "m")["usage"]
    assert back["input_tokens"] == usage["input_tokens"] and back["output_tokens"] == usage["output_tokens"]
    assert back["cache_read_input_tokens"] == usage.get("cache_read_input_tokens", 0)
    assert back["cache_creation_input_tokens"] == usage.get("cache_creation_input_tokens", 0)


@pytest.mark.parametrize(("stop", "finish"), [("end_turn", "stop"), ("stop_sequence", "stop"),
                                              ("max_tokens", "length"), ("tool_use", "tool_calls"),
                                              ("refusal", "content_filter"), ("pause_turn", "stop"),
                                              ("model_context_window_exceeded", "length"), (None, "stop")])
def test_finish_reasons(stop: str | None, finish: str) -> None:
    chat = messages_reply_to_chat({"content": [{"type": "text", "text": "x"}], "stop_reason": stop})
    assert chat["choices"][0]["finish_reason"] == finish


# ------------------------------------------------------------------ errors


ERRORS: list[tuple[GatewayError, int, str]] = [
    (InvalidRequest("max_tokens: Field required", param="max_tokens"), 400, "invalid_request_error"),
    (AuthenticationFailed("Invalid API key."), 401, "authentication_error"),
    (PermissionDenied("Team 'x' may not use model 'y'."), 403, "permission_error"),
    (ModelNotFound("The model 'nope' does not exist."), 404, "not_found_error"),
    (MethodNotAllowed("Use POST."), 405, "invalid_request_error"),
    (RequestTooLarge("The body is over 16 MiB."), 413, "request_too_large"),
    (RateLimited("Team 'x' is over 10 requests per minute."), 429, "rate_limit_error"),
    (BudgetExceeded("The daily budget of team 'x' ($5.00) is spent."), 429, "rate_limit_error"),
    (GatewayError("The gateway hit an internal error; it has been logged."), 500, "api_error"),
    (UpstreamError("deployment d failed with HTTP 500: boom"), 502, "api_error"),
    (ServiceUnavailable("Redis is down."), 503, "overloaded_error"),
    (UpstreamTimeout("deployment d timed out"), 504, "timeout_error"),
]


@pytest.mark.parametrize(("exc", "status", "kind"), ERRORS, ids=[type(e).__name__ for e, _, _ in ERRORS])
def test_error_envelope(exc: GatewayError, status: int, kind: str) -> None:
    assert exc.status_code == status
    body = orjson.loads(error_body(exc))
    assert body == {"type": "error", "error": {"type": kind, "message": f"{exc.code}: {exc.message}"}}
    assert orjson.loads(error_body(exc, request_id="req_1"))["request_id"] == "req_1"
    event = error_event(exc)
    assert event == b"event: error\ndata: " + error_body(exc) + b"\n\n"


def test_overloaded_529() -> None:
    exc = UpstreamError("deployment d is overloaded")
    exc.status_code = 529
    assert orjson.loads(error_body(exc))["error"]["type"] == "overloaded_error"


SDK_ERRORS: list[tuple[GatewayError, type[anthropic.APIStatusError]]] = [
    (InvalidRequest("messages: Field required"), anthropic.BadRequestError),
    (AuthenticationFailed("Invalid API key."), anthropic.AuthenticationError),
    (PermissionDenied("no"), anthropic.PermissionDeniedError),
    (ModelNotFound("The model 'nope' does not exist."), anthropic.NotFoundError),
    (RequestTooLarge("too big"), anthropic.RequestTooLargeError),
    (BudgetExceeded("The daily budget of team 'x' ($5.00) is spent."), anthropic.RateLimitError),
    (ServiceUnavailable("Redis is down."), anthropic.InternalServerError),
]


@pytest.mark.parametrize(("exc", "sdk_error"), SDK_ERRORS, ids=[type(e).__name__ for e, _ in SDK_ERRORS])
def test_the_sdk_raises_its_own_exceptions(canned: Canned, exc: GatewayError,  # noqa: F811
                                           sdk_error: type[anthropic.APIStatusError]) -> None:
    canned.answer(error_body(exc), exc.status_code)
    client = anthropic.Anthropic(base_url=canned.url, api_key="k", max_retries=0)
    with pytest.raises(sdk_error) as info:
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert exc.message in str(info.value) and f"{exc.code}:" in str(info.value)
    assert isinstance(info.value.body, dict) and info.value.body["error"]["type"] == \
        orjson.loads(error_body(exc))["error"]["type"]


def _headers(exc: GatewayError) -> list[tuple[str, str]]:
    return [(k.decode(), v.decode()) for k, v in error_headers(exc) if k != b"content-type"]


def test_a_spent_budget_is_not_retried_by_the_sdk(canned: Canned) -> None:  # noqa: F811
    exc = BudgetExceeded("The daily budget of team 'x' ($5.00) is spent.")
    assert (b"x-should-retry", b"false") in error_headers(exc)
    canned.answer(error_body(exc), 429, headers=_headers(exc))
    client = anthropic.Anthropic(base_url=canned.url, api_key="k", max_retries=2)
    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert len(canned.requests) == 1


def test_a_rate_limit_keeps_retry_after_and_may_be_retried() -> None:
    exc = RateLimited("Team 'x' is over 10 requests per minute.", headers={"retry-after": "3"})
    assert error_headers(exc) == [(b"content-type", b"application/json"), (b"retry-after", b"3")]


# ------------------------------------------------------------------ token estimate


def _chat_count(body: dict[str, Any]) -> int:
    chat, _ = messages_to_chat(body)
    return tokens.count_chat(chat["messages"], body["model"], chat.get("tools"))


def test_estimate_counts_the_translated_body_plus_dropped_tools() -> None:
    body = copy.deepcopy(CLAUDE_CODE)
    server_tool = CLAUDE_CODE["tools"][1]
    expected = _chat_count(body) + tokens.count_text(orjson.dumps(server_tool).decode(), body["model"])
    assert count_tokens_estimate(body) == expected
    del body["max_tokens"]   # count_tokens bodies have none
    assert count_tokens_estimate(body) == expected


@pytest.mark.parametrize("grow", [
    lambda b: b["messages"].append({"role": "user", "content": "and one more question " * 20}),
    lambda b: b.update(system="a much longer system prompt " * 30),
    lambda b: b.update(tools=[{"name": "f", "description": "does things " * 10,
                               "input_schema": {"type": "object", "properties": {"a": {"type": "string"}}}}]),
    lambda b: b["messages"][0].update(content=[{"type": "text", "text": "hi"}, IMAGE]),
])
def test_estimate_grows_with_the_prompt(grow: Callable[[dict[str, Any]], None]) -> None:
    base = minimal()
    bigger = copy.deepcopy(base)
    grow(bigger)
    assert count_tokens_estimate(bigger) > count_tokens_estimate(base) > 0
