"""Replay of the Mooncake synthetic trace (``../shared/data/mooncake-synthetic-trace.jsonl``) through a
gateway process on a private Redis, against the mock upstream with automatic prefix caching in
512-token blocks (model ``mock-apc512``): the cached-token share and the dollars saved, checked
request by request against what the trace's ``hash_ids`` imply, computed here independently.

Each request's prompt is one user message built from its 512-token blocks: block ``h`` is 512
words ``<h>x<i>`` (hex), a partial last block its first words, so equal hash ids give equal text
(the mock counts a word as a token). The window is 300 consecutive requests from request 3600 on,
replayed in order with a cold cache: late in the trace, where prefixes are shared as in the trace
as a whole (the whole trace implies 65% of prompt tokens cached; its first 300 requests only 5%).
Prices: $2/Mtok input, $0.50/Mtok cached input, $8/Mtok output.
"""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from redis.asyncio import Redis
from saving_harness import metric

from conftest import ROOT, Server, start_gateway, stop
from gateway.state.keys import RedisKeyStore
from gateway.state.ledger import RedisLedger

TRACE_NAME = "mooncake-synthetic-trace.jsonl"


def _trace_path() -> Path:
    """The shared trace: $GATEWAY_SHARED_DATA, else ../shared/data next to the checkout, else /work/shared/data."""
    for base in (os.environ.get("GATEWAY_SHARED_DATA"), ROOT.parent / "shared" / "data", "/work/shared/data"):
        if base and (Path(base) / TRACE_NAME).exists():
            return Path(base) / TRACE_NAME
    return ROOT.parent / "shared" / "data" / TRACE_NAME


TRACE = _trace_path()
START, COUNT, BLOCK = 3600, 300, 512
IN, CACHED, OUT = 2000, 500, 8000          # nano-USD per token
FRAMING = 6                                # the mock's chat framing: 3 per request + 3 per message


def load_window() -> list[dict[str, Any]]:
    with open(TRACE) as fh:
        rows = [json.loads(line) for _, line in zip(range(START + COUNT), fh, strict=False)]
    return rows[START:]


def expected_cached(rows: list[dict[str, Any]]) -> list[int]:
    """Per request, the tokens of its leading full blocks whose whole prefix an earlier request had."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for row in rows:
        ids, full = row["hash_ids"], row["input_length"] // BLOCK
        cached, leading = 0, True
        for j in range(min(full, len(ids))):
            prefix = tuple(ids[:j + 1])
            if leading and prefix in seen:
                cached += BLOCK
            else:
                leading = False
                seen.add(prefix)
        out.append(cached)
    return out


def prompt(row: dict[str, Any]) -> str:
    words: list[str] = []
    left = row["input_length"]
    for h in row["hash_ids"]:
        n = min(BLOCK, left)
        words.extend(f"{h:x}x{i:x}" for i in range(n))
        left -= n
    assert left == 0 and len(words) == row["input_length"]
    return " ".join(words)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str, redis_port: int) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("trace")
    (d / "models.yaml").write_text(textwrap.dedent(f"""\
        models:
          trace:
            deployments:
              - provider: openai
                model: mock-apc512-tokens4096
                api_base: {mock_upstream}/v1
                price: {{input_per_mtok: 2.0, cache_read_per_mtok: 0.5, output_per_mtok: 8.0}}
        """))
    server = start_gateway(d, d / "gateway.log", env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"})
    yield server
    stop(server.proc)


async def test_mooncake_prefix_sharing_is_priced_as_the_trace_implies(
        gw: Server, mock_reset: str, redis_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    if not TRACE.exists():
        pytest.skip(f"{TRACE} is not there")
    rows = load_window()
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
