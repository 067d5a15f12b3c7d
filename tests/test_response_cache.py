"""The response cache end to end, on both backends (in-memory in this process; Redis under a gateway
process): hit, miss and bypass, the cache-control header, stream replay read by the ``openai`` SDK,
isolation between teams, system prompts, tools and models, TTL expiry, and the savings in the
metrics and the ledger, to the nano-dollar. The mock upstream prices at $1/Mtok in, $2/Mtok out."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from redis.asyncio import Redis
from saving_harness import Harness, InProcess, OverRedis, metric, nano

from conftest import Server, mock_policy, start_gateway, stop

pytestmark = pytest.mark.e2e   # starts the mock upstream process (and a gateway process on a private redis-server)

IN_NANO, OUT_NANO = 1000, 2000
TEAMS = """
teams:
  alpha: {}
  beta: {}
  limited:
    rpm: 4
    budgets: [{period: daily, usd: 1}]
cache:
  ttl_s: 60
  teams:
    always: {mode: always}
    nocache: {mode: off}
    short: {ttl_s: 1}
    tiny: {max_entry_bytes: 64}         # smaller than any answer
    sized: {max_entry_bytes: 2048}      # holds a short answer, not a 400-word one
"""
LONG_ANSWERS = """
mock-long:
  deployments:
    - provider: openai
      model: mock-tokens400
      api_base: {mock}/v1
      price: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
