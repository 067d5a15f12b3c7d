"""AnthropicProvider against a loopback mock Messages API: body and headers as sent, replies and every
SSE event unchanged, count_tokens, and upstream failures mapped to the gateway's errors."""

from __future__ import annotations

import asyncio
import copy
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from mock_anthropic import SIGNATURE, MockAnthropic, mock_anthropic, mock_anthropic_server  # noqa: F401  (fixtures)

from gateway.errors import (
    InvalidRequest,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.policy import Deployment
from gateway.pricing import Price
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.base import Call
from gateway.providers.httpclient import HttpClient

KEY = "sk-ant-deployment-key"
TEXT = "Hello from the mock Anthropic API."


def deployment(api_base: str | None, headers: tuple[tuple[str, str], ...] = (), key: str | None = KEY) -> Deployment:
    return Deployment(id="claude-native", model="claude", provider="anthropic", upstream_model="claude-sonnet-4-5",
                      api_base=api_base, api_key=key, api_key_env=None, weight=1.0, context_window=None,
                      max_output_tokens=None, capabilities=frozenset({"chat"}), price=Price(0, 0, 0, 0, 0),
                      price_source="policy", timeout_s=None, headers=headers, simulated=None, self_hosted=False,
                      apis=frozenset({"messages"}))


# What Claude Code sends: system blocks with cache_control, thinking, context_management, a server tool,
# metadata and a field no version of the API knows yet.
CLAUDE_CODE_BODY: dict[str, Any] = {
    "model": "claude-sonnet-4-5", "max_tokens": 32000,
    "system": [{"type": "text", "text": "You are Claude Code."},
               {"type": "text", "text": "Be careful.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi",
                                                "cache_control": {"type": "ephemeral"}}]}],
    "thinking": {"type": "adaptive", "display": "omitted"},
    "output_config": {"effort": "high"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
    "metadata": {"user_id": "user_abc_session_123"},
    "some_future_field": {"nested": [1, 2, {"x": None}]},
}


def call(dep: Deployment, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
         timeout: float = 10.0) -> Call:
    return Call("messages", copy.deepcopy(body or CLAUDE_CODE_BODY), dep, timeout, headers or {})


@pytest.fixture
async def provider() -> AsyncIterator[AnthropicProvider]:
    client = HttpClient(connect_timeout=5)
    p = AnthropicProvider(client)
    yield p
    await p.aclose()
    await client.aclose()


async def collect(provider: AnthropicProvider, c: Call) -> list[dict[str, Any]]:
    return [event async for event in provider.stream(c)]


async def test_body_forwarded_whole_with_deployment_key_and_client_anthropic_headers(
        provider: AnthropicProvider, mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    dep = deployment(mock_anthropic.url, headers=(("x-extra", "on"),))
    client_headers = {"anthropic-version": "2023-06-01", "anthropic-beta": "context-management-2025-06-27, oauth",
                      "x-api-key": "sk-client-secret", "authorization": "Bearer sk-client-secret",
                      "x-claude-code-session-id": "s-1"}
    reply = await provider.complete(call(dep, headers=client_headers))
    sent = mock_anthropic.last
    assert sent.path == "/v1/messages"
    assert sent.body == CLAUDE_CODE_BODY
    assert sent.headers["x-api-key"] == KEY
    assert "authorization" not in sent.headers and "x-claude-code-session-id" not in sent.headers
    assert "sk-client-secret" not in str(sent.headers)
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["anthropic-beta"] == "context-management-2025-06-27,oauth"
    assert sent.headers["x-extra"] == "on"
    assert reply["type"] == "message" and reply["content"] == [{"type": "text", "text": TEXT}]
    assert reply["usage"]["input_tokens"] == 25 and reply["stop_reason"] == "end_turn"


async def test_default_version_and_beta_union_with_the_deployment(
        provider: AnthropicProvider, mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    dep = deployment(mock_anthropic.url + "/v1", headers=(("anthropic-beta", "prompt-caching-2024-07-31"),))
    await provider.complete(call(dep, headers={"Anthropic-Beta": "oauth,prompt-caching-2024-07-31"}))
    sent = mock_anthropic.last
    assert sent.path == "/v1/messages"   # an api_base ending in /v1 is not doubled
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["anthropic-beta"] == "prompt-caching-2024-07-31,oauth"


async def test_header_injection_is_refused(provider: AnthropicProvider,
                                           mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    with pytest.raises(InvalidRequest) as info:
        await provider.complete(call(deployment(mock_anthropic.url),
                                     headers={"anthropic-beta": "a\r\nx-api-key: stolen"}))
    assert info.value.param == "anthropic-beta"
    assert mock_anthropic.requests == []


async def test_tool_use_and_thinking_reply_unchanged(provider: AnthropicProvider,
                                                     mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    mock_anthropic.set(thinking="Let me think.")
    body = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "weather?"}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object",
                                                               "properties": {"city": {"type": "string"}}}}]}
    reply = await provider.complete(call(deployment(mock_anthropic.url), body))
    assert reply["content"][0] == {"type": "thinking", "thinking": "Let me think.", "signature": SIGNATURE}
    assert reply["content"][1] == {"type": "tool_use", "id": "toolu_mock_01", "name": "get_weather",
                                   "input": {"city": "mock"}}
    assert reply["stop_reason"] == "tool_use"


