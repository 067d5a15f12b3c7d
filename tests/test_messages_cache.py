"""The response cache on Anthropic's Messages API (issue 12, item 5), with the official ``anthropic`` SDK.

The app runs in process with the policy, SDK client and prices of :mod:`test_messages_api`: the
loopback mock Messages API behind a native deployment, the simulated model behind translation to
chat. Checked: a deterministic request (``temperature: 0``, sent in the body: the SDK has no sampling
parameters) misses, then hits without reaching the upstream, JSON and streamed both ways, native
and translated; the hit comes back under a fresh
``msg_`` id with ``x-gateway-cache: hit``, ``x-gateway-cost-usd: 0`` / ``usage.cost_usd`` 0, and as
a stream (thinking with its signature, text, ``tool_use``) that ``messages.stream`` accumulates into
the stored Message; the ledger has the miss's cost and the hit at $0 with its saving, both to the
nano-dollar; ``metadata`` is not in the key, the system prompt, ``max_tokens`` and the beta
features are; a non-deterministic request and a cut stream are never stored; a team with
``mode: always`` caches what the SDK sends, thinking included.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
from mock_anthropic import SIGNATURE, MockAnthropic, mock_anthropic, mock_anthropic_server  # noqa: F401
from test_messages_api import IN, OUT, POLICY, READ, WRITE, Gw, nano_of  # the same models, prices and SDK client

from inprocess import in_process

LOCAL_IN, LOCAL_OUT = 1_000_000, 2_000_000   # pico-USD per token of the simulated "local" model ($1 in, $2 out)
CACHE = """\
cache:
  teams:
    everything: {mode: always}
"""
# The SDK (2.x, API version 2026-10-21) has no sampling parameters: a client that asks for temperature 0
# sends it in the body itself, as older SDKs, raw HTTP clients and API version 2023-06-01 do.
ASK: dict[str, Any] = {"model": "claude-sonnet", "max_tokens": 200, "system": "be brief",
                       "messages": [{"role": "user", "content": "what is 2+2?"}], "extra_body": {"temperature": 0}}


@pytest.fixture
async def gw(tmp_path: Path, mock_anthropic: MockAnthropic,  # noqa: F811
             monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gw]:
    monkeypatch.setenv("TEST_ANTHROPIC_UPSTREAM_KEY", "sk-ant-upstream-secret")
    async with in_process(tmp_path, POLICY.format(mock=mock_anthropic.url) + CACHE) as gateway:
        yield Gw(gateway.app, gateway)
TOOL = {"name": "lookup", "description": "Look a city up.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def blocks(message: Any) -> list[dict[str, Any]]:
    """A Message's content as data (a streamed Message's blocks are the SDK's Parsed* subclasses)."""
    return [block.model_dump(exclude_none=True) for block in message.content]


async def streamed(client: anthropic.AsyncAnthropic, **kw: Any) -> tuple[list[str], dict[str, Any], Any]:
    """(raw event types, the final ``message_delta``'s usage, the accumulated Message) of one ``messages.stream``."""
    kinds: list[str] = []
    delta_usage: dict[str, Any] = {}
    async with client.messages.stream(**kw) as stream:
        async for event in stream:
            kinds.append(event.type)
            if event.type == "message_delta":
                delta_usage = event.usage.model_dump()
        final = await stream.get_final_message()
    raw = ("message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
           "message_stop")
    return [k for k in kinds if k in raw], delta_usage, final