"""


def policy(mock: str) -> str:
    return mock_policy(mock, long=LONG_ANSWERS.format(mock=mock)) + TEAMS


@pytest.fixture(scope="module")
def redis_gateway(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str, redis_port: int) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("cache-redis")
    (d / "models.yaml").write_text(policy(mock_upstream))
    server = start_gateway(d, d / "gateway.log", env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"})
    yield server
    stop(server.proc)


@pytest.fixture(params=["memory", "redis"])
async def h(request: pytest.FixtureRequest, tmp_path: Path, mock_upstream: str) -> AsyncIterator[Harness]:
    harness: Harness
    if request.param == "memory":
        (tmp_path / "models.yaml").write_text(policy(mock_upstream))
        harness = InProcess(tmp_path)
    else:
        harness = OverRedis(request.getfixturevalue("redis_gateway"), request.getfixturevalue("redis_port"))
    yield harness
    await harness.aclose()


def unique() -> str:
    return uuid.uuid4().hex[:10]


async def upstream_calls(mock: str) -> int:
    async with httpx.AsyncClient() as c:
        return int((await c.get(f"{mock}/_stats")).json()["total"])


async def ask(client: openai.AsyncOpenAI, text: str, **kw: Any) -> Any:
    messages = kw.pop("messages", None) or [{"role": "user", "content": text}]
    return await client.chat.completions.with_raw_response.create(model=kw.pop("model", "mock"),
                                                                   messages=messages, **kw)


def cost_of(raw: Any) -> int:
    return nano(float(raw.headers["x-gateway-cost-usd"]))


async def test_miss_then_hit_costs_nothing_and_saves_its_baseline(h: Harness, mock_upstream: str) -> None:
    client = h.client(await h.key("alpha"))
    since, before = time.time() - 1, await h.metrics()
    calls = await upstream_calls(mock_upstream)
    text = f"what is {unique()}?"
    first = await ask(client, text, temperature=0)
    second = await ask(client, text, temperature=0)
    assert await upstream_calls(mock_upstream) == calls + 1        # the hit never reached the upstream
    assert first.headers["x-gateway-cache"] == "miss" and second.headers["x-gateway-cache"] == "hit"
    a, b = first.parse(), second.parse()
    usage = a.usage
    assert usage is not None
    expected = usage.prompt_tokens * IN_NANO + usage.completion_tokens * OUT_NANO
    assert cost_of(first) == expected and nano(usage.model_extra["cost_usd"]) == expected
    assert cost_of(second) == 0 and b.usage is not None and b.usage.model_extra["cost_usd"] == 0
    assert b.choices[0].message.content == a.choices[0].message.content and b.id == a.id
    assert b.usage.prompt_tokens == usage.prompt_tokens                 # the answer's own size, unchanged
    miss, hit = await h.records(since, "alpha", 2)
    assert (miss.cache, miss.cost_nano, miss.baseline_nano, miss.savings) == ("miss", expected, expected, {})
    assert (hit.cache, hit.cost_nano, hit.baseline_nano, hit.savings) == ("hit", 0, expected, {"cache": expected})
    assert hit.input_tokens == hit.output_tokens == 0 and hit.deployment == miss.deployment == "openai/mock"
    after = await h.metrics()
    for result, n in (("miss", 1), ("hit", 1), ("bypass", 0)):
        assert metric(after, "gateway_cache_requests_total", team="alpha", result=result) \
            - metric(before, "gateway_cache_requests_total", team="alpha", result=result) == n
    assert metric(after, "gateway_requests_total", team="alpha", cache="hit") \
        - metric(before, "gateway_requests_total", team="alpha", cache="hit") == 1
    saved = metric(after, "gateway_savings_usd_total", team="alpha", source="cache") \
        - metric(before, "gateway_savings_usd_total", team="alpha", source="cache")
    assert nano(saved) == expected
    spent = metric(after, "gateway_cost_usd_total", team="alpha") \
        - metric(before, "gateway_cost_usd_total", team="alpha")
    assert nano(spent) == expected                                      # the hit added nothing to spend


async def test_bypass_no_cache_and_no_store(h: Harness, mock_upstream: str) -> None:
    client = h.client(await h.key("alpha"))
    text = f"tell me {unique()}"
    calls = await upstream_calls(mock_upstream)
    plain = [await ask(client, text) for _ in range(2)]                    # temperature 1 by default
    assert [r.headers["x-gateway-cache"] for r in plain] == ["bypass", "bypass"]
    seeded = [await ask(client, text, seed=7) for _ in range(2)]
    assert [r.headers["x-gateway-cache"] for r in seeded] == ["miss", "hit"]
    assert await upstream_calls(mock_upstream) == calls + 3
    fresh = await ask(client, text, seed=7, extra_headers={"cache-control": "no-cache"})
    assert fresh.headers["x-gateway-cache"] == "bypass" and await upstream_calls(mock_upstream) == calls + 4
    assert (await ask(client, text, seed=7)).headers["x-gateway-cache"] == "hit"   # no-cache stored the fresh one
    other = f"tell me {unique()}"
    nostore = await ask(client, other, temperature=0, extra_headers={"cache-control": "no-store"})
    assert nostore.headers["x-gateway-cache"] == "bypass"
    assert (await ask(client, other, temperature=0)).headers["x-gateway-cache"] == "miss"  # nothing was stored
    assert (await ask(client, other, temperature=0)).headers["x-gateway-cache"] == "hit"


async def test_no_hit_across_teams_system_prompts_tools_or_models(h: Harness) -> None:
    alpha, beta = h.client(await h.key("alpha")), h.client(await h.key("beta"))
    text = f"translate {unique()}"
    base = [{"role": "system", "content": "You translate."}, {"role": "user", "content": text}]
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    other_tool = {"type": "function", "function": {"name": "search", "parameters": {"type": "object",
                                                                                    "properties": {}}}}
    assert (await ask(alpha, "", messages=base, temperature=0)).headers["x-gateway-cache"] == "miss"
    assert (await ask(alpha, "", messages=base, temperature=0)).headers["x-gateway-cache"] == "hit"
    assert (await ask(beta, "", messages=base, temperature=0)).headers["x-gateway-cache"] == "miss"
    changed = [{"role": "system", "content": "You translate into French."}, base[1]]
    assert (await ask(alpha, "", messages=changed, temperature=0)).headers["x-gateway-cache"] == "miss"
    assert (await ask(alpha, "", messages=base, temperature=0, tools=[tool])).headers["x-gateway-cache"] == "miss"
    assert (await ask(alpha, "", messages=base, temperature=0, tools=[other_tool])).headers["x-gateway-cache"] \
        == "miss"
    assert (await ask(alpha, "", messages=base, temperature=0, tools=[tool])).headers["x-gateway-cache"] == "hit"
    assert (await ask(alpha, "", messages=base, temperature=0, model="mock-nousage")).headers["x-gateway-cache"] \
        == "miss"
    assert (await ask(alpha, "", messages=base, temperature=0, max_tokens=5)).headers["x-gateway-cache"] == "miss"


async def stream_final(client: openai.AsyncOpenAI, **kw: Any) -> tuple[Any, list[Any]]:
    """What the SDK's own stream accumulator makes of a stream, and the raw chunks."""
    chunks: list[Any] = []
    async with client.chat.completions.stream(**kw) as stream:
        async for event in stream:
            if event.type == "chunk":
                chunks.append(event.chunk)
        final = await stream.get_final_completion()
    return final, chunks


