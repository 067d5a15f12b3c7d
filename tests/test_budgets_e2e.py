"""Budgets, keys and rate limits end to end: gateway processes (several workers) on a private Redis,
the mock upstream counting calls, the official ``openai`` SDK as the client.

The priced model answers 10 completion tokens at $0.005 each (prompt free), so every request costs
exactly $0.05 and a $1 budget holds exactly 20 of them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from redis.asyncio import Redis, RedisCluster
from redis_fixtures import RedisProc, free_port, server_time

from conftest import GatewayFactory, Server
from gateway.state.budgets import BudgetRule
from gateway.state.budgets_redis import RedisBudgetStore
from gateway.state.keys import RedisKeyStore
from gateway.state.ledger import LedgerRecord, RedisLedger

pytestmark = pytest.mark.e2e   # starts gateway processes, the mock upstream and private redis-servers

USD = 1_000_000_000
CENTS_5 = USD // 20
MSG = [{"role": "user", "content": "hello there"}]


def policy(mock: str, teams: str) -> str:
    return f"""
models:
  pricey:
    deployments:
      - provider: openai
        name: pricey-mock
        model: mock-tokens10-chunks10
        api_base: {mock}/v1
        max_output_tokens: 10
        price: {{input_per_mtok: 0, output_per_mtok: 5000}}
  cheap:
    deployments:
      - provider: openai
        name: cheap-mock
        model: mock-tokens10-chunks10
        api_base: {mock}/v1
        price: {{input_per_mtok: 0, output_per_mtok: 0}}
teams:
{teams}
"""


def team_name() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


async def new_key(port: int, team: str, **kw: Any) -> tuple[str, str]:
    client = Redis(host="127.0.0.1", port=port)
    try:
        record, secret = await RedisKeyStore(client).create(team, "test", **kw)
        return record.id, secret
    finally:
        await client.aclose()


def client_for(server: Server, key: str) -> openai.AsyncOpenAI:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=30,
                              http_client=openai.DefaultAsyncHttpxClient(limits=limits))


async def ask(client: openai.AsyncOpenAI, stream: bool = False, model: str = "pricey",
              **extra: Any) -> tuple[str, Any]:
    """("ok", cost_usd as Decimal, raw response) or ("error", (status, code, headers))."""
    try:
        if stream:
            cost = None
            events = await client.chat.completions.create(model=model, messages=MSG, stream=True,
                                                          stream_options={"include_usage": True}, **extra)
            async for chunk in events:
                if chunk.usage is not None:
                    cost = Decimal(str(chunk.usage.model_extra["cost_usd"]))
            return "ok", cost
        raw = await client.chat.completions.with_raw_response.create(model=model, messages=MSG, **extra)
        reply = raw.parse()
        return "ok", (Decimal(str(reply.usage.model_extra["cost_usd"])), raw.headers)
    except openai.APIStatusError as exc:
        return "error", (exc.status_code, exc.code, exc.response.headers)


def cost_of(result: tuple[str, Any]) -> Decimal:
    value = result[1]
    return value[0] if isinstance(value, tuple) else value


async def mock_calls(mock: str) -> int:
    async with httpx.AsyncClient() as c:
        return int((await c.get(f"{mock}/_stats")).json()["total"])


async def budget_used(client: Any, team: str, scope: str, owner: str, limit: int) -> tuple[int, int]:
    [u] = await RedisBudgetStore(client).usage(team, [BudgetRule(scope, owner, "monthly", limit)],
                                               datetime.now(UTC))
    return u.spent_nano, u.reserved_nano


async def ledger_records(client: Any, since: float, team: str, expect: int,
                         timeout: float = 15.0) -> list[LedgerRecord]:
    """The team's ledger records, once ``expect`` of them are written (the writer batches every 0.2 s)."""
    ledger = RedisLedger(client)
    deadline = time.monotonic() + timeout
    while True:
        records = await ledger.read(since, team=team)
        if len(records) >= expect or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.1)


