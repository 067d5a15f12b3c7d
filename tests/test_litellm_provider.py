"""LiteLLMProvider against the mock Anthropic Messages API: translation both ways, streams, usage, errors."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest
from mock_anthropic import MockAnthropic, mock_anthropic, mock_anthropic_server  # noqa: F401  (fixtures)

from conftest import free_port
from gateway.errors import UpstreamError, UpstreamRateLimited, UpstreamRejected, UpstreamTimeout
from gateway.policy import Deployment, load_policies
from gateway.providers.base import Call
from gateway.providers.litellm_provider import LiteLLMProvider

KEY_ENV, KEY = "GATEWAY_TEST_ANTHROPIC_KEY", "sk-ant-test-123"
UPSTREAM = "claude-3-5-haiku-20241022"
TEXT = "Hello from the mock Anthropic API."
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mock_anthropic: MockAnthropic) -> Deployment:  # noqa: F811
    monkeypatch.setenv(KEY_ENV, KEY)
    (tmp_path / "models.yaml").write_text(textwrap.dedent(f"""\
        models:
          claude:
            deployments:
              - provider: anthropic
                model: {UPSTREAM}
                api_base: {mock_anthropic.url}
                api_key_env: {KEY_ENV}
                headers: {{x-gateway-test: "on"}}
                price: {{input_per_mtok: 1, output_per_mtok: 5, cache_read_per_mtok: 0.1,
                         cache_write_per_mtok: 1.25, cache_write_1h_per_mtok: 2}}
        """))
    spec = load_policies(str(tmp_path)).model("claude")
    assert spec is not None
    d = spec.deployments[0]
    assert d.provider == "anthropic" and d.api_key == KEY and not d.openai_compatible
    return d


@pytest.fixture
async def provider() -> Any:
    p = LiteLLMProvider()
    yield p
    await p.aclose()


def chat(deployment: Deployment, timeout: float = 10.0, **body: Any) -> Call:
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return Call("chat", {"model": deployment.upstream_model, **body}, deployment, timeout)


async def collect(provider: LiteLLMProvider, call: Call) -> list[dict[str, Any]]:
    return [chunk async for chunk in provider.stream(call)]


# ------------------------------------------------------------------ translation


async def test_openai_request_becomes_anthropic_messages(provider: LiteLLMProvider, deployment: Deployment,
                                                         mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    await provider.complete(chat(
        deployment, max_tokens=100, temperature=0.2, stop=["END"], tools=[WEATHER_TOOL], tool_choice="auto",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]))
    sent = mock_anthropic.last
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == KEY and "authorization" not in sent.headers
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["x-gateway-test"] == "on"            # deployment headers ride along
    body = sent.body
    assert body["model"] == UPSTREAM and body["max_tokens"] == 100 and body["temperature"] == 0.2
    assert body["stop_sequences"] == ["END"]
    system = body["system"]                                   # system lifted out of the messages
    assert (system if isinstance(system, str) else system[0]["text"]) == "Be brief."
    assert [m["role"] for m in body["messages"]] == ["user"]
    (tool,) = body["tools"]
    assert tool.pop("type", "custom") == "custom"             # litellm names Anthropic's client-tool type
    assert tool == {"name": "get_weather", "description": "Weather for a city",
                    "input_schema": WEATHER_TOOL["function"]["parameters"]}
    assert body["tool_choice"] == {"type": "auto"}
    assert "stream" not in body or body["stream"] is False
    assert set(body) <= {"model", "messages", "system", "max_tokens", "temperature", "stop_sequences", "tools",
                         "tool_choice", "stream"}                 # no litellm control kwargs leak upstream


async def test_tool_use_becomes_openai_tool_calls(provider: LiteLLMProvider, deployment: Deployment) -> None:
    body = await provider.complete(chat(deployment, tools=[WEATHER_TOOL]))
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["role"] == "assistant"
    (tool_call,) = message["tool_calls"]
    assert tool_call["type"] == "function" and tool_call["id"] == "toolu_mock_01"
    assert tool_call["function"]["name"] == "get_weather"
    assert json.loads(tool_call["function"]["arguments"]) == {"city": "mock"}
    orjson.dumps(body)                                        # plain data all the way down


async def test_tool_result_round_trip(provider: LiteLLMProvider, deployment: Deployment,
                                      mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "toolu_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
    ]
    body = await provider.complete(chat(deployment, tools=[WEATHER_TOOL], messages=messages))
    assert body["choices"][0]["message"]["content"] == TEXT   # the mock answers a tool result in text
    sent = mock_anthropic.last.body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    tool_use = next(b for b in sent[1]["content"] if b["type"] == "tool_use")
    assert tool_use["id"] == "toolu_1" and tool_use["name"] == "get_weather" and tool_use["input"] == {"city": "Paris"}
    result = next(b for b in sent[2]["content"] if b["type"] == "tool_result")
    assert result["tool_use_id"] == "toolu_1"


async def test_text_answer_and_cache_usage(provider: LiteLLMProvider, deployment: Deployment,
                                           mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    mock_anthropic.set(input=25, output=6, cache_read=40, cache_write_5m=30, cache_write_1h=20)
    body = await provider.complete(chat(deployment))
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": TEXT}   # litellm's null extras pruned
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] == 25 + 40 + 50              # litellm adds cache reads and writes in
    assert usage["completion_tokens"] == 6 and usage["total_tokens"] == 121
    assert usage["cache_read_input_tokens"] == 40 and usage["cache_creation_input_tokens"] == 50
    assert usage["prompt_tokens_details"]["cached_tokens"] == 40
    assert usage["prompt_tokens_details"]["cache_creation_token_details"] == {
        "ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 20}
    assert usage["cache_creation"] == {"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 20}
    orjson.dumps(body)


async def test_usage_normalises_to_gateway_usage(provider: LiteLLMProvider, deployment: Deployment,
                                                 mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    from gateway import pricing
    mock_anthropic.set(input=25, output=6, cache_read=40, cache_write_5m=30, cache_write_1h=20)
    expected = pricing.Usage(input_tokens=115, output_tokens=6, cached_input_tokens=40,
                             cache_write_tokens=30, cache_write_1h_tokens=20)
    body = await provider.complete(chat(deployment))
    assert pricing.usage_from_openai(body["usage"]) == expected
    chunks = await collect(provider, chat(deployment, stream=True))
    assert pricing.usage_from_openai(chunks[-1]["usage"]) == expected


# ------------------------------------------------------------------ streaming


async def test_stream_is_openai_chunks_ending_with_usage(provider: LiteLLMProvider, deployment: Deployment,
                                                         mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    mock_anthropic.set(input=10, cache_read=7, cache_write_5m=3, cache_write_1h=2)
    chunks = await collect(provider, chat(deployment, stream=True, stream_options={"include_usage": False}))
    assert mock_anthropic.last.body["stream"] is True
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    *content, last = chunks
    assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in content) == TEXT
    assert [c["choices"][0]["finish_reason"] for c in content if c["choices"][0]["finish_reason"]] == ["stop"]
    assert all("usage" not in c for c in content)
    assert last["choices"] == []                              # OpenAI's include_usage chunk shape
    usage = last["usage"]
    assert usage["prompt_tokens"] == 22 and usage["completion_tokens"] == len(TEXT.split())
    assert usage["cache_read_input_tokens"] == 7 and usage["cache_creation_input_tokens"] == 5
    assert usage["cache_creation"] == {"ephemeral_5m_input_tokens": 3, "ephemeral_1h_input_tokens": 2}
    orjson.dumps(chunks)


async def test_stream_tool_call(provider: LiteLLMProvider, deployment: Deployment) -> None:
    chunks = await collect(provider, chat(deployment, stream=True, tools=[WEATHER_TOOL],
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    calls = [tc for c in chunks for ch in c["choices"] for tc in ch["delta"].get("tool_calls") or ()]
    assert calls[0]["id"] == "toolu_mock_01" and calls[0]["function"]["name"] == "get_weather"
    assert all(tc["index"] == 0 for tc in calls)
    arguments = "".join(tc["function"].get("arguments") or "" for tc in calls)
    assert json.loads(arguments) == {"city": "mock"}
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finishes == ["tool_calls"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12


async def test_legacy_completions(provider: LiteLLMProvider, deployment: Deployment,
                                  mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    call = Call("completions", {"model": UPSTREAM, "prompt": "Say hi", "max_tokens": 20}, deployment, 10.0)
    body = await provider.complete(call)
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == TEXT
    assert mock_anthropic.last.body["messages"][0]["role"] == "user"
    chunks = await collect(provider, Call("completions", {**call.body, "stream": True}, deployment, 10.0))
    assert all(isinstance(ch["text"], str) for c in chunks for ch in c["choices"])
    assert "".join(ch["text"] for c in chunks for ch in c["choices"]) == TEXT
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 25


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(("status", "kind"), [
    (429, UpstreamRateLimited), (500, UpstreamError), (529, UpstreamError), (400, UpstreamRejected),
    (401, UpstreamError), (403, UpstreamError), (404, UpstreamError),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_status_errors_map_to_gateway_errors(provider: LiteLLMProvider, deployment: Deployment,
                                                   mock_anthropic: MockAnthropic,  # noqa: F811
                                                   status: int, kind: type[UpstreamError], stream: bool) -> None:
    mock_anthropic.set(status=status, retry_after="7", error_message="the mock says no")
    with pytest.raises(UpstreamError) as info:
        if stream:
            await collect(provider, chat(deployment, stream=True))
        else:
            await provider.complete(chat(deployment))
    exc = info.value
    assert type(exc) is kind
    assert "the mock says no" in exc.message and deployment.id in exc.message
    assert exc.retryable is (status != 400)
    if status == 429:
        assert exc.status_code == 429 and exc.headers == {"retry-after": "7"}
    if status in (401, 403):
        assert exc.status_code == 502                     # our credentials, not the client's fault


async def test_context_window_exceeded(provider: LiteLLMProvider, deployment: Deployment,
                                       mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    mock_anthropic.set(status=400, error_message="prompt is too long: 250000 tokens > 200000 maximum")
    with pytest.raises(UpstreamRejected) as info:
        await provider.complete(chat(deployment))
    assert info.value.code == "context_length_exceeded" and info.value.status_code == 400
    assert "prompt is too long" in info.value.message


async def test_timeout(provider: LiteLLMProvider, deployment: Deployment,
                       mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    mock_anthropic.set(delay_ms=1500)
    with pytest.raises(UpstreamTimeout):
        await provider.complete(chat(deployment, timeout=0.3))
    with pytest.raises(UpstreamTimeout):
        await collect(provider, chat(deployment, timeout=0.3, stream=True))


async def test_unreachable_upstream(provider: LiteLLMProvider, deployment: Deployment) -> None:
    gone = dataclasses.replace(deployment, api_base=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UpstreamError) as info:
        await provider.complete(chat(gone, timeout=5.0))
    assert info.value.retryable and not isinstance(info.value, UpstreamRejected)


async def test_mid_stream_error(provider: LiteLLMProvider, deployment: Deployment,
                                mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    mock_anthropic.set(stream_error="overloaded_error")
    seen: list[dict[str, Any]] = []
    with pytest.raises(UpstreamError) as info:
        async for chunk in provider.stream(chat(deployment, stream=True)):
            seen.append(chunk)
    assert seen and seen[0]["choices"][0]["delta"]["content"] == "Hello"
    assert "mid-stream failure" in info.value.message and info.value.retryable


async def test_unsupported_parameter_is_rejected_not_dropped(provider: LiteLLMProvider, deployment: Deployment,
                                                             mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    with pytest.raises(UpstreamRejected) as info:
        await provider.complete(chat(deployment, seed=7))
    assert info.value.code == "unsupported_parameter" and "seed" in info.value.message
    assert mock_anthropic.requests == []                  # litellm refused before sending


@pytest.mark.parametrize("field", ["api_base", "api_key", "mock_response", "base_url", "metadata", "num_retries"])
async def test_litellm_control_fields_in_the_body_are_refused(provider: LiteLLMProvider, deployment: Deployment,
                                                              mock_anthropic: MockAnthropic,  # noqa: F811
                                                              field: str) -> None:
    with pytest.raises(UpstreamRejected) as info:
        await provider.complete(chat(deployment, **{field: "http://127.0.0.1:1"}))
    assert info.value.param == field and info.value.code == "unsupported_parameter"
    assert mock_anthropic.requests == []


async def test_embeddings_unsupported_by_provider(provider: LiteLLMProvider, deployment: Deployment) -> None:
    with pytest.raises(UpstreamRejected):
        await provider.complete(Call("embeddings", {"model": UPSTREAM, "input": ["x"]}, deployment, 5.0))


async def test_usage_knobs_from_deployment_headers(provider: LiteLLMProvider, deployment: Deployment,
                                                   mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    knobs = (("x-mock-cache-read", "11"), ("x-mock-cache-write-5m", "5"), ("x-mock-cache-write-1h", "6"))
    tuned = dataclasses.replace(deployment, headers=deployment.headers + knobs)
    usage = (await provider.complete(chat(tuned)))["usage"]
    assert usage["cache_read_input_tokens"] == 11 and usage["cache_creation_input_tokens"] == 11
    assert usage["cache_creation"] == {"ephemeral_5m_input_tokens": 5, "ephemeral_1h_input_tokens": 6}
    assert mock_anthropic.last.headers["x-mock-cache-read"] == "11"


async def test_closing_a_stream_early(provider: LiteLLMProvider, deployment: Deployment) -> None:
    chunks = provider.stream(chat(deployment, stream=True))
    first = await chunks.__anext__()
    assert first["choices"][0]["delta"]["content"] == "Hello"
    await chunks.aclose()                                   # the client went away: no error, no hang
    body = await provider.complete(chat(deployment))        # and the provider still works
    assert body["choices"][0]["message"]["content"] == TEXT
