"""Budgets hold on the Messages and Responses surfaces: 50 concurrent requests, 4 workers, one Redis.

Each request asks for ``max_tokens``/``max_output_tokens`` of 32,000 (Claude Code's default) against a
team budget that covers only a few of them; the simulated model answers 10 output tokens at a
price that makes each answer cost exactly $0.05. Holds are capped to the headroom, so the budget
admits what it pays for, and the settled spend never passes the limit.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from conftest import GatewayFactory
from gateway.state.budgets import BudgetRule
from gateway.state.budgets_redis import RedisBudgetStore
from gateway.state.keys import RedisKeyStore
from gateway.state.ledger import RedisLedger

pytestmark = pytest.mark.e2e
USD = 1_000_000_000
POLICY = """
models:
  agent:
    deployments:
      - provider: simulated
        name: agent-sim
        price: {{input_per_mtok: 0, output_per_mtok: 5000}}
        simulated: {{output_tokens: 10}}
teams:
  {team}: {{budgets: [{{period: monthly, usd: 0.5}}]}}
"""
BODIES = {
    "messages": ("/v1/messages", lambda stream: {"model": "agent", "max_tokens": 32000, "stream": stream,
                                                  "messages": [{"role": "user", "content": "go"}]}),
    "responses": ("/v1/responses", lambda stream: {"model": "agent", "max_output_tokens": 32000, "stream": stream,
                                                    "input": "go", "store": False}),
}


@pytest.mark.parametrize("surface", ["messages", "responses"])
async def test_fifty_concurrent_requests_never_overspend(gateway: GatewayFactory, redis_port: int,
                                                         surface: str) -> None:
    team = f"t{uuid.uuid4().hex[:8]}"
    server = gateway(POLICY.format(team=team), env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"},
                     args=("--workers", "4"))
    redis = Redis(host="127.0.0.1", port=redis_port)
    try:
        _, secret = await RedisKeyStore(redis).create(team, "test")
        path, body = BODIES[surface]
        since = time.time() - 1
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            async def one(i: int) -> tuple[int, Any]:
                reply = await client.post(path, json=body(i % 2 == 1),
                                          headers={"x-api-key": secret, "anthropic-version": "2023-06-01"})
                return reply.status_code, reply.text

            results = await asyncio.gather(*(one(i) for i in range(50)))
        statuses = [s for s, _ in results]
        assert set(statuses) <= {200, 429}, results[:3]
        assert statuses.count(200) >= 1 and statuses.count(429) >= 1
        [usage] = await RedisBudgetStore(redis).usage(team, [BudgetRule("team", team, "monthly", USD // 2)],
                                                      datetime.now(UTC))
        assert usage.reserved_nano == 0 and 0 < usage.spent_nano <= USD // 2
        ledger = RedisLedger(redis)
        deadline = time.monotonic() + 30
        records = await ledger.read(since, team=team)
        while len(records) < 50 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            records = await ledger.read(since, team=team)
        assert len(records) == 50
        assert sum(r.cost_nano for r in records) == usage.spent_nano
        assert {r.status for r in records} <= {"ok", "budget_exceeded"}
    finally:
        await redis.aclose()
