"""End to end with the official openai SDK: gateway process in front of the mock upstream process."""

from __future__ import annotations

import asyncio
import json
import re
import time
from decimal import Decimal
from typing import Any

import httpx
import openai
import orjson
import pytest
from redis.asyncio import Redis

from conftest import GatewayFactory, Server, mock_policy
from gateway.state.ledger import LedgerRecord, RedisLedger
from gateway.tokens import count_completion_text

pytestmark = pytest.mark.e2e   # starts gateway processes on the mock upstream

# Prices in the mock policy: $1/Mtok in, $2/Mtok out, $0.5/Mtok cached reads => nano-USD per token.
IN_NANO, OUT_NANO, CACHED_NANO = 1000, 2000, 500
MASTER = "sk-e2e-openai-master"
LEDGER_DB = 5   # this module's logical database on the session's private redis-server


@pytest.fixture
def gw(gateway: GatewayFactory, mock_reset: str) -> Server:
    return gateway(mock_policy(mock_reset))


@pytest.fixture
def gw_ledger(gateway: GatewayFactory, mock_reset: str, redis_port: int) -> Server:
    """The same gateway, writing its ledger to the private redis-server so tests can read each record."""
    return gateway(mock_policy(mock_reset), env={
        "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/{LEDGER_DB}", "GATEWAY_MASTER_KEY": MASTER})


def ledger_record(redis_port: int, request_id: str, timeout: float = 15.0) -> LedgerRecord:
    """The ledger record of one request, read back from Redis once the gateway's writer has flushed it."""
    async def find() -> LedgerRecord:
        client = Redis(host="127.0.0.1", port=redis_port, db=LEDGER_DB)
        try:
            ledger = RedisLedger(client)
            deadline = time.monotonic() + timeout
            while True:
                found = [r for r in await ledger.read(time.time() - 3600) if r.request_id == request_id]
                if found:
                    [record] = found
                    return record
                if time.monotonic() > deadline:
                    raise AssertionError(f"no ledger record for {request_id} after {timeout}s")
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()
    return asyncio.run(find())


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


IMAGE_MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You describe images."},
    {"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg==",
                                            "detail": "low"}}]},
]


def without_ids(payload: dict[str, Any]) -> dict[str, Any]:
    """A response body minus what differs between two calls (id, created) and the gateway's cost_usd."""
    out = {k: v for k, v in payload.items() if k not in ("id", "created")}
    if isinstance(out.get("usage"), dict):
        out["usage"] = {k: v for k, v in out["usage"].items() if k != "cost_usd"}
    return out


def test_image_parts_stop_and_unknown_fields_reach_the_upstream_unchanged(gw: Server, mock_reset: str) -> None:
    client(gw).chat.completions.create(
        model="mock", messages=IMAGE_MESSAGES, stop=["\n\n", "END"],  # type: ignore[arg-type]
        extra_body={"x_vendor_option": {"level": 3, "tags": ["a", "b"]}, "top_k": 40})
    [seen] = mock_requests(mock_reset)
    assert seen["body"]["messages"] == IMAGE_MESSAGES
    assert seen["body"]["stop"] == ["\n\n", "END"]
    assert seen["body"]["x_vendor_option"] == {"level": 3, "tags": ["a", "b"]}
    assert seen["body"]["top_k"] == 40


def test_streamed_request_fields_reach_the_upstream_unchanged(gw: Server, mock_reset: str) -> None:
    list(client(gw).chat.completions.create(
        model="mock", messages=IMAGE_MESSAGES, stop="END", stream=True,  # type: ignore[arg-type]
        extra_body={"x_vendor_option": "keep me"}))
    [seen] = mock_requests(mock_reset)
    assert seen["body"]["messages"] == IMAGE_MESSAGES and seen["body"]["stop"] == "END"
    assert seen["body"]["x_vendor_option"] == "keep me" and seen["body"]["stream"] is True


