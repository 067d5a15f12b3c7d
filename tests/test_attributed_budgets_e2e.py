"""End-user, tag and session budgets and the spend-rate brake end to end: 4 gateway workers on one
private Redis, the mock upstream (each request costs exactly $0.05), the official ``openai`` SDK.

Eight concurrent first requests of an end user unknown to the policy (``users.default``), of a
tag and of a session admit exactly what the budget pays for, and what settles stays at or under
it; a tight loop of one session is stopped by ``max_usd_per_minute`` within its minute.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal

from admin_helpers import MASTER, admin
from redis.asyncio import Redis
from redis_fixtures import server_time
from test_budgets_e2e import ask, client_for, mock_calls, new_key, policy

from conftest import GatewayFactory
from gateway.state.budgets import BudgetRule
from gateway.state.budgets_redis import RedisBudgetStore

USD = 1_000_000_000
CENTS_5 = USD // 20


async def spent_and_held(port: int, rule: BudgetRule) -> tuple[int, int]:
    client = Redis(host="127.0.0.1", port=port)
    try:
        [u] = await RedisBudgetStore(client).usage("any-team", [rule], datetime.now(UTC))
        return u.spent_nano, u.reserved_nano
    finally:
        await client.aclose()


async def test_first_requests_of_a_user_a_tag_and_a_session_admit_what_each_budget_covers(
        gateway: GatewayFactory, mock_reset: str, redis_port: int) -> None:
    team, tag = f"t{uuid.uuid4().hex[:8]}", f"tag{uuid.uuid4().hex[:8]}"
    extra = f"""
users:
  default: {{budgets: [{{period: daily, usd: 0.2}}]}}
tags:
  {tag}: {{budgets: [{{period: monthly, usd: 0.15}}]}}
sessions:
  default: {{budgets: [{{period: total, usd: 0.25}}]}}
"""
    server = gateway(policy(mock_reset, f"  {team}: {{}}") + extra,
                     env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "GATEWAY_MASTER_KEY": MASTER},
                     args=("--workers", "4"))
    _, secret = await new_key(redis_port, team)
    client = client_for(server, secret)
    user, session = f"u-{uuid.uuid4().hex[:8]}", f"s-{uuid.uuid4().hex[:8]}"
    cases = [({"x-gateway-user": user}, BudgetRule("user", user, "daily", USD // 5), 4),
             ({"x-gateway-tags": f"{tag},other"}, BudgetRule("tag", tag, "monthly", 3 * CENTS_5), 3),
             ({"x-gateway-session": session}, BudgetRule("session", session, "total", USD // 4), 5)]
    for headers, rule, fits in cases:
        before = await mock_calls(mock_reset)
        results = await asyncio.gather(*(ask(client, stream=i % 2 == 1, extra_headers=headers) for i in range(8)))
        ok = [r for r in results if r[0] == "ok"]
        refused = [r[1] for r in results if r[0] == "error"]
        assert len(ok) == fits, (rule, results)
        assert all(status == 429 and code == "budget_exceeded" for status, code, _ in refused)
        assert await mock_calls(mock_reset) - before == fits
        assert sum((r[1][0] if isinstance(r[1], tuple) else r[1]) for r in ok) == Decimal(fits) / 20
        assert await spent_and_held(redis_port, rule) == (fits * CENTS_5, 0)
    for section, name, spent in (("users", user, 4), ("tags", tag, 3), ("sessions", session, 5)):
        [view] = admin(server, "GET", f"/admin/{section}", params={"name": name}).json()["data"]
        assert view["budgets"][0]["spent_nano"] == spent * CENTS_5 and view["budgets"][0]["remaining_nano"] == 0
    assert admin(server, "GET", "/admin/tags").json()["data"][0]["name"] == tag
    await client.close()


async def test_the_spend_rate_brake_stops_a_tight_loop_within_its_minute(
        gateway: GatewayFactory, mock_reset: str, redis_port: int) -> None:
    team = f"t{uuid.uuid4().hex[:8]}"
    extra = """
sessions:
  default: {budgets: [{period: total, usd: 100}], max_usd_per_minute: 0.15}
"""
    server = gateway(policy(mock_reset, f"  {team}: {{}}") + extra,
                     env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}, args=("--workers", "4"))
    _, secret = await new_key(redis_port, team)
    client = client_for(server, secret)
    for _ in range(100):                       # stay inside one UTC minute (at most ~10 s)
        if server_time(redis_port) % 60 < 45:
            break
        await asyncio.sleep(0.1)
    session = f"agent-run-{uuid.uuid4().hex[:8]}"
    outcomes = []
    for _ in range(10):                        # an agent stuck in a loop
        result = await ask(client, extra_headers={"x-claude-code-session-id": session})
        outcomes.append(result[0] if result[0] == "ok" else result[1][:2])
    assert outcomes == ["ok"] * 3 + [(429, "budget_exceeded")] * 7
    total = BudgetRule("session", session, "total", 100 * USD)
    assert await spent_and_held(redis_port, total) == (3 * CENTS_5, 0)
    await client.close()