@pytest.mark.parametrize("with_tools", [False, True])
async def test_stream_replay_matches_the_stored_answer(h: Harness, with_tools: bool) -> None:
    client = h.client(await h.key("alpha"))
    messages = [{"role": "user", "content": f"stream {unique()}"}]
    kw: dict[str, Any] = {"model": "mock", "messages": messages, "temperature": 0}
    if with_tools:
        kw["tools"] = [{"type": "function", "function": {
            "name": "lookup", "strict": True,   # the SDK's accumulator parses only strict tools
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"],
                           "additionalProperties": False}}}]
    raw = await client.chat.completions.with_raw_response.create(**kw)
    original = raw.parse()
    assert raw.headers["x-gateway-cache"] == "miss"
    final, chunks = await stream_final(client, **kw, stream_options={"include_usage": True})
    message, stored = final.choices[0].message, original.choices[0].message
    assert message.content == stored.content and final.choices[0].finish_reason == original.choices[0].finish_reason
    if with_tools:
        assert stored.tool_calls and message.tool_calls
        assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls] == \
            [(c.id, c.function.name, c.function.arguments) for c in stored.tool_calls]
    else:
        assert message.content and message.tool_calls in (None, [])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and usage.model_extra["cost_usd"] == 0
    assert usage.prompt_tokens == original.usage.prompt_tokens
    _, plain = await stream_final(client, **kw)                  # no usage asked: no usage chunk
    assert plain and all(c.choices for c in plain) and all(c.usage is None for c in plain)


async def test_streamed_miss_is_served_as_json_and_as_stream(h: Harness) -> None:
    client = h.client(await h.key("alpha"))
    kw: dict[str, Any] = {"model": "mock", "messages": [{"role": "user", "content": f"s {unique()}"}],
                          "temperature": 0}
    streamed, _ = await stream_final(client, **kw, stream_options={"include_usage": True})
    raw = await client.chat.completions.with_raw_response.create(**kw)
    assert raw.headers["x-gateway-cache"] == "hit"
    answer = raw.parse()
    assert answer.choices[0].message.content == streamed.choices[0].message.content
    assert answer.usage is not None and streamed.usage is not None
    assert answer.usage.prompt_tokens == streamed.usage.prompt_tokens
    assert answer.usage.completion_tokens == streamed.usage.completion_tokens
    again = await client.chat.completions.with_raw_response.create(**kw, stream=True)
    assert again.headers["x-gateway-cache"] == "hit"
    replayed = [c async for c in again.parse()]
    assert "".join(c.choices[0].delta.content or "" for c in replayed if c.choices) \
        == streamed.choices[0].message.content


async def test_ttl_expiry(h: Harness) -> None:
    client = h.client(await h.key("short"))                     # ttl_s: 1
    text = f"ttl {unique()}"
    assert (await ask(client, text, temperature=0)).headers["x-gateway-cache"] == "miss"
    assert (await ask(client, text, temperature=0)).headers["x-gateway-cache"] == "hit"
    await asyncio.sleep(1.3)
    assert (await ask(client, text, temperature=0)).headers["x-gateway-cache"] == "miss"


