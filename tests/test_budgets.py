"""Budget reservation and rate limits: period helpers, both stores (memory and a private Redis), many
processes against one Redis, and a private 3-master Redis Cluster."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING

import pytest
import redis
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from gateway.state.budgets import (
    Admission,
    BudgetRule,
    BudgetStore,
    RateRule,
    ReserveRequest,
    StateUnavailable,
    period_end,
    period_id,
    period_start,
)
from gateway.state.budgets_redis import SCRIPT, SCRIPT_VERSION, RedisBudgetStore, bucket_keys, team_tag

if TYPE_CHECKING:
    from redis_fixtures import Harness

USD = 1_000_000_000
CENTS_5 = USD // 20
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def team_name() -> str:
    return f"team-{uuid.uuid4().hex[:10]}"


def req(team: str, cost: int, budgets: tuple[BudgetRule, ...] = (), rates: tuple[RateRule, ...] = (),
        tokens: int = 100, now: datetime = NOW, rid: str | None = None) -> ReserveRequest:
    return ReserveRequest(rid or uuid.uuid4().hex, team, cost, tokens, budgets, rates, now)


async def used(store: BudgetStore, team: str, rule: BudgetRule, now: datetime = NOW) -> tuple[int, int]:
    [u] = await store.usage(team, [rule], now)
    return u.spent_nano, u.reserved_nano


# --- period helpers ---------------------------------------------------------------------------

def test_period_ids_and_boundaries() -> None:
    assert [period_id(p, NOW) for p in ("daily", "weekly", "monthly")] == ["d20261123", "w2026-48", "m202611"]
    eve = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)
    new_year = datetime(2027, 1, 1, 0, 0, 0, tzinfo=UTC)
    assert period_id("daily", eve) == "d20261231" and period_id("daily", new_year) == "d20270101"
    assert period_end("daily", eve) == new_year == period_start("daily", new_year)
    assert period_id("monthly", eve) == "m202612" and period_id("monthly", new_year) == "m202701"
    assert period_start("monthly", eve) == datetime(2026, 12, 1, tzinfo=UTC)
    assert period_end("monthly", eve) == new_year
    assert period_end("monthly", datetime(2027, 2, 14, tzinfo=UTC)) == datetime(2027, 3, 1, tzinfo=UTC)
    # ISO weeks start Monday 00:00 UTC; 1 Jan 2027 (a Friday) still belongs to week 53 of 2026
    assert period_id("weekly", eve) == period_id("weekly", new_year) == "w2026-53"
    assert period_start("weekly", new_year) == datetime(2026, 12, 28, tzinfo=UTC)
    assert period_end("weekly", new_year) == datetime(2027, 1, 4, tzinfo=UTC)
    assert period_id("weekly", datetime(2027, 1, 3, 23, 59, tzinfo=UTC)) == "w2026-53"
    assert period_id("weekly", datetime(2027, 1, 4, tzinfo=UTC)) == "w2027-01"
    assert period_id("weekly", datetime(2024, 12, 30, tzinfo=UTC)) == "w2025-01"  # ISO year != calendar year
    # naive datetimes are UTC; aware ones are converted to UTC first
    assert period_id("daily", datetime(2026, 11, 23, 0, 30)) == "d20261123"
    plus2 = timezone(timedelta(hours=2))
    assert period_id("daily", datetime(2027, 1, 1, 1, 0, tzinfo=plus2)) == "d20261231"
    assert period_id("monthly", datetime(2027, 1, 1, 1, 0, tzinfo=plus2)) == "m202612"


# --- budgets, both stores ---------------------------------------------------------------------

async def test_twenty_sequential_requests_fill_a_dollar_exactly(h: Harness) -> None:
    store, team = h.make(), team_name()
    rule = BudgetRule("team", team, "daily", USD)
    for i in range(20):
        r = req(team, 30 * USD // 100, (rule,))
        adm = await store.reserve(r)
        assert adm.admitted, (i, adm)
        # worst case $0.30, held in full while it fits, then capped at the headroom (partial mode)
        assert adm.reserved_nano == min(30 * USD // 100, USD - i * CENTS_5)
        assert adm.remaining_nano == USD - i * CENTS_5 - adm.reserved_nano
        await store.settle(r, CENTS_5, 50)
    adm = await store.reserve(req(team, 30 * USD // 100, (rule,)))
    assert not adm.admitted and adm.refusal is not None
    assert (adm.refusal.kind, adm.refusal.scope, adm.refusal.owner, adm.refusal.period) == ("budget", "team", team,
                                                                                            "daily")
    assert (adm.refusal.limit, adm.refusal.used, adm.refusal.retry_after_s) == (USD, USD, None)
    assert adm.remaining_nano == 0 and adm.reserved_nano == 0
    assert await used(store, team, rule) == (USD, 0)
    [u] = await store.usage(team, [rule], NOW)
    assert (u.period_id, u.limit_nano, u.remaining_nano) == ("d20261123", USD, 0)


async def test_partial_hold_needs_the_least_useful_cost(h: Harness) -> None:
    """A headroom smaller than min_cost_nano (prompt plus one output token) refuses instead of a useless hold."""
    store, team = h.make(), team_name()
    rule = BudgetRule("team", team, "daily", USD)
    first = req(team, 98 * USD // 100, (rule,))
    assert (await store.reserve(first)).admitted
    await store.settle(first, 98 * USD // 100, 10)                      # $0.02 left
    tight = ReserveRequest(uuid.uuid4().hex, team, 30 * USD // 100, 100, (rule,), (), NOW, 3 * USD // 100)
    adm = await store.reserve(tight)
    assert not adm.admitted and adm.refusal is not None and adm.refusal.kind == "budget"
    fits = ReserveRequest(uuid.uuid4().hex, team, 30 * USD // 100, 100, (rule,), (), NOW, 2 * USD // 100)
    adm = await store.reserve(fits)
    assert adm.admitted and adm.reserved_nano == 2 * USD // 100 and adm.remaining_nano == 0


async def test_strict_mode_needs_the_whole_worst_case(h: Harness) -> None:
    store, team = h.make(partial=False), team_name()
    rule = BudgetRule("team", team, "daily", USD)
    admitted = 0
    for _ in range(20):
        r = req(team, 30 * USD // 100, (rule,))
        adm = await store.reserve(r)
        if not adm.admitted:
            assert adm.refusal is not None and adm.refusal.used == 15 * CENTS_5
            break
        admitted += 1
        await store.settle(r, CENTS_5, 50)
    assert admitted == 15  # $0.75 spent: a $0.30 worst case no longer fits the $0.25 left
    for _ in range(5):  # smaller worst cases still use the rest, to the last nano
        r = req(team, CENTS_5, (rule,))
        assert (await store.reserve(r)).admitted
        await store.settle(r, CENTS_5, 50)
    assert await used(store, team, rule) == (USD, 0)
    assert not (await store.reserve(req(team, 1, (rule,)))).admitted
    assert (await store.reserve(req(team, 0, (rule,)))).admitted  # free requests still fit an exhausted budget


@pytest.mark.parametrize("partial", [True, False])
async def test_team_and_key_budgets_tighter_one_refuses(h: Harness, partial: bool) -> None:
    store, team, key = h.make(partial=partial), team_name(), "key_" + uuid.uuid4().hex[:6]
    team_rule = BudgetRule("team", team, "daily", 12 * USD // 100)
    key_rule = BudgetRule("key", key, "monthly", 10 * USD // 100)
    rates = (RateRule("team", team, 100, None),)
    first = req(team, 9 * USD // 100, (team_rule, key_rule), rates)
    adm = await store.reserve(first)
    assert adm.admitted and adm.remaining_nano == USD // 100  # the key's $0.01 is the least left
    await store.settle(first, 9 * USD // 100, 10)
    before = await store.usage(team, [team_rule, key_rule], NOW)
    # both budgets fail for $0.05 in strict mode; the key has less headroom and is named
    adm = await store.reserve(req(team, CENTS_5, (team_rule, key_rule), rates))
    if partial:  # partial mode admits, capped at the key's $0.01
        assert adm.admitted and adm.reserved_nano == USD // 100
        return
    assert not adm.admitted and adm.refusal is not None
    assert (adm.refusal.kind, adm.refusal.scope, adm.refusal.owner, adm.refusal.period) == ("budget", "key", key,
                                                                                            "monthly")
    assert (adm.refusal.limit, adm.refusal.used) == (10 * USD // 100, 9 * USD // 100)
    assert adm.rate.remaining_requests == 99  # the refused request consumed no rate allowance
    assert await store.usage(team, [team_rule, key_rule], NOW) == before  # nothing reserved
    # fits the team ($0.03 left) but not the key ($0.01 left): still the key refuses
    adm = await store.reserve(req(team, 2 * USD // 100, (team_rule, key_rule), rates))
    assert not adm.admitted and adm.refusal is not None and adm.refusal.scope == "key"
    assert await store.usage(team, [team_rule, key_rule], NOW) == before


async def test_soft_threshold_refuses_as_budget_soft_and_strict_requests_never_shrink(h: Harness) -> None:
    store, team = h.make(), team_name()
    soft = BudgetRule("team", team, "monthly", USD // 10, soft_nano=USD // 20)   # $0.10, soft at $0.05
    hard = BudgetRule("team", team, "monthly", USD // 10)
    first = req(team, 4 * USD // 100, (soft,))
    assert (await store.reserve(first)).admitted                  # $0.00 used < $0.05 soft
    await store.settle(first, 4 * USD // 100, 10)
    second = req(team, 4 * USD // 100, (soft,))
    assert (await store.reserve(second)).admitted                 # $0.04 < $0.05: still under the threshold
    await store.settle(second, 4 * USD // 100, 10)
    adm = await store.reserve(req(team, USD // 100, (soft,)))     # $0.08 >= $0.05
    assert not adm.admitted and adm.refusal is not None
    assert (adm.refusal.kind, adm.refusal.limit, adm.refusal.used) == ("budget_soft", USD // 20, 8 * USD // 100)
    assert await used(store, team, hard) == (8 * USD // 100, 0)   # the soft refusal held nothing
    # without the threshold (the downgraded retry), a strict request must fit whole: $0.03 > $0.02 left
    strict = ReserveRequest(uuid.uuid4().hex, team, 3 * USD // 100, 10, (hard,), (), NOW, 1, partial=False)
    adm = await store.reserve(strict)
    assert not adm.admitted and adm.refusal is not None and adm.refusal.kind == "budget"
    assert (await store.reserve(req(team, 3 * USD // 100, (hard,)))).reserved_nano == 2 * USD // 100  # partial


async def test_exhausted_key_budget_refuses_in_both_modes(h: Harness) -> None:
    store, team, key = h.make(), team_name(), "k:{odd}/id"  # names with separators are encoded in keys
    rules = (BudgetRule("team", team, "daily", USD), BudgetRule("key", key, "monthly", 10 * USD // 100))
    for _ in range(2):
        r = req(team, CENTS_5, rules)
        assert (await store.reserve(r)).admitted
        await store.settle(r, CENTS_5, 10)
    adm = await store.reserve(req(team, CENTS_5, rules))
    assert not adm.admitted and adm.refusal is not None
    assert (adm.refusal.scope, adm.refusal.owner, adm.refusal.limit, adm.refusal.used) == ("key", key, USD // 10,
                                                                                           USD // 10)


async def test_period_rollover_uses_fresh_buckets(h: Harness) -> None:
    store, team = h.make(), team_name()
    daily, monthly = BudgetRule("team", team, "daily", USD), BudgetRule("team", team, "monthly", 2 * USD)
    nov30 = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)
    r = req(team, USD, (daily, monthly), now=nov30)
    assert (await store.reserve(r)).admitted
    await store.settle(r, USD, 10)
    assert not (await store.reserve(req(team, 1, (daily,), now=nov30))).admitted
    dec1 = nov30 + timedelta(seconds=2)
    r = req(team, USD, (daily, monthly), now=dec1)  # new day and new month: both buckets are fresh
    adm = await store.reserve(r)
    assert adm.admitted and adm.remaining_nano == 0
    await store.settle(r, USD, 10)
    assert await used(store, team, daily, nov30) == (USD, 0)
    assert await used(store, team, monthly, nov30) == (USD, 0)
    assert await used(store, team, monthly, dec1) == (USD, 0)
    [u] = await store.usage(team, [monthly], dec1)
    assert u.period_id == "m202612"


async def test_unsettled_reservation_expires(h: Harness) -> None:
    store, team = h.make(ttl_s=1, partial=False), team_name()
    rule = BudgetRule("team", team, "daily", USD)
    lost = req(team, 60 * USD // 100, (rule,))
    assert (await store.reserve(lost)).admitted
    assert await used(store, team, rule) == (0, 60 * USD // 100)
    refused = await store.reserve(req(team, 60 * USD // 100, (rule,)))
    assert not refused.admitted and refused.refusal is not None and refused.refusal.used == 60 * USD // 100
    await h.wait_past(1.05)
    for _ in range(50):  # bounded: the hold must be gone shortly after the TTL
        if await used(store, team, rule) == (0, 0):
            break
        await h.wait_past(0.1)
    assert await used(store, team, rule) == (0, 0)
    second = req(team, 60 * USD // 100, (rule,))
    assert (await store.reserve(second)).admitted
    await store.settle(lost, 10 * USD // 100, 10)  # a late settle still counts real spend, releases nothing else
    assert await used(store, team, rule) == (10 * USD // 100, 60 * USD // 100)


async def test_settle_is_idempotent_and_exact(h: Harness) -> None:
    store, team = h.make(), team_name()
    rule = BudgetRule("team", team, "daily", USD)
    r = req(team, 30 * USD // 100, (rule,))
    assert (await store.reserve(r)).admitted
    assert (await store.reserve(r)).admitted  # a retried reserve holds nothing more
    assert await used(store, team, rule) == (0, 30 * USD // 100)
    await store.settle(r, CENTS_5, 10)
    await store.settle(r, CENTS_5, 10)
    await store.settle(r, USD, 10)
    assert await used(store, team, rule) == (CENTS_5, 0)
    failed = req(team, 30 * USD // 100, (rule,))
    assert (await store.reserve(failed)).admitted
    await store.settle(failed, 0, 0)  # failed upstream call: everything released
    assert await used(store, team, rule) == (CENTS_5, 0)
    over = req(team, CENTS_5, (rule,))
    assert (await store.reserve(over)).admitted
    await store.settle(over, 8 * USD // 100, 10)  # actual above the reservation counts in full
    assert await used(store, team, rule) == (13 * USD // 100, 0)


async def test_no_rules_admits_with_empty_status(h: Harness) -> None:
    store = h.make()
    adm = await store.reserve(req(team_name(), 123))
    assert adm == Admission(True, None, adm.rate, None, 123)
    assert (adm.rate.limit_requests, adm.rate.remaining_requests, adm.rate.limit_tokens,
            adm.rate.remaining_tokens) == (None, None, None, None)
    assert await h.make().ping()


async def test_invalid_requests_are_rejected(h: Harness) -> None:
    store, team = h.make(), team_name()
    with pytest.raises(ValueError):
        await store.reserve(req(team, -1))
    with pytest.raises(ValueError):
        await store.reserve(req(team, 2**60))
    with pytest.raises(ValueError):
        await store.reserve(req(team, 1, (BudgetRule("org", team, "daily", USD),)))
    with pytest.raises(ValueError):
        await store.settle(req(team, 1), -5, 0)


# --- rate limits ----------------------------------------------------------------------------

async def test_rpm_under_concurrency(h: Harness) -> None:
    store, team = h.make(), team_name()
    await h.fresh_window()
    rates = (RateRule("team", team, 1000, None), RateRule("key", "k1", 10, None))
    results = await asyncio.gather(*(store.reserve(req(team, 0, (), rates)) for _ in range(50)))
    ok = [a for a in results if a.admitted]
    assert len(ok) == 10
    assert sorted(a.rate.remaining_requests or 0 for a in ok) == list(range(10))
    assert {a.rate.limit_requests for a in ok} == {10}  # the key's limit is the tighter one
    for a in results:
        if a.admitted:
            continue
        assert a.refusal is not None
        assert (a.refusal.kind, a.refusal.scope, a.refusal.owner, a.refusal.period) == ("rate_requests", "key", "k1",
                                                                                        "minute")
        assert (a.refusal.limit, a.refusal.used) == (10, 10)
        assert a.refusal.retry_after_s is not None and 1 <= a.refusal.retry_after_s <= 60
        assert (a.rate.limit_requests, a.rate.remaining_requests) == (10, 0)


async def test_tpm_counts_estimates_and_settle_corrects(h: Harness) -> None:
    store, team = h.make(), team_name()
    await h.fresh_window()
    rates = (RateRule("team", team, None, 1000),)
    first = req(team, 0, (), rates, tokens=300)
    results = [await store.reserve(first)]
    results += [await store.reserve(req(team, 0, (), rates, tokens=300)) for _ in range(2)]
    assert all(a.admitted for a in results)
    assert [a.rate.remaining_tokens for a in results] == [700, 400, 100]
    assert results[0].rate.limit_requests is None and results[0].rate.limit_tokens == 1000
    refused = await store.reserve(req(team, 0, (), rates, tokens=300))
    assert not refused.admitted and refused.refusal is not None
    assert (refused.refusal.kind, refused.refusal.limit, refused.refusal.used) == ("rate_tokens", 1000, 900)
    assert refused.refusal.retry_after_s is not None and 1 <= refused.refusal.retry_after_s <= 60
    await store.settle(first, 0, 100)  # used 100 of its 300 estimate: 200 tokens come back
    adm = await store.reserve(req(team, 0, (), rates, tokens=300))
    assert adm.admitted and adm.rate.remaining_tokens == 0
    huge = await store.reserve(req(team, 0, (), rates, tokens=5000))
    assert huge.refusal is not None and huge.refusal.retry_after_s is None  # can never fit a minute


async def test_refusal_consumes_no_rate_allowance(h: Harness) -> None:
    store, team = h.make(partial=False), team_name()
    await h.fresh_window()
    rule = BudgetRule("team", team, "daily", CENTS_5)
    rates = (RateRule("team", team, 5, 10_000),)
    adm = await store.reserve(req(team, CENTS_5, (rule,), rates, tokens=1000))
    assert adm.admitted and (adm.rate.remaining_requests, adm.rate.remaining_tokens) == (4, 9000)
    for _ in range(3):
        adm = await store.reserve(req(team, CENTS_5, (rule,), rates, tokens=1000))
        assert adm.refusal is not None and adm.refusal.kind == "budget"
        assert (adm.rate.remaining_requests, adm.rate.remaining_tokens) == (4, 9000)


# --- Redis specifics ---------------------------------------------------------------------------

def test_many_processes_share_one_budget_exactly(redis_port: int) -> None:
    """4 OS processes, 200 simultaneous $0.05 requests against $1: exactly 20 admitted, $1.00 spent."""
    from redis_fixtures import budget_worker

    team = team_name()
    rule = BudgetRule("team", team, "daily", USD)
    bucket, _ = bucket_keys(team, rule, period_id("daily", datetime.now(UTC)))
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=budget_worker, args=(redis_port, team, 50, w, barrier, out)) for w in range(4)]
    for p in procs:
        p.start()
    counts: list[int] = []
    samples = 0
    sampler = redis.Redis(host="127.0.0.1", port=redis_port)
    try:
        for _ in range(12_000):  # <= ~120 s; sample the bucket while the workers run
            spent, reserved = (int(v or 0) for v in sampler.hmget(bucket, "spent", "reserved"))
            assert spent <= USD and spent + reserved <= USD, (spent, reserved)
            samples += 1
            while not out.empty():
                counts.append(out.get())
            if len(counts) == len(procs):
                break
            time.sleep(0.01)
    finally:
        sampler.close()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
                p.join(5)
    assert len(counts) == 4 and sum(counts) == 20, counts
    assert all(p.exitcode == 0 for p in procs)

    async def check() -> tuple[int, int]:
        store = RedisBudgetStore(Redis(host="127.0.0.1", port=redis_port))
        try:
            return await used(store, team, rule, datetime.now(UTC))
        finally:
            await store.aclose()

    assert asyncio.run(check()) == (USD, 0)


async def test_script_reloads_after_flush_and_errors_become_state_unavailable(redis_port: int) -> None:
    client = Redis(host="127.0.0.1", port=redis_port)
    store = RedisBudgetStore(client)
    team = team_name()
    rule = BudgetRule("team", team, "daily", USD)
    assert (await store.reserve(req(team, CENTS_5, (rule,)))).admitted
    await client.script_flush()  # NOSCRIPT on the next EVALSHA: falls back to EVAL
    assert (await store.reserve(req(team, CENTS_5, (rule,)))).admitted
    assert await used(store, team, rule) == (0, 2 * CENTS_5)
    # another script version is refused by the script itself
    assert f"local VERSION = '{SCRIPT_VERSION}'" in SCRIPT
    with pytest.raises(Exception, match=f"budget script is {SCRIPT_VERSION}"):
        await client.eval(SCRIPT, 0, "usage", "v0", 0)
    await store.aclose()
    dead = RedisBudgetStore(Redis(host="127.0.0.1", port=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)))
    with pytest.raises(StateUnavailable):
        await dead.reserve(req(team, 1, (rule,)))
    assert not await dead.ping()
    await dead.aclose()


async def test_redis_cluster_round_for_two_teams(redis_cluster_ports: list[int]) -> None:
    from redis_fixtures import server_time

    cluster = RedisCluster(host="127.0.0.1", port=redis_cluster_ports[0])
    store = RedisBudgetStore(cluster)
    try:
        await cluster.initialize()
        for _ in range(80):  # stay inside one rate window (minute), at most ~8 s
            if server_time(redis_cluster_ports[0]) % 60 < 50:
                break
            await asyncio.sleep(0.1)
        teams: list[str] = []
        nodes: set[str] = set()
        for i in range(200):  # two teams whose hash tags live on different masters
            name = f"cluster-team-{uuid.uuid4().hex[:6]}-{i}"
            node = cluster.get_node_from_key(team_tag(name) + ":x")
            if node is not None and node.name not in nodes:
                teams.append(name)
                nodes.add(node.name)
            if len(teams) == 2:
                break
        assert len(teams) == 2 and key_slot(team_tag(teams[0]).encode()) != key_slot(team_tag(teams[1]).encode())
        for team in teams:
            rules = (BudgetRule("team", team, "daily", USD), BudgetRule("key", f"{team}-key", "monthly", USD // 10))
            rates = (RateRule("team", team, 2, 1000), RateRule("key", f"{team}-key", 5, None))
            r = req(team, 30 * USD // 100, rules, rates, tokens=400)
            adm = await store.reserve(r)
            assert adm.admitted and adm.reserved_nano == USD // 10 and adm.remaining_nano == 0
            assert (adm.rate.limit_requests, adm.rate.remaining_requests) == (2, 1)
            assert (adm.rate.limit_tokens, adm.rate.remaining_tokens) == (1000, 600)
            await store.settle(r, CENTS_5, 200)
            await store.settle(r, CENTS_5, 200)
            usage = await store.usage(team, rules, NOW)
            assert [(u.spent_nano, u.reserved_nano) for u in usage] == [(CENTS_5, 0), (CENTS_5, 0)]
            second = await store.reserve(req(team, CENTS_5, rules, rates, tokens=100))
            assert second.admitted and second.rate.remaining_requests == 0
            third = await store.reserve(req(team, CENTS_5, rules, rates, tokens=100))
            assert third.refusal is not None and third.refusal.kind == "budget"  # budgets are reported first
        assert await store.ping()
    finally:
        await store.aclose()