async def test_native_json_miss_then_json_and_streamed_hits(gw: Gw, mock_anthropic: MockAnthropic  # noqa: F811
                                                            ) -> None:
    mock_anthropic.set(input=25, cache_read=1000, cache_write_5m=200, output=7)
    client = gw.client(await gw.key("paying"))
    miss = await client.messages.with_raw_response.create(**ASK, metadata={"user_id": "u-1"})
    hit = await client.messages.with_raw_response.create(**ASK, metadata={"user_id": "u-2"})   # not in the key
    first, second = await miss.parse(), await hit.parse()
    assert len(mock_anthropic.requests) == 1                       # the hit never reached the upstream
    assert (miss.headers["x-gateway-cache"], hit.headers["x-gateway-cache"]) == ("miss", "hit")
    assert hit.headers["x-gateway-cost-usd"] == "0" and second.usage.model_extra["cost_usd"] == 0
    assert second.id != first.id and second.id.startswith("msg_") and blocks(second) == blocks(first)
    assert second.content[0].text == "Hello from the mock Anthropic API." and second.stop_reason == "end_turn"
    usage = second.usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.output_tokens) == (25, 1000, 7)

    kinds, delta_usage, third = await streamed(client, **ASK)       # the JSON answer, replayed as a stream
    assert kinds == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]
    assert third.id not in (first.id, second.id) and blocks(third) == blocks(first)
    assert delta_usage["cost_usd"] == 0 and third.usage.output_tokens == 7 and len(mock_anthropic.requests) == 1

    miss_record, *hits = await gw.records()
    cost = nano_of(25 * IN + 1000 * READ + 200 * WRITE + 7 * OUT)
    uncached = nano_of(1225 * IN + 7 * OUT)     # a hit saves what the answer costs with no prompt caching
    assert (miss_record.cache, miss_record.endpoint, miss_record.cost_nano) == ("miss", "messages", cost)
    assert miss_record.baseline_nano == uncached and miss_record.savings == {"prompt_cache": uncached - cost}
    assert [(r.cache, r.cost_nano, r.baseline_nano, r.savings, r.stream, r.endpoint) for r in hits] == [
        ("hit", 0, uncached, {"cache": uncached}, False, "messages"),
        ("hit", 0, uncached, {"cache": uncached}, True, "messages")]
    assert all(gw.settles[r.request_id] == 0 for r in hits) and await gw.reserved("paying") == 0


