"""A burst admits what the budget pays for: requests refused only for others' holds wait for them.

In process, on the simulated model: each request's worst case ($0.25 for 50 output tokens) is
five times what it really costs ($0.05 for 10), so against $1 only four worst-case holds fit at
once while twenty requests fit in the budget. Refused requests whose budget would cover them once
the holds in flight settle try again for a bounded time; an exhausted budget still refuses at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from inprocess import Gateway, in_process

POLICY = """\
models:
  agent:
    deployments:
      - provider: simulated
        name: agent-sim
        price: {input_per_mtok: 0, output_per_mtok: 5000}
        simulated: {output_tokens: 10, latency_ms: 40}
teams:
  burst:
    budgets: [{period: daily, usd: 1}]
"""


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with in_process(tmp_path, POLICY) as gateway:
        yield gateway


def ask() -> dict[str, object]:
    return {"model": "agent", "max_tokens": 50, "messages": [{"role": "user", "content": "go"}]}


async def test_a_burst_admits_every_request_the_budget_pays_for(gw: Gateway) -> None:
    key = await gw.key("burst")
    results = await asyncio.gather(*(gw.post(key, ask()) for _ in range(30)))
    statuses = [status for status, _ in results]
    assert statuses.count(200) == 20 and statuses.count(429) == 10
    records = await gw.records()
    assert sum(r.cost_nano for r in records) == 1_000_000_000 and await gw.reserved("burst") == 0


async def test_an_exhausted_budget_refuses_without_waiting(gw: Gateway) -> None:
    key = await gw.key("burst")
    for _ in range(20):
        assert (await gw.post(key, ask()))[0] == 200
    state = gw.app.state.state
    reserve, calls = state.reserve, []

    async def counted(req: object, intent: object = None) -> object:
        calls.append(req)
        return await reserve(req, intent)

    state.reserve = counted
    status, body = await gw.post(key, ask())
    assert status == 429 and orjson.loads(body)["error"]["code"] == "budget_exceeded"
    assert len(calls) == 1          # refused on its first try: nothing held, nothing to wait for


async def test_a_tpm_limit_caps_the_output_instead_of_refusing(gw: Gateway) -> None:
    """A key with --tpm 1000 and a request without max_tokens (issue 16, item 2): the hold is the tokens left
    in the minute, the output is capped to fit them, and the settle counts what was really used."""
    _, key = await gw.app.state.state.key_store.create("tpm-team", "test", tpm=1000)
    status, body = await gw.post(key, {"model": "agent", "messages": [{"role": "user", "content": "go"}]})
    assert status == 200, body
    [record] = await gw.records()
    assert record.status == "ok" and record.input_tokens + record.output_tokens <= 1000
    status, body = await gw.post(key, {"model": "agent", "messages": [{"role": "user", "content": "again"}]})
    assert status == 200, body                       # the first request settled to its truth: room is left


async def test_keys_create_warns_of_a_tpm_below_one_default_request() -> None:
    from gateway.admin.ops import KeyRequest, create_key
    from gateway.state.keys import MemoryKeyStore
    reply = await create_key(MemoryKeyStore(), KeyRequest(team="t", tpm=1000), None)
    assert any("tpm 1000" in w for w in reply["warnings"])
    quiet = await create_key(MemoryKeyStore(), KeyRequest(team="t", tpm=100_000), None)
    assert quiet["warnings"] == []