async def test_stream_yields_every_event_unchanged(provider: AnthropicProvider,
                                                   mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    mock_anthropic.set(thinking="Hmm, yes.", cache_read=40, cache_write_5m=30, cache_write_1h=20)
    events = await collect(provider, call(deployment(mock_anthropic.url), dict(CLAUDE_CODE_BODY, stream=True)))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert "ping" in kinds
    start = events[0]["message"]["usage"]
    assert (start["input_tokens"], start["cache_read_input_tokens"]) == (25, 40)
    assert start["cache_creation"] == {"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 20}
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert "".join(d["thinking"] for d in deltas if d["type"] == "thinking_delta") == "Hmm, yes."
    assert [d["signature"] for d in deltas if d["type"] == "signature_delta"] == [SIGNATURE]
    assert "".join(d["text"] for d in deltas if d["type"] == "text_delta") == TEXT
    assert [e["index"] for e in events if e["type"] == "content_block_start"] == [0, 1]
    assert [e["index"] for e in events if e["type"] == "content_block_stop"] == [0, 1]
    assert events[-2]["usage"] == {"output_tokens": len(TEXT.split())}
    assert events[-2]["delta"]["stop_reason"] == "end_turn"


async def test_stream_tool_input_json_deltas(provider: AnthropicProvider,
                                             mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    body = {"model": "m", "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "go"}],
            "tools": [{"name": "run", "input_schema": {"type": "object", "properties": {"cmd": {"type": "string"},
                                                                                       "n": {"type": "integer"}}}}]}
    events = await collect(provider, call(deployment(mock_anthropic.url), body))
    start = next(e for e in events if e["type"] == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["name"] == "run"
    parts = [e["delta"]["partial_json"] for e in events
             if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta"]
    assert len(parts) == 2 and "".join(parts) == '{"cmd": "mock", "n": 1}'


async def test_connection_is_reused_after_a_reply(provider: AnthropicProvider,
                                                  mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    dep = deployment(mock_anthropic.url)
    await provider.complete(call(dep))
    await provider.complete(call(dep))
    assert len({r.peer for r in mock_anthropic.requests}) == 1


async def test_connection_is_reused_after_a_stream(provider: AnthropicProvider,
                                                   mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    mock_anthropic.set(end_delay_ms=100)   # the body ends a moment after message_stop
    dep = deployment(mock_anthropic.url)
    for _ in range(3):
        events = await collect(provider, call(dep, dict(CLAUDE_CODE_BODY, stream=True)))
        assert events[-1]["type"] == "message_stop"
    assert len({r.peer for r in mock_anthropic.requests}) == 1


async def test_count_tokens_uses_the_upstream_endpoint(provider: AnthropicProvider,
                                                       mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    mock_anthropic.set(input=1234)
    body = {"model": "m", "messages": [{"role": "user", "content": "count me"}]}
    assert await provider.count_tokens(Call("count_tokens", body, deployment(mock_anthropic.url), 10.0,
                                            {"anthropic-beta": "token-counting-2024-11-01"})) == 1234
    sent = mock_anthropic.last
    assert sent.path == "/v1/messages/count_tokens" and sent.body == body
    assert sent.headers["x-api-key"] == KEY and sent.headers["anthropic-beta"] == "token-counting-2024-11-01"


@pytest.mark.parametrize(("status", "kind", "failure"), [
    (429, UpstreamRateLimited, "rate_limit"), (400, UpstreamRejected, "rejected"), (529, UpstreamError, "server_error"),
    (500, UpstreamError, "server_error"), (401, UpstreamError, "auth"), (504, UpstreamTimeout, "timeout")])
async def test_status_errors_are_mapped(provider: AnthropicProvider, mock_anthropic: MockAnthropic,  # noqa: F811
                                        status: int, kind: type[UpstreamError], failure: str) -> None:
    mock_anthropic.set(status=status, error_message="upstream says no", retry_after="7")
    with pytest.raises(kind) as info:
        await provider.complete(call(deployment(mock_anthropic.url)))
    assert type(info.value) is kind and info.value.failure == failure
    assert "claude-native" in info.value.message and "upstream says no" not in info.value.message   # logged, not shown
    if status == 429:
        assert info.value.headers == {"retry-after": "7"}


async def test_prompt_too_long_is_a_context_length_failure(provider: AnthropicProvider,
                                                           mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    mock_anthropic.set(status=400, error_message="prompt is too long: 210000 tokens > 200000 maximum")
    with pytest.raises(UpstreamRejected) as info:
        await provider.complete(call(deployment(mock_anthropic.url)))
    assert info.value.code == "context_length_exceeded" and info.value.retryable


async def test_stream_status_error_before_first_event(provider: AnthropicProvider,
                                                      mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    mock_anthropic.set(status=529)
    with pytest.raises(UpstreamError) as info:
        await collect(provider, call(deployment(mock_anthropic.url), dict(CLAUDE_CODE_BODY, stream=True)))
    assert "HTTP 529" in info.value.message and "overloaded_error" in info.value.message


async def test_error_event_mid_stream(provider: AnthropicProvider, mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    mock_anthropic.set(stream_error="overloaded_error")
    seen: list[str] = []
    with pytest.raises(UpstreamError) as info:
        async for event in provider.stream(call(deployment(mock_anthropic.url), dict(CLAUDE_CODE_BODY, stream=True))):
            seen.append(event["type"])
    assert seen[:2] == ["message_start", "content_block_start"] and "content_block_delta" in seen
    assert "overloaded_error" in info.value.message and "mock mid-stream failure" not in info.value.message


async def test_stream_cut_before_message_stop_is_an_error(provider: AnthropicProvider,
                                                          mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    mock_anthropic.set(stream_cut="1")
    seen: list[str] = []
    with pytest.raises(UpstreamError, match="before message_stop"):
        async for event in provider.stream(call(deployment(mock_anthropic.url), dict(CLAUDE_CODE_BODY, stream=True))):
            seen.append(event["type"])
    assert seen[-1] == "content_block_delta"


async def test_timeout(provider: AnthropicProvider, mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    mock_anthropic.set(delay_ms=1500)
    with pytest.raises(UpstreamTimeout):
        await provider.complete(call(deployment(mock_anthropic.url), timeout=0.2))


async def test_unreachable(provider: AnthropicProvider) -> None:
    with socket.socket() as s:   # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UpstreamUnreachable):
        await provider.complete(call(deployment(f"http://127.0.0.1:{port}")))


async def test_health_check(provider: AnthropicProvider, mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    dep = deployment(mock_anthropic.url)
    await provider.check(dep, 5.0)
    assert mock_anthropic.last.path == "/v1/models" and mock_anthropic.last.headers["x-api-key"] == KEY
    assert mock_anthropic.last.headers["anthropic-version"] == "2023-06-01"
    mock_anthropic.set(status=503)
    with pytest.raises(UpstreamError, match="health check answered HTTP 503"):
        await provider.check(dep, 5.0)


async def test_other_endpoints_are_refused(provider: AnthropicProvider,
                                           mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    with pytest.raises(UpstreamError, match="Messages API only"):
        await provider.complete(Call("chat", {"model": "m"}, deployment(mock_anthropic.url), 10.0))
    assert mock_anthropic.requests == []


async def test_closing_a_stream_early_frees_it(provider: AnthropicProvider,
                                               mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    stream = provider.stream(call(deployment(mock_anthropic.url), dict(CLAUDE_CODE_BODY, stream=True)))
    first = await stream.__anext__()
    assert first["type"] == "message_start"
    await stream.aclose()
    await asyncio.sleep(0)
    reply = await provider.complete(call(deployment(mock_anthropic.url)))
    assert reply["type"] == "message"