async def test_concurrent_burst_on_four_workers_never_overspends(
        gateway: GatewayFactory, mock_reset: str, redis_port: int) -> None:
    team = team_name()
    server = gateway(policy(mock_reset, f"  {team}: {{budgets: [{{period: monthly, usd: 1}}]}}"),
                     env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}, args=("--workers", "4"))
    _, secret = await new_key(redis_port, team)
    since = time.time() - 1
    client = client_for(server, secret)
    results = await asyncio.gather(*(ask(client, stream=i % 2 == 1) for i in range(200)))
    ok = [r for r in results if r[0] == "ok"]
    refused = [r[1] for r in results if r[0] == "error"]
    assert all(status == 429 and code == "budget_exceeded" for status, code, _ in refused), refused[:3]
    assert len(ok) == 20                                # each holds exactly its $0.05: no under-admission either
    assert await mock_calls(mock_reset) == len(ok)      # refusals never reached the upstream
    returned = sum(cost_of(r) for r in ok)
    assert returned == Decimal("1.00")
    rc = Redis(host="127.0.0.1", port=redis_port)
    try:
        assert await budget_used(rc, team, "team", team, USD) == (USD, 0)
        records = await ledger_records(rc, since, team, 200)
        assert len(records) == 200
        assert sum(r.cost_nano for r in records) == USD
        assert sorted(r.status for r in records) == ["budget_exceeded"] * 180 + ["ok"] * 20
    finally:
        await rc.aclose()
    await client.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_twenty_sequential_with_max_tokens_then_refused(
        gateway: GatewayFactory, mock_reset: str, redis_port: int, backend: str) -> None:
    team = "default" if backend == "memory" else team_name()
    env = {"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"} if backend == "redis" else {}
    server = gateway(policy(mock_reset, f"  {team}: {{budgets: [{{period: monthly, usd: 1}}]}}"), env=env)
    secret = (await new_key(redis_port, team))[1] if backend == "redis" else "anything"
    client = client_for(server, secret)
    remaining = []
    for i in range(20):
        result = await ask(client, stream=i % 4 == 3, max_tokens=256)
        assert result[0] == "ok", (i, result)
        assert cost_of(result) == Decimal("0.05")
        if isinstance(result[1], tuple):
            remaining.append(result[1][1]["x-gateway-budget-remaining-usd"])
    status, code, _ = (await ask(client, max_tokens=256))[1]
    assert (status, code) == (429, "budget_exceeded")
    assert remaining[0] == "0.95" and remaining[-1] == "0.05"
    async with httpx.AsyncClient() as c:
        sent = [r["body"] for r in (await c.get(f"{mock_reset}/_requests")).json()]
    # the last admitted request was held at the $0.05 left, so its output was capped to what that pays for
    assert [b.get("max_tokens") for b in sent][-1] == 10
    assert len(sent) == 20
    async with httpx.AsyncClient() as c:
        metrics = (await c.get(f"{server.url}/metrics")).text
    assert f'gateway_budget_limit_usd{{period="monthly",team="{team}"}} 1.0' in metrics
    assert f'gateway_budget_spent_usd{{period="monthly",team="{team}"}} 1.0' in metrics
    assert f'gateway_budget_rejections_total{{team="{team}"}} 1.0' in metrics
    await client.close()


