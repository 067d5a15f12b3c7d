"""Replay of the Mooncake synthetic trace (``../shared/data/mooncake-synthetic-trace.jsonl``) through a
gateway process on a private Redis, against the mock upstream with automatic prefix caching in
512-token blocks (model ``mock-apc512``): the cached-token share and the dollars saved, checked
request by request against what the trace's ``hash_ids`` imply, computed here independently.

Each request's prompt is one user message built from its 512-token blocks (the helpers and prices
are ``bench/mooncake_replay.py``'s, which replays the whole trace as a benchmark). The window is
300 consecutive requests from request 3600 on, replayed in order with a cold cache: late in the
trace, where prefixes are shared as in the trace as a whole (the whole trace implies 65% of prompt
tokens cached; its first 300 requests only 5%). Prices: $2/Mtok input, $0.50/Mtok cached input, $8/Mtok output.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from mooncake_replay import CACHED, FRAMING, IN, OUT, expected_cached, load_rows, policy, prompt, trace_path
from redis.asyncio import Redis
from saving_harness import metric

from conftest import Server, start_gateway, stop
from gateway.state.keys import RedisKeyStore
from gateway.state.ledger import RedisLedger

pytestmark = pytest.mark.e2e   # starts a gateway process on the mock upstream

TRACE = trace_path()
START, COUNT = 3600, 300


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str, redis_port: int) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("trace")
    (d / "models.yaml").write_text(policy(mock_upstream))
    server = start_gateway(d, d / "gateway.log", env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"})
    yield server
    stop(server.proc)


async def test_mooncake_prefix_sharing_is_priced_as_the_trace_implies(
        gw: Server, mock_reset: str, redis_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    if not TRACE.exists():
        pytest.skip(f"{TRACE} is not there")
    rows = load_rows(START, COUNT, TRACE)
    expect = expected_cached(rows)
    team = f"trace{int(time.time() * 1000)}"
    r = Redis(host="127.0.0.1", port=redis_port)
    _, secret = await RedisKeyStore(r).create(team, "trace")
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0, timeout=120)
    since = time.time() - 1
    seen_cached, prompt_total, output_total, cost_total = [], 0, 0, 0
    try:
        for row in rows:
            reply = await client.chat.completions.create(
                model="trace", max_tokens=max(1, row["output_length"]),
                messages=[{"role": "user", "content": prompt(row)}])
            usage = reply.usage
            assert usage is not None and usage.prompt_tokens == row["input_length"] + FRAMING
            assert usage.prompt_tokens_details is not None
            seen_cached.append(usage.prompt_tokens_details.cached_tokens or 0)
            prompt_total += usage.prompt_tokens
            output_total += usage.completion_tokens
            cost_total += round(usage.model_extra["cost_usd"] * 1e9)
        assert seen_cached == expect                               # request by request
        cached = sum(expect)
        saved = cached * (IN - CACHED)
        uncached_cost = prompt_total * IN + output_total * OUT
        assert cost_total == uncached_cost - saved
        records: list[Any] = []
        for _ in range(100):
            records = [x for x in await RedisLedger(r).read(since) if x.team == team]
            if len(records) >= COUNT:
                break
            await asyncio.sleep(0.1)
        assert len(records) == COUNT
        assert sum(x.cached_input_tokens for x in records) == cached
        assert sum(x.savings.get("prompt_cache", 0) for x in records) == saved
        assert sum(x.baseline_nano for x in records) == uncached_cost and sum(x.cost_nano for x in records) \
            == cost_total
        async with httpx.AsyncClient() as c:
            text = (await c.get(f"{gw.url}/metrics")).text
        assert round(metric(text, "gateway_savings_usd_total", team=team, source="prompt_cache") * 1e9) == saved
        assert metric(text, "gateway_tokens_total", team=team, type="cached_input") == cached
        with capsys.disabled():
            print(f"\nmooncake replay, requests {START}-{START + COUNT - 1}: {prompt_total} prompt tokens, "
                  f"{cached} cached ({cached / prompt_total:.1%}); cost ${cost_total / 1e9:.6f} instead of "
                  f"${uncached_cost / 1e9:.6f}: prompt caching saved ${saved / 1e9:.6f} "
                  f"({saved / uncached_cost:.1%})")
    finally:
        await r.aclose()