async def test_answers_over_max_entry_bytes_are_never_stored(h: Harness, mock_upstream: str) -> None:
    tiny, sized = h.client(await h.key("tiny")), h.client(await h.key("sized"))
    text = f"sizes {unique()}"
    calls = await upstream_calls(mock_upstream)
    over = [await ask(tiny, text, temperature=0) for _ in range(3)]
    assert [r.headers["x-gateway-cache"] for r in over] == ["miss"] * 3 and len(over[0].content) > 64
    assert await upstream_calls(mock_upstream) == calls + 3                 # every one went upstream
    big = [await ask(sized, text, temperature=0, model="mock-long") for _ in range(2)]
    assert [r.headers["x-gateway-cache"] for r in big] == ["miss", "miss"] and len(big[0].content) > 2048
    assert big[0].parse().usage.completion_tokens == 400
    small = [await ask(sized, text, temperature=0, max_tokens=2) for _ in range(2)]
    assert len(small[0].content) < 2048 - 512                              # room for the entry's own fields
    assert [r.headers["x-gateway-cache"] for r in small] == ["miss", "hit"]
    assert small[1].parse().choices[0].message.content == small[0].parse().choices[0].message.content
    assert await upstream_calls(mock_upstream) == calls + 6


async def test_team_modes_always_and_off(h: Harness) -> None:
    always, off = h.client(await h.key("always")), h.client(await h.key("nocache"))
    text = f"modes {unique()}"
    assert (await ask(always, text)).headers["x-gateway-cache"] == "miss"
    assert (await ask(always, text)).headers["x-gateway-cache"] == "hit"
    assert (await ask(off, text, temperature=0)).headers["x-gateway-cache"] == "bypass"
    assert (await ask(off, text, temperature=0)).headers["x-gateway-cache"] == "bypass"


async def test_hits_count_for_rpm_but_hold_no_budget(h: Harness) -> None:
    for _ in range(100):                 # stay inside one rate window (a minute)
        if time.time() % 60 < 45:
            break
        await asyncio.sleep(0.2)
    client = h.client(await h.key("limited"))
    text = f"limits {unique()}"
    first = await ask(client, text, temperature=0)
    cost = cost_of(first)
    hits = [await ask(client, text, temperature=0) for _ in range(3)]
    assert [r.headers["x-gateway-cache"] for r in hits] == ["hit"] * 3
    assert [int(r.headers["x-ratelimit-remaining-requests"]) for r in hits] == [2, 1, 0]
    with pytest.raises(openai.RateLimitError):
        await ask(client, text, temperature=0)          # the fifth request in the minute
    spent, reserved = await h.spent("limited", "daily", 10**9)
    assert reserved == 0 and spent == cost              # the hits held and spent nothing
    remaining = {nano(float(r.headers["x-gateway-budget-remaining-usd"])) for r in hits}
    assert remaining == {10**9 - cost}


async def test_embeddings_and_legacy_completions(h: Harness) -> None:
    client = h.client(await h.key("alpha"))
    word = unique()
    e1 = await client.embeddings.with_raw_response.create(model="mock-embed", input=[word, "two"])
    e2 = await client.embeddings.with_raw_response.create(model="mock-embed", input=[word, "two"])
    assert (e1.headers["x-gateway-cache"], e2.headers["x-gateway-cache"]) == ("miss", "hit")
    assert e1.parse().data[0].embedding == e2.parse().data[0].embedding
    c1 = await client.completions.with_raw_response.create(model="mock", prompt=f"once {word}", temperature=0)
    text = c1.parse().choices[0].text
    chunks = [c async for c in await client.completions.create(model="mock", prompt=f"once {word}",
                                                                 temperature=0, stream=True)]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text


async def test_redis_entries_live_under_their_prefix_with_ttl(redis_gateway: Server, redis_port: int) -> None:
    h = OverRedis(redis_gateway, redis_port)
    try:
        client = h.client(await h.key("alpha"))
        await ask(client, f"stored {unique()}", temperature=0)
        r = Redis(host="127.0.0.1", port=redis_port)
        try:
            keys = [k async for k in r.scan_iter(match="gw:v1:rcache:*")]
            assert keys and all(len(k) == len(b"gw:v1:rcache:") + 64 for k in keys)
            assert 0 < await r.pttl(keys[0]) <= 60_000
        finally:
            await r.aclose()
    finally:
        await h.aclose()
