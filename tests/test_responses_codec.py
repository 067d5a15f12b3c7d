"""The Responses codec's pure parts: validation (Codex's requests accepted, bad input a 400 naming the
param, never anything else on any JSON), translation to chat and back, the Responses event stream made
from chat chunks (checked against the official SDK's types and consumed by the SDK over loopback), and
the input_items listing."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
from mock_responses import MockResponses, mock_responses, mock_responses_server  # noqa: F401  (fixtures)
from openai import OpenAI
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from gateway.api.openai_validation import validate as validate_chat
from gateway.api.responses import (
    ChatToResponsesStream,
    chat_to_response,
    encode_event,
    input_items_page,
    request_input_items,
    responses_to_chat,
    responses_usage_from_chat,
    validate_responses,
    with_item_ids,
)
from gateway.errors import InvalidRequest

EVENTS = TypeAdapter(ResponseStreamEvent)

CODEX_BODY: dict[str, Any] = {
    "model": "gpt-5-codex",
    "instructions": "You are a coding agent.",
    "input": [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<permissions/>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<env/>"},
                                                          {"type": "input_text", "text": " list the files"}]},
    ],
    "tools": [
        {"type": "function", "name": "shell", "description": "Run a command", "strict": False,
         "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}},
                        "required": ["command"]}},
        {"type": "custom", "name": "apply_patch", "description": "Apply a patch",
         "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}},
        {"type": "web_search"},
        {"type": "namespace", "name": "crm", "description": "CRM tools",
         "tools": [{"type": "function", "name": "lookup"}]},
    ],
    "tool_choice": "auto", "parallel_tool_calls": False,
    "reasoning": {"effort": "medium", "summary": "auto"}, "store": False, "stream": True,
    "include": ["reasoning.encrypted_content"], "prompt_cache_key": "thread-1",
    "text": {"verbosity": "medium"}, "client_metadata": {"originator": "codex_exec"},
    "some_future_field": {"nested": [1, 2, 3]},
}


def chat_reply(content: str | None = "Hello there", tool_calls: list[dict[str, Any]] | None = None,
               finish: str = "stop", **message: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content, **message}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1_800_000_000, "model": "local-llama",
            "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70,
                      "prompt_tokens_details": {"cached_tokens": 32},
                      "completion_tokens_details": {"reasoning_tokens": 7}}}


# ---- validation -------------------------------------------------------------------------------------

def test_codex_and_sdk_requests_are_accepted() -> None:
    validate_responses(CODEX_BODY)
    validate_responses({"model": "m", "input": "Hi"})
    validate_responses({"model": "m", "previous_response_id": "resp_1"})   # input may come from the chain
    validate_responses({"model": "m", "input": [
        {"role": "user", "content": "no type: a message"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
        {"type": "function_call", "call_id": "c1", "name": "shell", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        {"type": "custom_tool_call", "call_id": "c2", "name": "apply_patch", "input": "*** Begin Patch"},
        {"type": "custom_tool_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "done"}]},
        {"type": "a_future_item", "whatever": 1},
        {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "data:,"},
                                                         {"type": "a_future_part"}]},
    ], "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
        "max_output_tokens": 1, "metadata": {"k": "v"}, "include": [], "store": True})


@pytest.mark.parametrize("body,param", [
    ([], "body"),
    ({"input": "x"}, "model"),
    ({"model": 3, "input": "x"}, "model"),
    ({"model": ""}, "model"),
    ({"model": "m"}, "input"),
    ({"model": "m", "input": 5}, "input"),
    ({"model": "m", "input": [5]}, "input[0]"),
    ({"model": "m", "input": [{"content": "x"}]}, "input[0].type"),
    ({"model": "m", "input": [{"type": "message", "role": "tool", "content": "x"}]}, "input[0].role"),
    ({"model": "m", "input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"model": "m", "input": [{"role": "user", "content": [{"text": "x"}]}]}, "input[0].content[0]"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": 1}]}]},
     "input[0].content[0].text"),
    ({"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]},
     "input[0].arguments"),
    ({"model": "m", "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"model": "m", "input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
    ({"model": "m", "input": "x", "instructions": ["a"]}, "instructions"),
    ({"model": "m", "input": "x", "stream": "yes"}, "stream"),
    ({"model": "m", "input": "x", "store": 0}, "store"),
    ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "m", "input": "x", "max_output_tokens": True}, "max_output_tokens"),
    ({"model": "m", "input": "x", "max_output_tokens": "5"}, "max_output_tokens"),
    ({"model": "m", "input": "x", "tools": {}}, "tools"),
    ({"model": "m", "input": "x", "tools": [{"name": "f"}]}, "tools[0]"),
    ({"model": "m", "input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"model": "m", "input": "x", "tools": [{"type": "function", "name": "f", "parameters": []}]},
     "tools[0].parameters"),
    ({"model": "m", "input": "x", "previous_response_id": ""}, "previous_response_id"),
    ({"model": "m", "input": "x", "previous_response_id": 7}, "previous_response_id"),
    ({"model": "m", "input": "x", "metadata": []}, "metadata"),
    ({"model": "m", "input": "x", "metadata": {"k": 1}}, "metadata.k"),
    ({"model": "m", "input": "x", "include": "reasoning.encrypted_content"}, "include"),
    ({"model": "m", "input": "x", "reasoning": "high"}, "reasoning"),
    ({"model": "m", "input": "x", "reasoning": {"effort": 3}}, "reasoning.effort"),
    ({"model": "m", "input": "x", "text": {"format": "json"}}, "text.format"),
    ({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"model": "m", "input": "x", "stream_options": True}, "stream_options"),
])
def test_bad_requests_name_the_param(body: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        validate_responses(body)
    assert err.value.param == param and err.value.status_code == 400


def _weird(rng: random.Random, depth: int = 0) -> Any:
    choices: list[Any] = [None, True, False, 0, -1, 1.5, "", "x", "message", "function_call", "user",
                          2 ** 70, float("inf")]
    if depth < 3:
        choices += [[_weird(rng, depth + 1) for _ in range(rng.randint(0, 3))],
                    {k: _weird(rng, depth + 1) for k in rng.sample(
                        ["type", "role", "content", "text", "name", "call_id", "arguments", "output",
                         "format", "schema", "effort", "image_url", "function"], rng.randint(0, 4))}]
    return rng.choice(choices)


def test_any_json_gives_a_400_or_passes_and_translates() -> None:
    rng = random.Random(13)
    fields = ["model", "input", "instructions", "stream", "store", "max_output_tokens", "tools", "tool_choice",
              "previous_response_id", "metadata", "reasoning", "text", "include", "stream_options"]
    accepted = 0
    for _ in range(3000):
        body: dict[str, Any] = {"model": "m", "input": "x"}
        for key in rng.sample(fields, rng.randint(1, 4)):
            body[key] = _weird(rng)
        try:
            validate_responses(body)
        except InvalidRequest:
            continue
        accepted += 1
        try:
            chat, _ = responses_to_chat(body)
        except InvalidRequest:
            continue
        chat_to_response(chat_reply(), body, "resp_x")
    assert accepted > 100


# ---- translation to chat ----------------------------------------------------------------------------

def test_codex_request_to_chat_names_what_is_left_out() -> None:
    chat, dropped = responses_to_chat(copy.deepcopy(CODEX_BODY))
    assert chat["messages"] == [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "system", "content": "<permissions/>"},
        {"role": "user", "content": "<env/> list the files"},
    ]
    assert [t["function"]["name"] for t in chat["tools"]] == ["shell", "apply_patch"]
    assert chat["tools"][0]["function"]["parameters"]["required"] == ["command"]
    assert chat["tools"][1]["function"]["parameters"]["properties"] == {"input": {"type": "string"}}
    assert chat["tool_choice"] == "auto" and chat["parallel_tool_calls"] is False
    assert chat["reasoning_effort"] == "medium"
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    for key in ("prompt_cache_key", "client_metadata", "some_future_field", "store", "include", "reasoning",
                "input", "instructions", "text"):
        assert key not in chat
    assert dropped == ("custom_tool_format:grammar", "tools:web_search", "tools:namespace", "reasoning.summary",
                       "text.verbosity", "include:reasoning.encrypted_content")
    validate_chat("chat", chat)   # what the gateway would accept as a chat request


def test_strict_mode_refuses_with_the_names() -> None:
    with pytest.raises(InvalidRequest) as err:
        responses_to_chat(copy.deepcopy(CODEX_BODY), strict=True)
    assert err.value.code == "unsupported_feature" and err.value.param == "tools"
    assert "tools:web_search" in err.value.message and "include:reasoning.encrypted_content" in err.value.message
    chat, dropped = responses_to_chat({"model": "m", "input": "Hi", "max_output_tokens": 9}, strict=True)
    assert dropped == () and chat == {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 9}


def test_function_call_round_trip_and_history() -> None:
    history = [
        {"id": "msg_1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {"id": "rs_1", "type": "reasoning", "summary": [], "encrypted_content": "gAAA"},
        {"id": "msg_2", "type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"id": "fc_1", "type": "function_call", "call_id": "call_a", "name": "weather", "arguments": '{"c":"Oslo"}'},
        {"id": "fc_2", "type": "function_call", "call_id": "call_b", "name": "weather", "arguments": '{"c":"Rome"}'},
    ]
    body = {"model": "m", "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "weather"},
            "input": [{"type": "function_call_output", "call_id": "call_a", "output": "cold"},
                      {"type": "function_call_output", "call_id": "call_b",
                       "output": [{"type": "input_text", "text": "warm"}]},
                      {"type": "custom_tool_call", "call_id": "call_c", "name": "apply_patch", "input": "PATCH"},
                      {"type": "custom_tool_call_output", "call_id": "call_c", "output": "applied"},
                      {"type": "function_call", "call_id": "call_d", "name": "weather", "arguments": "{}"},
                      {"type": "function_call_output", "call_id": "call_d",
                       "output": [{"type": "input_text", "text": "see image"},
                                  {"type": "input_image", "image_url": "data:,"}]},
                      {"type": "function_call", "call_id": "call_e", "name": "weather", "arguments": "{}"},
                      {"type": "function_call_output", "call_id": "call_e", "output": {"temp": 2 ** 70}}]}
    chat, dropped = responses_to_chat(body, history)
    assert dropped == ("tool_output:input_image",)
    assert chat["messages"][-3]["content"] == "see image" and chat["messages"][-1]["content"] == "{'temp': " \
        "1180591620717411303424}"
    chat["messages"] = chat["messages"][:-4]
    assert chat["messages"] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"c":"Oslo"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "weather", "arguments": '{"c":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "cold"},
        {"role": "tool", "tool_call_id": "call_b", "content": "warm"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_c", "type": "function",
             "function": {"name": "apply_patch", "arguments": '{"input":"PATCH"}'}}]},
        {"role": "tool", "tool_call_id": "call_c", "content": "applied"},
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    validate_chat("chat", chat)


def test_parts_formats_and_plain_fields() -> None:
    body = {"model": "m", "temperature": 0.2, "top_p": 0.9, "user": "u1", "max_output_tokens": 100,
            "text": {"format": {"type": "json_schema", "name": "city", "strict": True,
                                "schema": {"type": "object", "properties": {"name": {"type": "string"}}}}},
            "input": [{"role": "user", "content": [
                {"type": "input_text", "text": "What is this?"},
                {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "low"},
                {"type": "input_image", "file_id": "file_1"},
                {"type": "input_file", "file_data": "data:application/pdf;base64,AA==", "filename": "a.pdf"},
                {"type": "input_file", "file_url": "https://example.com/a.pdf"}]},
                {"type": "web_search_call", "id": "ws_1", "status": "completed"},
                {"type": "item_reference", "id": "msg_9"}]}
    chat, dropped = responses_to_chat(body)
    assert chat["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,AA==", "filename": "a.pdf"}}]}]
    assert dropped == ("input_image:file_id", "input_file:file_url", "input:web_search_call", "input:item_reference")
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "city", "schema": {"type": "object", "properties": {"name": {"type": "string"}}}, "strict": True}}
    assert (chat["temperature"], chat["top_p"], chat["user"], chat["max_tokens"]) == (0.2, 0.9, "u1", 100)
    assert "stream" not in chat and "parallel_tool_calls" not in chat
    json_mode, _ = responses_to_chat({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}})
    assert json_mode["response_format"] == {"type": "json_object"}
    validate_chat("chat", chat)


def test_nothing_a_chat_model_can_take_is_a_400() -> None:
    with pytest.raises(InvalidRequest) as err:
        responses_to_chat({"model": "m", "input": [{"type": "reasoning", "summary": []}]})
    assert err.value.param == "input"


# ---- chat reply to a Response -------------------------------------------------------------------------

def test_text_reply_is_a_response_the_sdk_reads() -> None:
    body = {"model": "local", "input": "Hi", "instructions": "Be brief.", "max_output_tokens": 50,
            "metadata": {"k": "v"}, "store": False}
    out = chat_to_response(chat_reply(reasoning_content="Let me think."), body, "resp_abc")
    parsed = Response.model_validate(out)
    assert parsed.id == "resp_abc" and parsed.object == "response" and parsed.status == "completed"
    assert parsed.output_text == "Hello there" and parsed.model == "local-llama"
    assert [i.type for i in parsed.output] == ["reasoning", "message"]
    assert out["output"][0]["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    assert out["usage"] == {"input_tokens": 50, "input_tokens_details": {"cached_tokens": 32, "cache_write_tokens": 0},
                            "output_tokens": 20,
                            "output_tokens_details": {"reasoning_tokens": 7}, "total_tokens": 70}
    assert (out["instructions"], out["max_output_tokens"], out["metadata"], out["store"]) == \
        ("Be brief.", 50, {"k": "v"}, False)
    assert out["created_at"] == 1_800_000_000


def test_tool_calls_become_function_and_custom_call_items() -> None:
    body = {"model": "m", "input": "fix it", "tools": [
        {"type": "function", "name": "shell", "parameters": {"type": "object"}},
        {"type": "custom", "name": "apply_patch"}]}
    calls = [{"id": "call_1", "type": "function", "function": {"name": "shell", "arguments": '{"cmd":"ls"}'}},
             {"id": "call_2", "type": "function", "function": {"name": "apply_patch",
                                                               "arguments": '{"input":"*** Begin Patch"}'}}]
    out = chat_to_response(chat_reply(None, calls, "tool_calls"), body, "resp_t")
    parsed = Response.model_validate(out)
    assert [i.type for i in parsed.output] == ["function_call", "custom_tool_call"]
    first, second = out["output"]
    assert (first["call_id"], first["name"], first["arguments"], first["status"]) == \
        ("call_1", "shell", '{"cmd":"ls"}', "completed")
    assert first["id"].startswith("fc_")
    assert (second["call_id"], second["name"], second["input"]) == ("call_2", "apply_patch", "*** Begin Patch")


def test_length_stop_is_incomplete_and_odd_replies_do_not_break() -> None:
    out = chat_to_response(chat_reply(finish="length"), {"model": "m", "input": "x"}, "resp_l")
    assert out["status"] == "incomplete" and out["incomplete_details"] == {"reason": "max_output_tokens"}
    Response.model_validate(out)
    for odd in ({}, {"choices": "x"}, {"choices": [None]}, {"choices": [{"message": "x"}], "usage": [1]},
                {"choices": [{"message": {"content": [{"type": "text", "text": "parts"}],
                                          "tool_calls": [None, {"function": None}]}}], "usage": {"prompt_tokens": -5}}):
        out = chat_to_response(odd, {"model": "m", "input": "x"}, "resp_o")   # type: ignore[arg-type]
        Response.model_validate(out)
    assert out["output"][0]["content"][0]["text"] == "parts"
    assert out["usage"]["input_tokens"] == 0


def test_usage_names_and_cost() -> None:
    assert responses_usage_from_chat(None) is None
    assert responses_usage_from_chat({"prompt_tokens": 3, "completion_tokens": 4, "cost_usd": 0.001}) == {
        "input_tokens": 3, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}, "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 7, "cost_usd": 0.001}


# ---- streaming ----------------------------------------------------------------------------------------

def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, Any] | None = None,
          choices: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "local-llama",
                           "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []}
    if usage is not None:
        out["usage"] = usage
    return out


def run(stream: ChatToResponsesStream, chunks: list[dict[str, Any]], usage: dict[str, Any] | None = None
        ) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for c in chunks:
        events += stream.feed(c)
    events += stream.finish(usage)
    for event in events:
        EVENTS.validate_python(event)     # every event is one the official SDK knows, with its required fields
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


TEXT_CHUNKS = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": "lo"}),
               chunk({}, "stop"), chunk(usage={"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
                                        choices=False)]


def test_text_stream_event_sequence() -> None:
    events = run(ChatToResponsesStream({"model": "m", "input": "Hi", "stream": True}, "resp_s"), TEXT_CHUNKS)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == ["Hel", "lo"]
    assert events[6]["text"] == "Hello" and events[7]["part"]["text"] == "Hello"
    assert events[2]["item"]["status"] == "in_progress" and events[8]["item"]["status"] == "completed"
    final = Response.model_validate(events[-1]["response"])
    assert final.id == "resp_s" and final.status == "completed" and final.output_text == "Hello"
    assert final.model == "local-llama"
    assert events[-1]["response"]["usage"] == {"input_tokens": 9,
                                               "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                                               "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0},
                                               "total_tokens": 11}


def test_reasoning_then_text_then_parallel_calls() -> None:
    body = {"model": "m", "input": "x", "tools": [{"type": "function", "name": "f"}, {"type": "custom", "name": "p"}]}
    chunks = [
        chunk({"role": "assistant", "reasoning_content": "Think"}), chunk({"reasoning_content": "ing"}),
        chunk({"content": "Calling."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "f", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                               "function": {"name": "p", "arguments": '{"input":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": '"PATCH"}'}}]}),
        chunk({}, "tool_calls"),
    ]
    stream = ChatToResponsesStream(body, "resp_c")
    events = run(stream, chunks, {"prompt_tokens": 5, "completion_tokens": 9, "cost_usd": 0.25})
    types = [e["type"] for e in events]
    assert types[2:6] == ["response.output_item.added", "response.content_part.added",
                          "response.reasoning_text.delta", "response.reasoning_text.delta"]
    assert types[6:9] == ["response.reasoning_text.done", "response.content_part.done", "response.output_item.done"]
    assert types.index("response.output_item.done", 9) < types.index("response.output_item.added", 12)  # text closed
    args = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert args == ['{"a":', "1}"]                       # the custom tool's JSON is not streamed as arguments
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done[0]["arguments"] == '{"a":1}' and done[0]["name"] == "f"
    custom = [e for e in events if e["type"] == "response.custom_tool_call_input.done"]
    assert custom[0]["input"] == "PATCH"
    final = events[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["reasoning", "message", "function_call", "custom_tool_call"]
    assert [i["id"] for i in final["output"]] == [e["item"]["id"] for e in events
                                                  if e["type"] == "response.output_item.added"]
    assert final["output"][2]["call_id"] == "call_1" and final["output"][3]["input"] == "PATCH"
    assert final["usage"]["cost_usd"] == 0.25 and final["usage"]["total_tokens"] == 14
    assert stream.delivered_text == 'ThinkingCalling.{"a":1}{"input":"PATCH"}'
    assert stream.feed(chunk({"content": "late"})) == [] and stream.finish() == []


def test_length_stop_fail_and_empty_streams() -> None:
    events = run(ChatToResponsesStream({"model": "m", "input": "x"}, "resp_i"),
                 [chunk({"content": "cut"}), chunk({}, "length")])
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-1]["response"]["usage"] is None

    stream = ChatToResponsesStream({"model": "m", "input": "x"}, "resp_f")
    events = stream.feed(chunk({"content": "partial"}))
    events += stream.fail("deployment d1 failed mid-stream", chat_usage={"prompt_tokens": 4, "completion_tokens": 1})
    for event in events:
        EVENTS.validate_python(event)
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"] == {"code": "server_error", "message": "deployment d1 failed mid-stream"}
    assert events[-1]["response"]["usage"]["output_tokens"] == 1
    assert stream.finish() == [] and stream.fail("again") == []

    events = run(ChatToResponsesStream({"model": "m", "input": "x"}, "resp_e"), [])
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.completed"]


def test_encode_event() -> None:
    raw = encode_event({"type": "response.output_text.delta", "sequence_number": 3, "delta": "é\n"})
    assert raw == b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",' \
                  b'"sequence_number":3,"delta":"\xc3\xa9\\n"}\n\n'


def test_the_sdk_consumes_a_translated_stream_over_loopback(mock_responses: MockResponses) -> None:  # noqa: F811
    body = {"model": "m", "input": "Hi", "stream": True,
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}
    chunks = TEXT_CHUNKS[:3] + [
        chunk({"tool_calls": [{"index": 0, "id": "call_9", "function": {"name": "f", "arguments": '{"q":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]}), chunk({}, "tool_calls")]
    events = run(ChatToResponsesStream(body, "resp_sdk"), chunks, {"prompt_tokens": 9, "completion_tokens": 6})
    mock_responses.canned = b"".join(encode_event(e) for e in events)
    client = OpenAI(base_url=f"{mock_responses.url}/v1", api_key="sk-test", max_retries=0)
    with client.responses.stream(model="m", input="Hi", tools=[{"type": "function", "name": "f", "strict": False,
                                                              "parameters": {"type": "object"}}]) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["Hel", "lo"]
    assert final.id == "resp_sdk" and final.output_text == "Hello"
    call = final.output[1]
    assert call.type == "function_call" and call.call_id == "call_9" and call.arguments == '{"q":"x"}'
    assert final.usage is not None and final.usage.total_tokens == 15


# ---- stored input items and their listing -------------------------------------------------------------

def test_input_items_and_their_listing() -> None:
    assert request_input_items({"input": "Hi"}) == [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}]
    items = with_item_ids([{"role": "user", "content": "a"}, {"type": "function_call_output", "call_id": "c",
                                                               "output": "o"}, {"id": "msg_keep", "type": "message"}])
    assert items[0]["type"] == "message" and items[0]["id"].startswith("msg_")
    assert items[1]["id"].startswith("fco_") and items[2]["id"] == "msg_keep"
    items = with_item_ids([{"role": "user", "content": str(i)} for i in range(25)])
    page = input_items_page(items, {})
    assert page["object"] == "list" and len(page["data"]) == 20 and page["has_more"]
    assert page["data"][0] is items[24] and page["first_id"] == items[24]["id"]
    page = input_items_page(items, {"order": "asc", "limit": "10", "after": items[19]["id"]})
    assert page["data"] == items[20:25] and not page["has_more"] and page["last_id"] == items[24]["id"]
    assert input_items_page([], {}) == {"object": "list", "data": [], "first_id": None, "last_id": None,
                                        "has_more": False}
    for query, param in (({"limit": "0"}, "limit"), ({"limit": "x"}, "limit"), ({"order": "up"}, "order"),
                         ({"after": "msg_nope"}, "after")):
        with pytest.raises(InvalidRequest) as err:
            input_items_page(items, query)
        assert err.value.param == param


def test_any_chunks_or_events_never_break_the_stream_code() -> None:
    from gateway.api.responses import ResponsesStreamTap

    rng = random.Random(7)
    for _ in range(300):
        stream = ChatToResponsesStream({"model": "m", "input": "x", "tools": [{"type": "custom", "name": "x"}]},
                                       "resp_z")
        tap = ResponsesStreamTap()
        for _ in range(rng.randint(0, 6)):
            weird = _weird(rng)
            odd = chunk(weird if isinstance(weird, dict) else {"content": weird, "tool_calls": [weird]})
            for event in stream.feed(odd if rng.random() < 0.8 else weird):
                EVENTS.validate_python(event)
            tap.observe(weird if isinstance(weird, dict) else {"type": weird})
        for event in stream.finish(_weird(rng) if rng.random() < 0.5 else None):
            EVENTS.validate_python(event)       # whatever came in, the events are ones the SDK knows


def test_dropped_names_are_header_safe_and_bounded() -> None:
    items = [{"type": f"evil\r\nx-injected: {i} é" + "y" * 100} for i in range(40)]
    _, dropped = responses_to_chat({"model": "m", "input": [{"role": "user", "content": "hi"}, *items]})
    assert len(dropped) == 16
    for name in dropped:
        assert len(name) <= 64 and name.isascii() and "\r" not in name and "\n" not in name and " " not in name
        name.encode("latin-1")
    assert dropped[0].startswith("input:evil??x-injected:?0??")