async def test_native_stream_miss_is_stored_and_replayed_with_thinking_and_tool_use(
        gw: Gw, mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    mock_anthropic.set(input=40, output=12, thinking="the user wants a lookup")
    client = gw.client(await gw.key("paying"))
    ask = {**ASK, "tools": [TOOL], "messages": [{"role": "user", "content": "weather in Paris?"}]}
    kinds, _, first = await streamed(client, **ask)
    assert [b.type for b in first.content] == ["thinking", "tool_use"]
    kinds, delta_usage, second = await streamed(client, **ask)
    assert len(mock_anthropic.requests) == 1
    assert kinds == ["message_start", *["content_block_start", "content_block_delta", "content_block_delta",
                                        "content_block_stop"],   # thinking_delta, signature_delta
                     "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
                     "message_stop"]
    assert second.id != first.id and blocks(second) == blocks(first) and second.stop_reason == "tool_use"
    assert second.content[0].signature == SIGNATURE and second.content[1].input == first.content[1].input
    assert delta_usage["cost_usd"] == 0 and second.usage.output_tokens == 12 and second.usage.input_tokens == 40
    json_hit = await client.messages.with_raw_response.create(**ask)   # a stored stream answers JSON too
    assert json_hit.headers["x-gateway-cache"] == "hit" and blocks(await json_hit.parse()) == blocks(first)
    records = await gw.records()
    cost = nano_of(40 * IN + 12 * OUT)
    assert [(r.cache, r.cost_nano, r.savings, r.stream) for r in records] == [
        ("miss", cost, {}, True), ("hit", 0, {"cache": cost}, True), ("hit", 0, {"cache": cost}, False)]


async def test_translated_misses_are_stored_json_and_streamed(gw: Gw) -> None:
    client = gw.client(await gw.key("paying"))
    ask = {**ASK, "model": "local"}
    miss = await client.messages.with_raw_response.create(**ask)
    kinds, delta_usage, hit = await streamed(client, **ask)
    first = await miss.parse()
    assert miss.headers["x-gateway-cache"] == "miss" and hit.id != first.id and blocks(hit) == blocks(first)
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert delta_usage["cost_usd"] == 0 and hit.usage.output_tokens == 6

    other = {**ask, "messages": [{"role": "user", "content": "and 3+3?"}]}
    _, _, streamed_miss = await streamed(client, **other)
    json_hit = await client.messages.with_raw_response.create(**other)
    assert json_hit.headers["x-gateway-cache"] == "hit" and json_hit.headers["x-gateway-cost-usd"] == "0"
    replayed = await json_hit.parse()
    assert blocks(replayed) == blocks(streamed_miss) and replayed.id != streamed_miss.id
    assert replayed.usage.model_extra["cost_usd"] == 0 and replayed.usage.output_tokens == 6

    one, two, three, four = await gw.records()
    assert [(r.cache, r.stream) for r in (one, two, three, four)] == [("miss", False), ("hit", True),
                                                                     ("miss", True), ("hit", False)]
    for miss_record, hit_record in ((one, two), (three, four)):
        cost = nano_of(miss_record.input_tokens * LOCAL_IN + 6 * LOCAL_OUT)
        assert miss_record.cost_nano == cost and miss_record.output_tokens == 6
        assert (hit_record.cost_nano, hit_record.baseline_nano, hit_record.savings) == (0, cost, {"cache": cost})
        assert hit_record.deployment == miss_record.deployment == "local-sim"


async def test_non_deterministic_requests_are_never_cached(gw: Gw, mock_anthropic: MockAnthropic  # noqa: F811
                                                           ) -> None:
    client = gw.client(await gw.key("paying"))
    plain = {k: v for k, v in ASK.items() if k != "extra_body"}          # what the SDK sends: no temperature
    warm = {**plain, "extra_body": {"temperature": 0.7}}
    seeded = {**plain, "extra_body": {"seed": 3}}                        # the Messages API has no seed
    thinking = {**plain, "thinking": {"type": "enabled", "budget_tokens": 100}}
    results = []
    for ask in (plain, plain, warm, warm, seeded, seeded, thinking, thinking):
        raw = await client.messages.with_raw_response.create(**ask)
        results.append(raw.headers["x-gateway-cache"])
        await raw.parse()
    await streamed(client, **plain)
    assert results == ["bypass"] * 8 and len(mock_anthropic.requests) == 9
    records = await gw.records()
    cost = nano_of(25 * IN + 6 * OUT)                 # the mock's defaults: 25 input tokens, one per word out
    assert [(r.cache, r.cost_nano, r.savings) for r in records] == [("bypass", cost, {})] * 9


async def test_mode_always_caches_what_the_sdk_sends_thinking_included(gw: Gw, mock_anthropic: MockAnthropic  # noqa: F811
                                                                        ) -> None:
    mock_anthropic.set(input=30, output=9, thinking="think twice")
    client = gw.client(await gw.key("everything"))
    ask = {k: v for k, v in ASK.items() if k != "extra_body"}
    ask["thinking"] = {"type": "enabled", "budget_tokens": 100}
    _, _, first = await streamed(client, **ask)
    _, delta_usage, second = await streamed(client, **ask)
    assert len(mock_anthropic.requests) == 1 and blocks(second) == blocks(first) and second.id != first.id
    assert second.content[0].type == "thinking" and second.content[0].signature == SIGNATURE
    cost = nano_of(30 * IN + 9 * OUT)
    assert delta_usage["cost_usd"] == 0
    assert [(r.cache, r.cost_nano, r.savings) for r in await gw.records()] == [("miss", cost, {}),
                                                                               ("hit", 0, {"cache": cost})]


async def test_what_changes_the_answer_is_in_the_key(gw: Gw, mock_anthropic: MockAnthropic  # noqa: F811
                                                     ) -> None:
    client = gw.client(await gw.key("paying"))
    beta = {"anthropic-beta": "context-management-2025-06-27"}
    variants: list[dict[str, Any]] = [ASK, {**ASK, "system": "be thorough"}, {**ASK, "max_tokens": 201},
                                      {**ASK, "stop_sequences": ["###"]}, {**ASK, "tools": [TOOL]},
                                      {**ASK, "tools": [TOOL], "tool_choice": {"type": "auto"}},
                                      {**ASK, "extra_headers": beta}]
    mock_anthropic.set(tool="off")
    first = [(await client.messages.with_raw_response.create(**v)).headers["x-gateway-cache"] for v in variants]
    again = [(await client.messages.with_raw_response.create(**v)).headers["x-gateway-cache"] for v in variants]
    assert first == ["miss"] * len(variants) and again == ["hit"] * len(variants)
    assert len(mock_anthropic.requests) == len(variants)
    other = gw.client(await gw.key("strict"))      # never across teams
    assert (await other.messages.with_raw_response.create(**ASK)).headers["x-gateway-cache"] == "miss"
    assert len(mock_anthropic.requests) == len(variants) + 1


async def test_a_cut_stream_is_not_stored(gw: Gw, mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    mock_anthropic.set(stream_cut="1")
    key = await gw.key("paying")
    body = {**{k: v for k, v in ASK.items() if k != "extra_body"}, **ASK["extra_body"], "stream": True}
    status, events = await gw.post(key, body, path="/v1/messages")
    assert status == 200 and b"event: error" in events and b"event: message_stop" not in events
    mock_anthropic.set(stream_cut="")
    client = gw.client(key)
    again = await client.messages.with_raw_response.create(**ASK)
    assert again.headers["x-gateway-cache"] == "miss" and len(mock_anthropic.requests) == 2
    assert (await client.messages.with_raw_response.create(**ASK)).headers["x-gateway-cache"] == "hit"
    assert [(r.cache, r.status) for r in await gw.records()] == [("miss", "upstream_error"), ("miss", "ok"),
                                                                 ("hit", "ok")]
