"""End to end with the official openai SDK: gateway process in front of the mock upstream process."""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal

import httpx
import openai
import pytest

from conftest import GatewayFactory, Server, mock_policy

# Prices in the mock policy: $1/Mtok in, $2/Mtok out, $0.5/Mtok cached reads => nano-USD per token.
IN_NANO, OUT_NANO, CACHED_NANO = 1000, 2000, 500


@pytest.fixture
def gw(gateway: GatewayFactory, mock_reset: str) -> Server:
    return gateway(mock_policy(mock_reset))


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-anything", max_retries=0)


def aclient(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="sk-anything", max_retries=0)


def mock_requests(mock: str) -> list[dict]:
    return httpx.get(f"{mock}/_requests").json()


def metric_value(server: Server, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_chat_non_streaming_cost_and_headers(gw: Server, mock_reset: str) -> None:
    raw = client(gw).chat.completions.with_raw_response.create(
        model="mock", messages=[{"role": "user", "content": "hello there"}], temperature=0, user="u1")
    completion = raw.parse()
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    expected_nano = usage.prompt_tokens * IN_NANO + usage.completion_tokens * OUT_NANO
    assert Decimal(str(usage.model_extra["cost_usd"])) == Decimal(expected_nano) / 10**9
    assert Decimal(raw.headers["x-gateway-cost-usd"]) == Decimal(expected_nano) / 10**9
    assert raw.headers["x-gateway-model"] == "openai/mock"
    assert raw.headers["x-gateway-provider"] == "openai"
    assert raw.headers["x-gateway-route"] == "default"
    assert raw.headers["x-gateway-cache"] == "miss"   # temperature 0: cacheable, first time
    assert re.match(r"^req_[0-9a-f]+$", raw.headers["x-request-id"])
    # the upstream saw the upstream model name and every field we don't interpret
    seen = mock_requests(mock_reset)[-1]
    assert seen["body"]["model"] == "mock" and seen["body"]["temperature"] == 0 and seen["body"]["user"] == "u1"
    assert metric_value(gw, "gateway_cost_usd_total", model="mock") == pytest.approx(expected_nano / 1e9)


def test_cached_and_reasoning_tokens_priced(gw: Server) -> None:
    completion = client(gw).chat.completions.create(
        model="mock-cached", messages=[{"role": "user", "content": "one two three " * 30}])
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 40
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 7
    expected = (Decimal(usage.prompt_tokens - 40) * IN_NANO + 40 * CACHED_NANO
                + usage.completion_tokens * OUT_NANO)
    assert Decimal(str(usage.model_extra["cost_usd"])) * 10**9 == expected.quantize(Decimal(1))


def test_streaming_with_usage_carries_cost(gw: Server, mock_reset: str) -> None:
    stream = client(gw).chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "stream please"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    expected = last.usage.prompt_tokens * IN_NANO + last.usage.completion_tokens * OUT_NANO
    assert Decimal(str(last.usage.model_extra["cost_usd"])) == Decimal(expected) / 10**9
    assert mock_requests(mock_reset)[-1]["body"]["stream_options"] == {"include_usage": True}


def test_streaming_without_usage_strips_usage_chunk(gw: Server, mock_reset: str) -> None:
    chunks = list(client(gw).chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "stream please"}], stream=True))
    assert chunks and all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    # the gateway asked the upstream for usage anyway, and still priced the request
    assert mock_requests(mock_reset)[-1]["body"]["stream_options"] == {"include_usage": True}
    assert metric_value(gw, "gateway_cost_usd_total", model="mock") > 0


def test_upstream_without_usage_is_estimated(gw: Server) -> None:
    completion = client(gw).chat.completions.create(
        model="mock-nousage", messages=[{"role": "user", "content": "count me"}])
    assert completion.usage is None  # nothing invented in the body
    assert metric_value(gw, "gateway_tokens_total", model="mock-nousage", type="input") > 0
    assert metric_value(gw, "gateway_cost_usd_total", model="mock-nousage") > 0


def test_tools_round_trip(gw: Server) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Look something up",
                                               "parameters": {"type": "object",
                                                              "properties": {"q": {"type": "string"}}}}}]
    c = client(gw)
    first = c.chat.completions.create(model="mock", messages=[{"role": "user", "content": "find x"}], tools=tools)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "lookup"
    second = c.chat.completions.create(model="mock", tools=tools, messages=[
        {"role": "user", "content": "find x"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "x is 42"}])
    assert second.choices[0].message.content


