"""End-user, tag and session budgets on the 3-master Redis Cluster: a budget shared by teams whose keys
live on other masters is reserved in two phases across slots with compensation, and stays exact.

Eight concurrent first requests of one end user from teams on different masters admit exactly what the
user's budget covers; a refusal in the team's slot gives the user's hold back at once; a request whose
replica dies between the phases leaves only holds that expire with the reservation TTL.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from redis.asyncio import RedisCluster
from redis.crc import key_slot
from redis_fixtures import teams_on_masters

from gateway.state.budgets import BudgetRule, RateRule, ReserveRequest
from gateway.state.budgets_redis import RedisBudgetStore, home_tag, rate_key, team_tag

USD = 1_000_000_000
CENTS_5 = USD // 20


def req(team: str, cost: int, budgets: tuple[BudgetRule, ...], rates: tuple[RateRule, ...] = (),
        partial: bool = True) -> ReserveRequest:
    return ReserveRequest(uuid.uuid4().hex, team, cost, 10, budgets, rates, datetime.now(UTC), 0, partial)


async def test_a_user_budget_across_slots_admits_exactly_what_it_covers(redis_cluster_ports: list[int]) -> None:
    cluster = RedisCluster(host="127.0.0.1", port=redis_cluster_ports[0])
    store = RedisBudgetStore(cluster)
    try:
        await cluster.initialize()
        user = f"u-{uuid.uuid4().hex[:8]}"
        user_rule = BudgetRule("user", user, "daily", USD // 5)      # $0.20: four $0.05 requests
        teams = teams_on_masters(cluster, 2, avoid=home_tag("", "user", user))
        assert key_slot(team_tag(teams[0]).encode()) != key_slot(home_tag("", "user", user).encode())

        async def one(i: int) -> int:
            team = teams[i % 2]
            r = req(team, CENTS_5, (BudgetRule("team", team, "daily", USD), user_rule))
            adm = await store.reserve(r)
            if not adm.admitted:
                assert adm.refusal is not None and adm.refusal.scope == "user"
                return 0
            await asyncio.sleep(0.01)
            await store.settle(r, CENTS_5, 10)
            return 1

        assert sum(await asyncio.gather(*(one(i) for i in range(8)))) == 4
        [u] = await store.usage(teams[0], [user_rule], datetime.now(UTC))
        assert (u.spent_nano, u.reserved_nano) == (USD // 5, 0)
        spent = [(await store.usage(t, [BudgetRule("team", t, "daily", USD)], datetime.now(UTC)))[0].spent_nano
                 for t in teams]
        assert sum(spent) == USD // 5                                # each team paid for its own requests

        # the team's slot refuses after the user's held: the user's hold is given back at once
        poor = BudgetRule("team", teams[0], "monthly", 0)
        tag_rule = BudgetRule("tag", f"tag-{uuid.uuid4().hex[:6]}", "monthly", USD)
        refused = await store.reserve(req(teams[0], CENTS_5, (tag_rule, poor), partial=False))
        assert refused.refusal is not None and refused.refusal.scope == "team"
        [t] = await store.usage(teams[0], [tag_rule], datetime.now(UTC))
        assert (t.spent_nano, t.reserved_nano) == (0, 0)
        # a settle replayed after a partial failure counts once in every slot
        session_rule = BudgetRule("session", f"s-{uuid.uuid4().hex[:6]}", "total", USD)
        r = req(teams[1], CENTS_5, (session_rule, BudgetRule("team", teams[1], "daily", USD)))
        assert (await store.reserve(r)).admitted
        await store.settle(r, CENTS_5, 10)
        await store.settle(r, CENTS_5, 10)
        [s] = await store.usage(teams[1], [session_rule], datetime.now(UTC))
        assert (s.spent_nano, s.reserved_nano) == (CENTS_5, 0)
    finally:
        await store.aclose()


async def test_a_replica_dying_between_the_phases_leaves_holds_that_expire(redis_cluster_ports: list[int]) -> None:
    cluster = RedisCluster(host="127.0.0.1", port=redis_cluster_ports[0])
    store = RedisBudgetStore(cluster, reservation_ttl_s=1)
    try:
        await cluster.initialize()
        session = f"s-{uuid.uuid4().hex[:8]}"
        [team] = teams_on_masters(cluster, 1, avoid=home_tag("", "session", session))
        rule = BudgetRule("session", session, "total", CENTS_5)
        adm = await store.reserve(req(team, CENTS_5, (rule, BudgetRule("team", team, "daily", USD))))
        assert adm.admitted and adm.reserved_nano == CENTS_5           # never settled: its replica "died"
        assert not (await store.reserve(req(team, CENTS_5, (rule,), partial=False))).admitted
        await asyncio.sleep(1.3)
        [u] = await store.usage(team, [rule], datetime.now(UTC))
        assert (u.spent_nano, u.reserved_nano) == (0, 0)
        assert (await store.reserve(req(team, CENTS_5, (rule,)))).admitted
    finally:
        await store.aclose()


async def test_four_workers_on_the_cluster_hold_a_user_budget_spanning_two_teams(
        gateway, mock_reset: str, redis_cluster_ports: list[int]) -> None:  # type: ignore[no-untyped-def]
    from test_budgets_e2e import ask, client_for, policy

    from gateway.state.keys import RedisKeyStore

    cluster = RedisCluster(host="127.0.0.1", port=redis_cluster_ports[0])
    try:
        await cluster.initialize()
        user = f"u-{uuid.uuid4().hex[:8]}"
        teams = teams_on_masters(cluster, 2, avoid=home_tag("", "user", user))
        text = policy(mock_reset, "".join(f"  {t}: {{budgets: [{{period: monthly, usd: 1}}]}}\n" for t in teams))
        text += "users:\n  default: {budgets: [{period: daily, usd: 0.3}]}\n"
        server = gateway(text, env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_cluster_ports[0]}/0",
                                    "GATEWAY_REDIS_CLUSTER": "1"}, args=("--workers", "4"))
        clients = [client_for(server, (await RedisKeyStore(cluster).create(t, "test"))[1]) for t in teams]
        results = await asyncio.gather(*(ask(clients[i % 2], stream=i % 3 == 0, extra_headers={"x-gateway-user": user})
                                         for i in range(16)))
        assert [r[0] for r in results].count("ok") == 6                 # $0.30 of $0.05 requests, across teams
        assert all(r[1][:2] == (429, "budget_exceeded") for r in results if r[0] == "error")
        [u] = await RedisBudgetStore(cluster).usage("x", [BudgetRule("user", user, "daily", 3 * USD // 10)],
                                                    datetime.now(UTC))
        assert (u.spent_nano, u.reserved_nano) == (3 * USD // 10, 0)
        team_spent = 0
        for t in teams:
            [tu] = await RedisBudgetStore(cluster).usage(t, [BudgetRule("team", t, "monthly", USD)], datetime.now(UTC))
            assert tu.reserved_nano == 0
            team_spent += tu.spent_nano
        assert team_spent == 3 * USD // 10
        for c in clients:
            await c.close()
    finally:
        await cluster.aclose()


async def _refused_later_slot_round(store: RedisBudgetStore, cluster: RedisCluster) -> tuple[int, int, list[int]]:
    """One admitted request, three refused by the team's slot after the user's slot counted them, one more
    admitted; returns the user window's minute at the start and at the end, and its (requests, tokens) after
    the refusals and at the end."""
    user = f"u-{uuid.uuid4().hex[:8]}"
    [team] = teams_on_masters(cluster, 1, avoid=home_tag("", "user", user))
    window = rate_key(team, "user", user)
    rate = RateRule("user", user, 3, 1_000)                        # 3 requests a minute
    paying, poor = BudgetRule("team", team, "daily", USD), BudgetRule("team", team, "monthly", 0)
    assert (await store.reserve(req(team, CENTS_5, (paying,), (rate,)))).admitted
    start = int(await cluster.hget(window, "w") or -1)
    for _ in range(3):                                             # the user's slot counts it, the team's refuses
        refused = await store.reserve(req(team, CENTS_5, (poor,), (rate,), partial=False))
        assert refused.refusal is not None and refused.refusal.scope == "team"
    after = [int(x or 0) for x in await cluster.hmget(window, ["r", "t"])]
    assert (await store.reserve(req(team, CENTS_5, (paying,), (rate,)))).admitted
    end = int(await cluster.hget(window, "w") or -2)
    final = [int(x or 0) for x in await cluster.hmget(window, ["r", "t"])]
    return start, end, after + final


async def test_a_refusal_in_a_later_slot_gives_back_the_rate_counts_of_earlier_ones(
        redis_cluster_ports: list[int]) -> None:
    """Issue 14: the compensation of a two-phase reserve also gives back the RPM and TPM counts the earlier
    slots took, so refused requests use up no rate allowance (as on one Redis, where a refusal counts nothing)."""
    cluster = RedisCluster(host="127.0.0.1", port=redis_cluster_ports[0])
    store = RedisBudgetStore(cluster)
    try:
        await cluster.initialize()
        for _ in range(3):   # a round that straddles a minute boundary is run again (bounded)
            start, end, counts = await _refused_later_slot_round(store, cluster)
            if start == end:
                break
        assert start == end
        assert counts == [1, 10, 2, 20]          # only the two admitted requests (10 estimated tokens each)
    finally:
        await store.aclose()
