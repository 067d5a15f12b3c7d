"""Budget holds belong to the gateway: a client's ``x-request-id`` never reuses another request's
hold, and a hold outlives its reservation TTL while its request is still running (renewed), so a
long stream cannot let other requests past the budget. Real gateway processes, the mock upstream,
a private Redis, the ``openai`` SDK.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import openai
import pytest
from redis.asyncio import Redis
from test_budgets_e2e import CENTS_5, MSG, ask, client_for, cost_of, new_key, policy, team_name

from conftest import GatewayFactory
from gateway.state.budgets import BudgetRule, ReserveRequest
from gateway.state.budgets_memory import MemoryBudgetStore
from gateway.state.budgets_redis import RedisBudgetStore

pytestmark = pytest.mark.e2e   # starts gateway processes on the mock upstream and a private redis-server

SLOW = """
  slow:
    deployments:
      - provider: openai
        name: slow-mock
        model: mock-chunks10-delay400
        api_base: {mock}/v1
        max_output_tokens: 10
        price: {{input_per_mtok: 0, output_per_mtok: 5000}}
"""


def setup(backend: str, redis_port: int, team_yaml: str) -> tuple[str, dict[str, str]]:
    team = "default" if backend == "memory" else team_name()
    env = {"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"} if backend == "redis" else {}
    return team, env | {"TEAM": f"  {team}: {team_yaml}"}


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_repeated_client_request_id_never_rides_on_another_hold(
        gateway: GatewayFactory, mock_reset: str, redis_port: int, backend: str) -> None:
    team, env = setup(backend, redis_port, "{budgets: [{period: monthly, usd: 1}], rpm: 1000}")
    server = gateway(policy(mock_reset, env.pop("TEAM")), env=env)
    secret = (await new_key(redis_port, team))[1] if backend == "redis" else "anything"
    client = client_for(server, secret).with_options(default_headers={"x-request-id": "same-id-every-time"})
    # half of them at once (holds alive together), then the rest one after another
    burst = await asyncio.gather(*(ask(client) for _ in range(12)))
    rest = [await ask(client, stream=i % 2 == 1) for i in range(13)]
    results = burst + rest
    ok = [r for r in results if r[0] == "ok"]
    refused = [r[1][:2] for r in results if r[0] == "error"]
    assert len(ok) == 20 and sum(cost_of(r) for r in ok) == Decimal("1.00")
    assert refused == [(429, "budget_exceeded")] * 5
    raw = await client.chat.completions.with_raw_response.create(model="cheap", messages=MSG)
    assert raw.headers["x-request-id"] == "same-id-every-time"   # still echoed for tracing
    async with httpx.AsyncClient() as c:
        metrics = (await c.get(f"{server.url}/metrics")).text
        sent = (await c.get(f"{mock_reset}/_stats")).json()["total"]
    assert f'gateway_budget_spent_usd{{period="monthly",team="{team}"}} 1.0' in metrics
    assert sent == 21   # the twenty admitted and the free one; no refusal reached the upstream
    await client.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_long_stream_keeps_its_hold_past_the_reservation_ttl(
        gateway: GatewayFactory, mock_reset: str, redis_port: int, backend: str) -> None:
    """The budget fits one request's worst case ($0.05). A stream of 10 chunks 0.4 s apart runs
    about 4 s against a 1.2 s reservation TTL: the hold is renewed, so a request made after 2.5 s is
    still refused and settled spend ends at exactly the limit (a lapsed hold would let it in)."""
    team, env = setup(backend, redis_port, "{budgets: [{period: monthly, usd: 0.05}]}")
    policy_text = policy(mock_reset, env.pop("TEAM")).replace("teams:", SLOW.format(mock=mock_reset) + "teams:")
    server = gateway(policy_text, env=env | {"GATEWAY_RESERVATION_TTL_S": "1.2"})
    secret = (await new_key(redis_port, team))[1] if backend == "redis" else "anything"
    client = client_for(server, secret)

    async def late() -> tuple[str, object]:
        await asyncio.sleep(2.5)
        return await ask(client, model="pricey")

    long_stream, late_result = await asyncio.gather(ask(client, stream=True, model="slow"), late())
    assert long_stream == ("ok", Decimal("0.05"))
    assert late_result[0] == "error" and late_result[1][:2] == (429, "budget_exceeded")
    async with httpx.AsyncClient() as c:
        metrics = (await c.get(f"{server.url}/metrics")).text
    assert f'gateway_budget_spent_usd{{period="monthly",team="{team}"}} 0.05' in metrics
    with pytest.raises(openai.RateLimitError):   # and the budget stays spent
        await client.chat.completions.create(model="pricey", messages=MSG)
    await client.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_renew_extends_a_live_hold_and_not_a_settled_one(redis_port: int, backend: str) -> None:
    clock = [1_000_000.0]
    client = Redis(host="127.0.0.1", port=redis_port) if backend == "redis" else None
    store = (RedisBudgetStore(client, reservation_ttl_s=1.0) if client is not None
             else MemoryBudgetStore(1.0, clock=lambda: clock[0]))
    team = team_name()
    rule = BudgetRule("team", team, "monthly", CENTS_5)

    def req(rid: str) -> ReserveRequest:
        return ReserveRequest(rid, team, CENTS_5, 10, (rule,), (), datetime.now(UTC))

    async def later(seconds: float) -> None:
        if client is None:
            clock[0] += seconds
        else:
            await asyncio.sleep(seconds)

    assert (await store.reserve(req("a"))).admitted
    for _ in range(3):                       # 3 x 0.6 s: past the 1 s TTL, renewed each time
        await later(0.6)
        assert await store.renew(req("a"))
    assert not (await store.reserve(req("b"))).admitted           # the hold is still there
    [usage] = await store.usage(team, [rule], datetime.now(UTC))
    assert (usage.spent_nano, usage.reserved_nano) == (0, CENTS_5)
    await store.settle(req("a"), CENTS_5, 10)
    assert not await store.renew(req("a"))                       # settled: nothing to renew
    assert (await store.reserve(req("c"))).admitted is False     # and the budget is spent
    assert (await store.reserve(req("d"))).refusal is not None
    await later(1.5)
    assert not await store.renew(req("d"))                       # never held
    if client is not None:
        await client.aclose()
