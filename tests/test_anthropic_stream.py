"""Stream translation: chat chunks -> Messages events read by the official anthropic SDK off a loopback
socket, and Messages events (from the native provider against the mock Messages API) -> chat chunks
read by the openai SDK. Real upstreams: bench/mock_upstream.py (chat) and tests/mock_anthropic.py."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import orjson
import pytest
from canned_http import Canned, canned, canned_server  # noqa: F401  (fixtures)
from mock_anthropic import MockAnthropic, mock_anthropic, mock_anthropic_server  # noqa: F401  (fixtures)

from gateway.api.anthropic import (
    ChatToMessagesStream,
    MessagesToChatStream,
    chat_to_messages,
    chat_to_messages_reply,
    encode_event,
    error_event,
    messages_to_chat,
)
from gateway.api.anthropic.translate import chat_usage
from gateway.errors import BudgetExceeded, UpstreamError
from gateway.policy import Deployment
from gateway.pricing import Price, usage_from_openai
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.base import Call
from gateway.providers.httpclient import HttpClient
from gateway.providers.openai_compat import OpenAICompatProvider

SSE = "text/event-stream"


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, Any] | None = None,
          ) -> dict[str, Any]:
    out: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "local",
                           "choices": [] if delta is None else [{"index": 0, "delta": delta,
                                                                 "finish_reason": finish}]}
    if usage is not None:
        out["usage"] = usage
    return out


def translate(chunks: list[dict[str, Any]], usage: dict[str, Any] | None = None, **kwargs: Any
              ) -> list[dict[str, Any]]:
    stream = ChatToMessagesStream("claude-sonnet-4-5", message_id="msg_t1", **kwargs)
    events = [e for c in chunks for e in stream.feed(c)]
    return events + stream.finish(usage)


def sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(encode_event(e) for e in events)


def sdk(canned: Canned) -> anthropic.Anthropic:  # noqa: F811
    return anthropic.Anthropic(base_url=canned.url, api_key="k", max_retries=0)


USAGE = {"prompt_tokens": 30, "completion_tokens": 3, "total_tokens": 33,
         "prompt_tokens_details": {"cached_tokens": 10}}


def test_text_stream_events() -> None:
    events = translate([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}),
                        chunk({"content": "lo"}), chunk({}, "stop"), chunk(usage=USAGE)], input_tokens=20)
    assert events == [
        {"type": "message_start", "message": {
            "id": "msg_t1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 20, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                      "output_tokens": 0}}},
        {"type": "ping"},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"input_tokens": 20, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 10,
                   "output_tokens": 3}},
        {"type": "message_stop"},
    ]


def test_encode_event_framing() -> None:
    assert encode_event({"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'
    event = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "é\n"}}
    assert encode_event(event) == b"event: content_block_delta\ndata: " + orjson.dumps(event) + b"\n\n"


def test_tool_calls_read_by_the_sdk(canned: Canned) -> None:  # noqa: F811
    chunks = [chunk({"role": "assistant", "content": "Let me look."}),
              chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                     "function": {"name": "Bash", "arguments": ""}}]}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"comm'}}]}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'and": "ls"}'}}]}),
              chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                     "function": {"name": "Read", "arguments": '{"path": "a.py"}'}}]}),
              chunk({}, "tool_calls"), chunk(usage=USAGE)]
    events = translate(chunks)
    assert [e["index"] for e in events if e["type"] == "content_block_start"] == [0, 1, 2]
    assert [e["index"] for e in events if e["type"] == "content_block_stop"] == [0, 1, 2]
    canned.answer(sse(events), content_type=SSE)
    with sdk(canned).messages.stream(model="m", max_tokens=100, messages=[{"role": "user", "content": "x"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "Let me look."
    assert final.id == "msg_t1" and final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    first, second = final.content[1], final.content[2]
    assert first.type == "tool_use" and second.type == "tool_use"
    assert (first.id, first.name, first.input) == ("call_a", "Bash", {"command": "ls"})
    assert (second.id, second.name, second.input) == ("call_b", "Read", {"path": "a.py"})
    assert final.usage.output_tokens == 3 and final.usage.cache_read_input_tokens == 10


def test_tool_calls_without_indexes_and_a_stop_finish() -> None:
    """Ollama-style: each call complete in one chunk, no index, finish_reason "stop"."""
    events = translate([
        chunk({"tool_calls": [{"id": "c1", "function": {"name": "a", "arguments": '{"x": 1}'}}]}),
        chunk({"tool_calls": [{"id": "c2", "function": {"name": "b", "arguments": '{"y"'}}]}),
        chunk({"tool_calls": [{"function": {"arguments": ': 2}'}}]}),
        chunk({}, "stop")])
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [(b["id"], b["name"]) for b in starts] == [("c1", "a"), ("c2", "b")]
    parts = [(e["index"], e["delta"]["partial_json"]) for e in events if e["type"] == "content_block_delta"]
    assert parts == [(0, '{"x": 1}'), (1, '{"y"'), (1, ": 2}")]
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


@pytest.mark.parametrize(("finish", "stop"), [("length", "max_tokens"), ("content_filter", "refusal"),
                                              ("stop", "end_turn"), (None, "end_turn")])
def test_stop_reason(finish: str | None, stop: str) -> None:
    chunks = [chunk({"content": "x"}, finish)]
    assert translate(chunks)[-2]["delta"]["stop_reason"] == stop


def test_usage_given_to_finish_wins_and_carries_cost() -> None:
    events = translate([chunk({"content": "x"}, "stop"), chunk(usage=USAGE)],
                       {"prompt_tokens": 100, "completion_tokens": 9, "cache_creation_input_tokens": 40,
                        "cost_usd": 0.0042})
    assert events[-2]["usage"] == {"input_tokens": 60, "cache_creation_input_tokens": 40,
                                   "cache_read_input_tokens": 0, "output_tokens": 9, "cost_usd": 0.0042}


def test_finish_without_chunks_and_after_finish() -> None:
    stream = ChatToMessagesStream("m", input_tokens=5)
    events = stream.finish()
    assert [e["type"] for e in events] == ["message_start", "ping", "message_delta", "message_stop"]
    assert events[-2]["usage"]["input_tokens"] == 5 and events[-2]["usage"]["output_tokens"] == 0
    assert stream.finish() == [] and stream.feed(chunk({"content": "late"})) == []


def test_odd_chunks_are_skipped_not_fatal() -> None:
    stream = ChatToMessagesStream("m")
    for odd in ({}, {"choices": "x"}, {"choices": [None]}, {"choices": [{"delta": "text"}]},
                {"choices": [{"delta": {"tool_calls": ["x", {"function": "f"}]}}]}):
        stream.feed(odd)
    events = stream.finish()
    anthropic.types.RawMessageStopEvent.model_validate(events[-1])


def test_error_event_mid_stream_raises_in_the_sdk(canned: Canned) -> None:  # noqa: F811
    stream = ChatToMessagesStream("m")
    head = sse(stream.feed(chunk({"content": "partial"})))
    exc = BudgetExceeded("The daily budget of team 'x' ($5.00) is spent.")
    canned.answer(head + error_event(exc), content_type=SSE)
    received = []
    with pytest.raises(anthropic.APIStatusError) as info:
        with sdk(canned).messages.stream(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]) as s:
            for text in s.text_stream:
                received.append(text)
    assert received == ["partial"]
    assert "budget_exceeded: The daily budget of team 'x'" in str(info.value)


# ------------------------------------------------------------------ through a real chat upstream


def chat_deployment(api_base: str) -> Deployment:
    return Deployment(id="local-chat", model="local", provider="openai", upstream_model="mock-chunks6",
                      api_base=api_base, api_key=None, api_key_env=None, weight=1.0, context_window=None,
                      max_output_tokens=None, capabilities=frozenset({"chat"}), price=Price(0, 0, 0, 0, 0),
                      price_source="policy", timeout_s=None, headers=(), simulated=None, self_hosted=True)


def native_deployment(api_base: str) -> Deployment:
    return Deployment(id="claude-native", model="claude", provider="anthropic", upstream_model="claude-x",
                      api_base=api_base, api_key="sk-ant", api_key_env=None, weight=1.0, context_window=None,
                      max_output_tokens=None, capabilities=frozenset({"chat"}), price=Price(0, 0, 0, 0, 0),
                      price_source="policy", timeout_s=None, headers=(), simulated=None, self_hosted=False,
                      apis=frozenset({"messages"}))


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    c = HttpClient(connect_timeout=5)
    yield c
    await c.aclose()


MESSAGES_BODY: dict[str, Any] = {
    "model": "local", "max_tokens": 200, "stream": True,
    "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    "thinking": {"type": "adaptive", "display": "omitted"},
    "messages": [{"role": "user", "content": "Say something"}],
}


async def test_messages_stream_served_by_a_chat_upstream(client: HttpClient, mock_reset: str,
                                                        canned: Canned) -> None:  # noqa: F811
    chat, dropped = messages_to_chat(copy.deepcopy(MESSAGES_BODY))
    assert dropped == ("cache_control", "thinking")
    chat["model"] = "mock-chunks6"
    dep = chat_deployment(mock_reset + "/v1")
    chunks = [c async for c in OpenAICompatProvider(client).stream(Call("chat", chat, dep, 10.0))]
    expected_text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
    upstream_usage = next(c["usage"] for c in chunks if c.get("usage"))
    assert expected_text and upstream_usage["completion_tokens"] == 6
    canned.answer(sse(translate(chunks)), content_type=SSE)
    with sdk(canned).messages.stream(model="local", max_tokens=200,
                                     messages=[{"role": "user", "content": "Say something"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == expected_text and final.stop_reason == "end_turn"
    assert final.usage.input_tokens == upstream_usage["prompt_tokens"]
    assert final.usage.output_tokens == upstream_usage["completion_tokens"]


async def test_messages_reply_served_by_a_chat_upstream_with_a_tool(client: HttpClient, mock_reset: str,
                                                                   canned: Canned) -> None:  # noqa: F811
    body = dict(copy.deepcopy(MESSAGES_BODY), stream=False,
                tools=[{"name": "search", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}])
    chat, _ = messages_to_chat(body)
    chat["model"] = "mock-chunks6"
    reply = await OpenAICompatProvider(client).complete(Call("chat", chat, chat_deployment(mock_reset + "/v1"), 10.0))
    canned.answer(orjson.dumps(chat_to_messages_reply(reply, "local")))
    message = sdk(canned).messages.create(model="local", max_tokens=200,
                                          messages=[{"role": "user", "content": "x"}])
    assert message.stop_reason == "tool_use" and message.model == "local"
    block = message.content[-1]
    assert block.type == "tool_use" and block.name == "search" and block.input == {"q": "mock"}
    assert message.usage.input_tokens == reply["usage"]["prompt_tokens"]


# ------------------------------------------------------------------ Messages events -> chat chunks


async def test_native_stream_translated_for_a_chat_client(client: HttpClient, mock_anthropic: MockAnthropic,  # noqa: F811
                                                          canned: Canned) -> None:  # noqa: F811
    mock_anthropic.set(thinking="Thinking it over.", cache_read=40, cache_write_5m=30, cache_write_1h=20)
    chat_body = {"model": "claude", "stream": True, "stream_options": {"include_usage": True},
                 "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]}
    body, dropped = chat_to_messages(chat_body)
    assert dropped == ()
    provider = AnthropicProvider(client)
    events = [e async for e in provider.stream(Call("messages", body, native_deployment(mock_anthropic.url), 10.0))]
    assert mock_anthropic.last.body["system"] == "Be brief."
    stream = MessagesToChatStream()
    chunks = [c for e in events for c in stream.feed(e)] + stream.finish()
    for c in chunks:
        openai.types.chat.ChatCompletionChunk.model_validate(c)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks if c["choices"])
    assert text == "Hello from the mock Anthropic API." and reasoning == "Thinking it over."
    start_usage = events[0]["message"]["usage"]
    final_usage = dict(start_usage, output_tokens=events[-2]["usage"]["output_tokens"])
    assert chunks[-1]["usage"] == chat_usage(final_usage)
    assert usage_from_openai(chunks[-1]["usage"]) == usage_from_openai(final_usage)
    # and the openai SDK reads them off a socket
    canned.answer(b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n",
                  content_type=SSE)
    oai = openai.OpenAI(base_url=canned.url, api_key="k", max_retries=0)
    got = list(oai.chat.completions.create(model="claude", messages=[{"role": "user", "content": "x"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == text
    assert [c.choices[0].finish_reason for c in got if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert got[-1].usage is not None and got[-1].usage.prompt_tokens == 25 + 40 + 50


async def test_native_tool_stream_translated_for_a_chat_client(client: HttpClient,
                                                               mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    body, _ = chat_to_messages({"model": "claude", "stream": True, "messages": [{"role": "user", "content": "go"}],
                                "tools": [{"type": "function", "function": {
                                    "name": "run", "parameters": {"type": "object",
                                                                  "properties": {"cmd": {"type": "string"}}}}}]})
    provider = AnthropicProvider(client)
    stream = MessagesToChatStream("claude")
    chunks = [c async for e in provider.stream(Call("messages", body, native_deployment(mock_anthropic.url), 10.0))
              for c in stream.feed(e)] + stream.finish()
    calls = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls") or ()]
    assert calls[0]["id"] == "toolu_mock_01" and calls[0]["function"]["name"] == "run"
    assert orjson.loads("".join(tc["function"]["arguments"] for tc in calls)) == {"cmd": "mock"}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] \
        == ["tool_calls"]


def test_error_event_raises_and_finish_fills_in() -> None:
    stream = MessagesToChatStream("claude")
    assert stream.feed({"type": "ping"}) == []
    with pytest.raises(UpstreamError, match="overloaded_error: busy"):
        stream.feed({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    tail = stream.finish()
    assert tail[0]["choices"][0]["finish_reason"] == "stop" and tail[-1]["choices"] == []
    assert tail[-1]["usage"]["prompt_tokens"] == 0 and stream.finish() == []