async def test_key_budget_inside_team_budget(gateway: GatewayFactory, mock_reset: str, redis_port: int) -> None:
    team = team_name()
    server = gateway(policy(mock_reset, f"  {team}: {{budgets: [{{period: monthly, usd: 1}}]}}"),
                     env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"})
    small_id, small = await new_key(redis_port, team, budget_usd="0.10")
    _, big = await new_key(redis_port, team)
    small_client, big_client = client_for(server, small), client_for(server, big)
    assert [(await ask(small_client))[0] for _ in range(2)] == ["ok", "ok"]
    status, code, _ = (await ask(small_client))[1]
    assert (status, code) == (429, "budget_exceeded")
    big_results = [await ask(big_client) for _ in range(19)]
    assert [r[0] for r in big_results] == ["ok"] * 18 + ["error"]   # the team's $1: 2 + 18 requests
    rc = Redis(host="127.0.0.1", port=redis_port)
    try:
        assert await budget_used(rc, team, "key", small_id, USD // 10) == (USD // 10, 0)
        assert await budget_used(rc, team, "team", team, USD) == (USD, 0)
    finally:
        await rc.aclose()
    await small_client.close()
    await big_client.close()


async def test_downgrade_instead_of_refusal(gateway: GatewayFactory, mock_reset: str) -> None:
    teams = "  default: {budgets: [{period: monthly, usd: 0.1}], on_exceed: downgrade, downgrade_to: cheap}"
    server = gateway(policy(mock_reset, teams))
    client = client_for(server, "anything")
    first = [await ask(client) for _ in range(2)]
    assert [cost_of(r) for r in first] == [Decimal("0.05")] * 2
    assert first[0][1][1]["x-gateway-model"] == "pricey-mock"
    third = await ask(client)
    assert third[0] == "ok" and cost_of(third) == 0
    headers = third[1][1]
    assert (headers["x-gateway-route"], headers["x-gateway-model"]) == ("downgrade", "cheap-mock")
    await client.close()


async def test_downgrade_past_the_soft_threshold(gateway: GatewayFactory, mock_reset: str) -> None:
    teams = ("  default: {budgets: [{period: monthly, usd: 1}], soft_alert: 0.5, on_exceed: downgrade, "
             "downgrade_to: cheap}")
    server = gateway(policy(mock_reset, teams))
    client = client_for(server, "anything")
    results = [await ask(client) for _ in range(12)]
    models = [r[1][1]["x-gateway-model"] for r in results]
    assert models == ["pricey-mock"] * 10 + ["cheap-mock"] * 2       # $0.50 spent = half of $1: downgraded
    assert [r[1][1]["x-gateway-route"] for r in results[10:]] == ["downgrade"] * 2
    assert sum(cost_of(r) for r in results) == Decimal("0.50")
    assert results[-1][1][1]["x-gateway-budget-remaining-usd"] == "0.5"
    await client.close()


async def test_rpm_and_tpm_limits_under_concurrency(gateway: GatewayFactory, mock_reset: str,
                                                    redis_port: int) -> None:
    rpm_team, tpm_team = team_name(), team_name()
    teams = f"  {rpm_team}: {{rpm: 10}}\n  {tpm_team}: {{tpm: 100}}"
    server = gateway(policy(mock_reset, teams), env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"},
                     args=("--workers", "2"))
    if 60 - server_time(redis_port) % 60 < 8:       # keep the burst inside one rate window
        await asyncio.sleep(60 - server_time(redis_port) % 60 + 0.5)
    _, rpm_key = await new_key(redis_port, rpm_team)
    _, tpm_key = await new_key(redis_port, tpm_team)
    rpm_client, tpm_client = client_for(server, rpm_key), client_for(server, tpm_key)
    results = await asyncio.gather(*(ask(rpm_client, model="cheap") for _ in range(30)))
    ok = [r for r in results if r[0] == "ok"]
    refused = [r[1] for r in results if r[0] == "error"]
    assert len(ok) == 10
    assert all(s == 429 and c == "rate_limit_exceeded" and 1 <= int(h["retry-after"]) <= 60 for s, c, h in refused)
    assert refused[0][2]["x-ratelimit-limit-requests"] == "10"
    assert refused[0][2]["x-ratelimit-remaining-requests"] == "0"
    # TPM: each request is estimated at its prompt plus max_tokens=40 (about 50), then settled at ~20
    results = await asyncio.gather(*(ask(tpm_client, model="cheap", max_tokens=40) for _ in range(10)))
    ok = [r for r in results if r[0] == "ok"]
    assert 2 <= len(ok) <= 5
    assert all(r[1][:2] == (429, "rate_limit_exceeded") for r in results if r[0] == "error")
    assert ok[0][1][1]["x-ratelimit-limit-tokens"] == "100"
    await rpm_client.close()
    await tpm_client.close()


async def test_revocation_is_seen_by_every_worker(gateway: GatewayFactory, mock_reset: str,
                                                  redis_port: int) -> None:
    team = team_name()
    server = gateway(policy(mock_reset, f"  {team}: {{}}"),
                     env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}, args=("--workers", "4"))
    key_id, secret = await new_key(redis_port, team)
    client = client_for(server, secret)
    before = await asyncio.gather(*(ask(client, model="cheap") for _ in range(40)))
    assert all(r[0] == "ok" for r in before)
    rc = Redis(host="127.0.0.1", port=redis_port)
    try:
        assert await RedisKeyStore(rc).revoke(key_id)
    finally:
        await rc.aclose()
    await asyncio.sleep(2.5)                         # GATEWAY_KEY_CACHE_TTL_S defaults to 2 s
    after = await asyncio.gather(*(ask(client, model="cheap") for _ in range(40)))
    assert all(r[0] == "error" and r[1][:2] == (401, "invalid_api_key") for r in after)
    await client.close()


async def warm_every_worker(server: Server, secret: str, workers: int, tries: int = 200) -> int:
    """Send free requests, each on a new connection, until every worker has answered one (so each has the key
    in its cache: while Redis is down a worker can vouch only for keys it has seen). A worker is told apart by
    its request ids' per-process prefix (``req_`` + 12 hex digits). Returns how many requests were sent."""
    seen: set[str] = set()
    sent = 0
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
        while len(seen) < workers and sent < tries:
            reply = await c.post("/v1/chat/completions", json={"model": "cheap", "messages": MSG},
                                 headers={"authorization": f"Bearer {secret}", "connection": "close"})
            assert reply.status_code == 200, reply.text
            seen.add(reply.headers["x-request-id"][:16])
            sent += 1
    assert len(seen) == workers, f"only {len(seen)} of {workers} workers answered {sent} new connections"
    return sent


async def until(condition: Callable[[], bool], what: str, timeout: float = 300.0) -> None:
    """Wait for progress, not for time: poll ``condition`` (``timeout`` only guards against a hang)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.02)


async def test_redis_restart_mid_load_loses_no_record(gateway: GatewayFactory, mock_reset: str,
                                                      tmp_path: Path) -> None:
    port = free_port()
    rdir = tmp_path / "redis"
    redis_proc = RedisProc(port, rdir, "--appendonly", "yes", "--appendfsync", "always")
    team = team_name()
    try:
        server = gateway(policy(mock_reset, f"  {team}: {{budgets: [{{period: monthly, usd: 1000}}]}}"),
                         env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{port}/0", "GATEWAY_REDIS_FAIL_MODE": "allow",
                              "GATEWAY_KEY_CACHE_TTL_S": "1"}, args=("--workers", "2"))
        _, secret = await new_key(port, team)
        rc = Redis(host="127.0.0.1", port=port)
        try:   # the free warm-up requests are in the ledger before ``since``: the load's records come after it
            warm_since = time.time() - 1
            await ledger_records(rc, warm_since, team, await warm_every_worker(server, secret, workers=2))
        finally:
            await rc.aclose()
        since = time.time()
        client = client_for(server, secret)
        results: list[tuple[str, Any]] = []
        finished: list[float] = []
        outage: list[float] = []

        async def load(n: int) -> None:
            for i in range(n):
                results.append(await ask(client, stream=i % 3 == 0))
                finished.append(time.monotonic())
                await asyncio.sleep(0.01)

        def answered_in_outage() -> int:
            return sum(t > outage[0] + 0.2 for t in finished)

        async def restart() -> None:
            # Driven by the load's progress, not by the clock, so a slow machine only makes it slower.
            await until(lambda: len(finished) >= 8, "the load to start")
            redis_proc.stop()
            outage.append(time.monotonic())
            await asyncio.sleep(1.5)   # longer than the key cache's TTL: the workers serve expired entries
            await until(lambda: answered_in_outage() >= 5 or len(finished) == 240, "answers while Redis is down")
            outage.append(time.monotonic())
            redis_proc.__init__(port, rdir, "--appendonly", "yes", "--appendfsync", "always")  # type: ignore[misc]

        await asyncio.gather(*(load(60) for _ in range(4)), restart())
        ok = [r for r in results if r[0] == "ok"]
        failed = [r[1][:2] for r in results if r[0] != "ok"]
        assert len(ok) == len(results) == 240, failed[:5]   # fail mode "allow": admitted throughout
        # the load really ran through the outage: requests were answered while Redis was down
        assert sum(outage[0] + 0.2 < t < outage[1] for t in finished) >= 5, (outage, finished[:3], finished[-3:])
        assert "unmetered, settling later" in server.output()
        rc = Redis(host="127.0.0.1", port=port)
        try:
            records = await ledger_records(rc, since, team, 240)
            assert len(records) == 240
            total = sum(r.cost_nano for r in records)
            assert total == 240 * CENTS_5 == int(sum(cost_of(r) for r in ok) * USD)
            deadline = time.monotonic() + 15                  # queued settles replay within a flush or two
            while (used := await budget_used(rc, team, "team", team, 1000 * USD)) != (total, 0):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert used == (total, 0)                         # queued settles were replayed
        finally:
            await rc.aclose()
        await client.close()
    finally:
        redis_proc.stop()


async def test_fail_mode_refuse_answers_503_while_redis_is_down(gateway: GatewayFactory, mock_reset: str,
                                                                tmp_path: Path) -> None:
    port = free_port()
    redis_proc = RedisProc(port, tmp_path / "redis")
    try:
        server = gateway(policy(mock_reset, "  default: {budgets: [{period: monthly, usd: 10}]}"),
                         env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
        client = client_for(server, "anything")
        assert (await ask(client))[0] == "ok"
        redis_proc.stop()
        status, code, _ = (await ask(client))[1]
        assert (status, code) == (503, "state_unavailable")
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"{server.url}/health/ready")).status_code == 503
        redis_proc = RedisProc(port, tmp_path / "redis")
        assert (await ask(client))[0] == "ok"
        await client.close()
    finally:
        redis_proc.stop()


async def test_redis_cluster_path(gateway: GatewayFactory, mock_reset: str, redis_cluster_ports: list[int]) -> None:
    team = team_name()
    url = f"redis://127.0.0.1:{redis_cluster_ports[0]}/0"
    server = gateway(policy(mock_reset, f"  {team}: {{budgets: [{{period: monthly, usd: 1}}]}}"),
                     env={"GATEWAY_REDIS_URL": url, "GATEWAY_REDIS_CLUSTER": "1"}, args=("--workers", "2"))
    rc = RedisCluster(host="127.0.0.1", port=redis_cluster_ports[0])
    try:
        _, secret = await RedisKeyStore(rc).create(team, "test")
        since = time.time() - 1
        client = client_for(server, secret)
        results = await asyncio.gather(*(ask(client, stream=i % 2 == 0) for i in range(30)))
        assert [r[0] for r in results].count("ok") == 20
        assert await budget_used(rc, team, "team", team, USD) == (USD, 0)
        records = await ledger_records(rc, since, team, 30)
        assert len(records) == 30 and sum(r.cost_nano for r in records) == USD
        await client.close()
    finally:
        await rc.aclose()


async def test_failures_release_their_hold_and_cut_streams_pay_for_what_was_delivered(
        gateway: GatewayFactory, mock_reset: str) -> None:
    price = "price: {input_per_mtok: 0, output_per_mtok: 5000}"
    base = f'api_base: "{mock_reset}/v1"'
    extra = f"""
  failing:
    deployments:
      - {{provider: openai, model: mock-status500, {base}, {price}}}
  cut:
    deployments:
      - {{provider: openai, model: mock-cut5-chunks10, {base}, {price}}}
  fallback:
    deployments:
      - {{provider: openai, name: down, model: mock-status503, {base}, weight: 1,
         price: {{input_per_mtok: 0, output_per_mtok: 9000}}}}
      - {{provider: openai, name: up, model: mock-tokens10, {base}, weight: 0, {price}}}
"""
    text = policy(mock_reset, "  default: {budgets: [{period: daily, usd: 1}]}").replace("teams:", extra + "teams:")
    server = gateway(text)
    client = client_for(server, "anything")

    async def spent() -> str:
        async with httpx.AsyncClient() as c:
            for line in (await c.get(f"{server.url}/metrics")).text.splitlines():
                if line.startswith('gateway_budget_spent_usd{period="daily",team="default"}'):
                    return line.split()[-1]
        return "absent"

    status, code, _ = (await ask(client, model="failing"))[1]
    assert (status, code) == (502, "upstream_error")
    assert (await ask(client, model="failing", stream=True))[0] == "error"
    assert await spent() == "0.0"                       # nothing billed, the holds released
    # a stream cut after 5 chunks is charged for the 5 tokens delivered: 5 x $0.005
    events = await client.chat.completions.create(model="cut", messages=MSG, stream=True,
                                                  stream_options={"include_usage": True})
    costs = []
    with pytest.raises(openai.APIError):
        async for chunk in events:
            if chunk.usage is not None:
                costs.append(Decimal(str(chunk.usage.model_extra["cost_usd"])))
    assert costs == [Decimal("0.025")]
    assert await spent() == "0.025"
    # a fallback pays the deployment that answered, not the one that failed
    result = await ask(client, model="fallback")
    assert result[0] == "ok" and cost_of(result) == Decimal("0.05")
    assert result[1][1]["x-gateway-model"] == "up"
    assert result[1][1]["x-gateway-budget-remaining-usd"] == "0.925"
    assert await spent() == "0.075"
    await client.close()


async def test_downgrade_on_redis_when_the_budget_cannot_cover_the_request(
        gateway: GatewayFactory, mock_reset: str, redis_port: int) -> None:
    """No soft path (soft_alert 1.0): the team is downgraded only once the rest of its $0.12 cannot cover
    a $0.05 request on the priced model; every record and header shows what was served and what it cost."""
    team = team_name()
    teams = (f"  {team}: {{budgets: [{{period: monthly, usd: 0.12}}], soft_alert: 1.0, on_exceed: downgrade, "
             "downgrade_to: cheap}")
    server = gateway(policy(mock_reset, teams), env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"})
    key_id, secret = await new_key(redis_port, team)
    since = time.time() - 1
    client = client_for(server, secret)
    results = [await ask(client) for _ in range(4)]
    assert [r[0] for r in results] == ["ok"] * 4
    headers = [r[1][1] for r in results]
    assert [cost_of(r) for r in results] == [Decimal("0.05"), Decimal("0.05"), Decimal(0), Decimal(0)]
    assert [(h["x-gateway-route"], h["x-gateway-model"]) for h in headers] == \
        [("default", "pricey-mock")] * 2 + [("downgrade", "cheap-mock")] * 2
    assert [h["x-gateway-budget-remaining-usd"] for h in headers] == ["0.07", "0.02", "0.02", "0.02"]
    assert [Decimal(h["x-gateway-cost-usd"]) for h in headers] == [cost_of(r) for r in results]
    assert await mock_calls(mock_reset) == 4
    rc = Redis(host="127.0.0.1", port=redis_port)
    try:
        assert await budget_used(rc, team, "team", team, 12 * USD // 100) == (2 * CENTS_5, 0)
        records = sorted(await ledger_records(rc, since, team, 4), key=lambda r: r.ts)
        assert len(records) == 4
        assert [(r.route, r.requested_model, r.model, r.deployment, r.key_id, r.status) for r in records] == \
            [("default", "pricey", "pricey", "pricey-mock", key_id, "ok")] * 2 + \
            [("downgrade", "pricey", "cheap", "cheap-mock", key_id, "ok")] * 2
        assert [(r.output_tokens, r.cost_nano, r.baseline_nano) for r in records] == \
            [(10, CENTS_5, CENTS_5)] * 2 + [(10, 0, CENTS_5)] * 2   # baseline: the model asked for
        assert [r.savings.get("routing", 0) for r in records] == [0, 0, CENTS_5, CENTS_5]
    finally:
        await rc.aclose()
    await client.close()


async def test_key_rpm_inside_a_team_without_limits(gateway: GatewayFactory, mock_reset: str,
                                                    redis_port: int) -> None:
    team = team_name()
    server = gateway(policy(mock_reset, f"  {team}: {{}}"),
                     env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"})
    if 60 - server_time(redis_port) % 60 < 8:       # keep the requests inside one rate window
        await asyncio.sleep(60 - server_time(redis_port) % 60 + 0.5)
    _, limited = await new_key(redis_port, team, rpm=3)
    _, free = await new_key(redis_port, team)
    limited_client, free_client = client_for(server, limited), client_for(server, free)
    results = [await ask(limited_client, model="cheap") for _ in range(4)]
    assert [r[0] for r in results] == ["ok"] * 3 + ["error"]
    assert [r[1][1]["x-ratelimit-remaining-requests"] for r in results[:3]] == ["2", "1", "0"]
    assert all(r[1][1]["x-ratelimit-limit-requests"] == "3" for r in results[:3])
    status, code, headers = results[3][1]
    assert (status, code) == (429, "rate_limit_exceeded")
    assert 1 <= int(headers["retry-after"]) <= 60
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("3", "0")
    assert await mock_calls(mock_reset) == 3           # the refusal never reached the upstream
    # the limit is the key's: another key of the same team is not limited
    others = [await ask(free_client, model="cheap") for _ in range(5)]
    assert [r[0] for r in others] == ["ok"] * 5
    assert "x-ratelimit-limit-requests" not in others[0][1][1]
    await limited_client.close()
    await free_client.close()