def test_streaming_tool_calls(gw: Server) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    chunks = list(client(gw).chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "find"}], tools=tools, stream=True))
    names = [tc.function.name for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])
             if tc.function and tc.function.name]
    assert names == ["lookup"]


def test_simulated_demo_model(gw: Server) -> None:
    c = client(gw)
    out = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], n=2,
                                    response_format={"type": "json_object"})
    assert len(out.choices) == 2 and out.choices[0].message.content.startswith("{")
    assert out.usage is not None and out.usage.completion_tokens == 24
    stream = list(c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, max_tokens=5, stream_options={"include_usage": True}))
    assert stream[-1].usage is not None and stream[-1].usage.completion_tokens == 5


def test_legacy_completions_and_embeddings(gw: Server) -> None:
    c = client(gw)
    comp = c.completions.create(model="mock", prompt="Say something")
    assert comp.choices[0].text and comp.usage is not None
    emb = c.embeddings.create(model="mock-embed", input=["a", "b"])
    assert len(emb.data) == 2 and emb.usage.prompt_tokens > 0
    assert emb.usage.model_extra["cost_usd"] == pytest.approx(emb.usage.prompt_tokens * 1e-6)


def test_models_list(gw: Server) -> None:
    ids = {m.id for m in client(gw).models.list()}
    assert {"mock", "mock-embed", "demo"} <= ids


async def test_async_client_concurrent(gw: Server) -> None:
    c = aclient(gw)
    results = await asyncio.gather(*[
        c.chat.completions.create(model="mock", messages=[{"role": "user", "content": f"q{i}"}]) for i in range(20)])
    assert all(r.choices[0].message.content for r in results)
    stream = await c.chat.completions.create(model="mock", messages=[{"role": "user", "content": "s"}], stream=True)
    text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text
    await c.close()


def test_fallback_to_next_deployment(gw: Server) -> None:
    raw = client(gw).chat.completions.with_raw_response.create(
        model="mock-fallback", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-gateway-model"] == "healthy"
    usage = raw.parse().usage
    assert usage is not None
    # priced at the deployment actually used ($3 in / $4 out per Mtok)
    expected = Decimal(usage.prompt_tokens * 3000 + usage.completion_tokens * 4000) / 10**9
    assert Decimal(raw.headers["x-gateway-cost-usd"]) == expected
    assert metric_value(gw, "gateway_fallbacks_total", from_model="mock-fallback") == 1


def test_upstream_errors_map_to_openai_errors(gw: Server) -> None:
    c = client(gw)
    with pytest.raises(openai.RateLimitError) as rl:
        c.chat.completions.create(model="mock-429", messages=[{"role": "user", "content": "x"}])
    assert "mock failure" in str(rl.value)
    with pytest.raises(openai.APIStatusError) as bad_gateway:
        c.chat.completions.create(model="mock-500", messages=[{"role": "user", "content": "x"}])
    assert bad_gateway.value.status_code == 502 and bad_gateway.value.code == "upstream_error"
    with pytest.raises(openai.BadRequestError) as rejected:
        c.chat.completions.create(model="mock-400", messages=[{"role": "user", "content": "x"}])
    assert rejected.value.code == "context_length_exceeded"
    with pytest.raises(openai.APIStatusError) as timeout:
        c.chat.completions.create(model="mock-slow", messages=[{"role": "user", "content": "x"}])
    assert timeout.value.status_code == 504 and timeout.value.code == "upstream_timeout"
    # a failed request costs nothing
    assert metric_value(gw, "gateway_cost_usd_total", model="mock-500") == 0
    assert metric_value(gw, "gateway_requests_total", model="mock-500", status="upstream_error") == 1


def test_stream_cut_becomes_error_event_and_is_charged(gw: Server) -> None:
    from gateway.tokens import count_completion_text, count_prompt

    messages = [{"role": "user", "content": "tell me a story"}]
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in client(gw).chat.completions.create(model="mock-cut", messages=messages, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert "mid-response" in str(err.value) or "failed" in str(err.value)
    assert len(received) == 5
    # charged for what was delivered: estimated prompt + the 5 delivered tokens' text
    prompt = count_prompt({"messages": messages}, "chat", "mock-cut5")
    output = count_completion_text("".join(received), "mock-cut5")
    expected = prompt * IN_NANO + output * OUT_NANO
    assert metric_value(gw, "gateway_cost_usd_total", model="mock-cut") == pytest.approx(expected / 1e9)