def test_response_fields_come_back_unchanged(gw: Server, mock_reset: str) -> None:
    body = {"model": "mock", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}
    direct = httpx.post(f"{mock_reset}/v1/chat/completions", json=body).json()
    via = httpx.post(f"{gw.url}/v1/chat/completions", json=body,
                     headers={"Authorization": "Bearer sk-anything"}).json()
    # fields the gateway does not interpret (system_fingerprint, logprobs, refusal, the usage details) as sent
    assert via["system_fingerprint"] == "fp_mock"
    assert via["choices"][0]["logprobs"] is None and via["choices"][0]["message"]["refusal"] is None
    assert via["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] == 0
    assert without_ids(via) == without_ids(direct)
    assert "cost_usd" in via["usage"] and "cost_usd" not in direct["usage"]
    sdk_reply = client(gw).chat.completions.create(**body)  # type: ignore[call-overload]
    assert sdk_reply.system_fingerprint == "fp_mock"


def test_stream_chunk_fields_come_back_unchanged(gw: Server, mock_reset: str) -> None:
    body = {"model": "mock", "messages": [{"role": "user", "content": "hello there"}], "stream": True,
            "max_tokens": 4}

    def events(url: str, headers: dict[str, str]) -> list[dict[str, Any]]:
        with httpx.stream("POST", url, json=body, headers=headers) as resp:
            lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return [without_ids(orjson.loads(line)) for line in lines[:-1]]

    direct = events(f"{mock_reset}/v1/chat/completions", {})
    via = events(f"{gw.url}/v1/chat/completions", {"Authorization": "Bearer sk-anything"})
    assert len(via) == 5 and all(chunk["system_fingerprint"] == "fp_mock" for chunk in via)
    assert via == direct   # the chunks as the upstream sent them; the usage chunk it was asked for is removed
    streamed = list(client(gw).chat.completions.create(**body))  # type: ignore[call-overload]
    assert streamed and all(chunk.system_fingerprint == "fp_mock" for chunk in streamed)


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


# Hand-worked token counts (cl100k_base, the encoding for model names tiktoken does not know; OpenAI
# cookbook rules: 3 per message + role + content, then 3 for the reply priming):
#   [{"role": "user", "content": "count me"}]        3 + (3 + "user" 1 + "count"," me" 2) = 9
#   [{"role": "user", "content": "tell me a story"}] 3 + (3 + "user" 1 + "tell"," me"," a"," story" 4) = 11
# The mock's answers: 16 words non-streaming, "Mock answer from the benchmark upstream with plain words
# and steady timing for every request it", each word one cl100k token (16); a stream cut after 5
# chunks delivers "Mock answer from the benchmark" (5 tokens).


def test_upstream_without_usage_is_estimated(gw_ledger: Server, redis_port: int) -> None:
    raw = openai.OpenAI(base_url=f"{gw_ledger.url}/v1", api_key=MASTER, max_retries=0) \
        .chat.completions.with_raw_response.create(model="mock-nousage",
                                                   messages=[{"role": "user", "content": "count me"}])
    completion = raw.parse()
    # the upstream sent no usage: the body carries the gateway's own count, marked estimated, with the cost
    usage = completion.usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (9, 16, 25)
    assert usage.model_extra == {"estimated": True, "cost_usd": 0.000041}
    assert completion.choices[0].message.content == ("Mock answer from the benchmark upstream with plain words "
                                                     "and steady timing for every request it")
    assert raw.headers["x-gateway-cost-usd"] == "0.000041"   # 9 x 1000 + 16 x 2000 nano-USD
    record = ledger_record(redis_port, raw.headers["x-request-id"])
    assert (record.input_tokens, record.output_tokens) == (9, 16)
    assert record.cost_nano == 9 * 1000 + 16 * 2000 == 41_000
    assert record.estimated is True and record.status == "ok" and record.model == "mock-nousage"


def test_upstream_usage_is_not_marked_estimated(gw_ledger: Server, redis_port: int) -> None:
    raw = openai.OpenAI(base_url=f"{gw_ledger.url}/v1", api_key=MASTER, max_retries=0) \
        .chat.completions.with_raw_response.create(model="mock", messages=[{"role": "user", "content": "count me"}])
    usage = raw.parse().usage
    # the mock's own counting rule (bench/mock_upstream.py): 3 + (3 + 2 words) = 8 prompt tokens, 16 completion
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (8, 16)
    record = ledger_record(redis_port, raw.headers["x-request-id"])
    assert (record.input_tokens, record.output_tokens, record.cost_nano) == (8, 16, 40_000)
    assert record.estimated is False


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
    texts = [json.loads(choice.message.content)["answer"] for choice in out.choices]
    assert all(len(text.split()) == 12 for text in texts) and texts[0] != texts[1]   # 12 words each, own words
    assert out.usage is not None            # the JSON text the model wrote, counted as the gateway counts
    assert out.usage.completion_tokens == sum(count_completion_text(c.message.content, "demo-sim-1")
                                              for c in out.choices)
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
    # issue 11 item 5: the upstream's own text ("mock failure") stays in the log; the client gets a clean phrase
    assert "rate limited by the provider (HTTP 429" in str(rl.value) and "mock failure" not in str(rl.value)
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


def test_stream_cut_becomes_error_event_and_is_charged(gw_ledger: Server, redis_port: int) -> None:
    messages = [{"role": "user", "content": "tell me a story"}]
    sdk = openai.OpenAI(base_url=f"{gw_ledger.url}/v1", api_key=MASTER, max_retries=0)
    raw = sdk.chat.completions.with_raw_response.create(model="mock-cut", messages=messages, stream=True)
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert "mid-response" in str(err.value) or "failed" in str(err.value)
    assert "".join(received) == "Mock answer from the benchmark"
    # charged for what was delivered, counted by the gateway (the upstream never sent usage):
    # 11 prompt tokens at $1/Mtok (1000 nano-USD each) + 5 output tokens at $2/Mtok (2000 each)
    record = ledger_record(redis_port, raw.headers["x-request-id"])
    assert (record.input_tokens, record.output_tokens) == (11, 5)
    assert record.cost_nano == 21_000
    assert record.estimated is True and record.stream is True and record.status == "upstream_error"
