"""Budgets of end users, tags and sessions, lifetime (total) budgets and per-minute brakes, on every store.

The same checks run on the in-memory store, on Redis through redis-py and on Redis through the
pipelining client (the ``h`` harness): an end user's budget is one bucket shared by every team,
a ``minute`` budget starts over in the next UTC minute, a session's lifetime bucket is kept a day
after its last request, and a policy's ``users``/``tags``/``sessions`` sections become these rules.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from redis.asyncio import Redis

from gateway.budgets.rules import attributed_limits, budget_rules, rate_rules, refusal_error
from gateway.pipeline.attribution import Attribution
from gateway.policy import PolicyError, TeamSpec, load_policies
from gateway.state.budgets import BudgetRule, RateRule, ReserveRequest, period_id
from gateway.state.budgets_redis import bucket_keys

if TYPE_CHECKING:
    from redis_fixtures import Harness

USD = 1_000_000_000
CENTS_5 = USD // 20
NOW = datetime(2026, 11, 23, 12, 0, 10, tzinfo=UTC)


def req(team: str, cost: int, budgets: tuple[BudgetRule, ...], rates: tuple[RateRule, ...] = (),
        now: datetime = NOW, partial: bool = True) -> ReserveRequest:
    return ReserveRequest(uuid.uuid4().hex, team, cost, 10, budgets, rates, now, 0, partial)


async def test_an_end_user_budget_is_shared_by_every_team(h: Harness) -> None:
    store = h.make()
    user = f"u-{uuid.uuid4().hex[:8]}"
    rule = BudgetRule("user", user, "total", USD // 10)
    first = req("team-a", 3 * CENTS_5 // 2, (rule,))
    assert (await store.reserve(first)).admitted
    await store.settle(first, CENTS_5, 10)
    # another team, same user: only the $0.05 left
    refused = await store.reserve(req("team-b", 2 * CENTS_5, (rule,), partial=False))
    assert refused.refusal is not None and (refused.refusal.scope, refused.refusal.owner) == ("user", user)
    assert refused.refusal.period == "total" and refused.refusal.used == CENTS_5
    second = req("team-b", CENTS_5, (rule,))
    admitted = await store.reserve(second)
    assert admitted.admitted and admitted.remaining_nano == 0
    await store.settle(second, CENTS_5, 10)
    for other in ("team-a", "team-b", "any"):
        [u] = await store.usage(other, [rule], NOW)
        assert (u.spent_nano, u.reserved_nano, u.period_id) == (USD // 10, 0, "t")
    assert not (await store.reserve(req("team-c", 1, (rule,)))).admitted
    message = refusal_error(refused.refusal, refused).message
    assert "lifetime (total) budget of end user" in message and user in message


async def test_every_budget_that_applies_must_cover_the_request(h: Harness) -> None:
    store = h.make()
    tag, session = f"tag-{uuid.uuid4().hex[:8]}", f"s-{uuid.uuid4().hex[:8]}"
    team = f"t-{uuid.uuid4().hex[:8]}"
    rules = (BudgetRule("team", team, "daily", USD), BudgetRule("tag", tag, "monthly", 3 * CENTS_5),
             BudgetRule("session", session, "total", 2 * CENTS_5))
    admitted = 0
    for _ in range(4):
        r = req(team, CENTS_5, rules)
        if (await store.reserve(r)).admitted:
            admitted += 1
            await store.settle(r, CENTS_5, 10)
    assert admitted == 2                               # the session's $0.10 is the tightest
    spent = [u.spent_nano for u in await store.usage(team, rules, NOW)]
    assert spent == [2 * CENTS_5] * 3


async def test_the_minute_brake_is_a_sliding_window_of_what_requests_cost(h: Harness) -> None:
    store = h.make()
    session = f"s-{uuid.uuid4().hex[:8]}"
    brake = BudgetRule("session", session, "minute", 3 * CENTS_5)
    rules = (BudgetRule("session", session, "total", USD), brake)
    outcomes = []
    for _ in range(5):                                 # a tight loop of calls held at $0.05, costing $0.04
        r = req("t", CENTS_5, rules, partial=False)
        adm = await store.reserve(r)
        outcomes.append(adm.admitted)
        if adm.admitted:
            await store.settle(r, 4 * CENTS_5 // 5, 10)
        else:
            assert adm.refusal is not None and adm.refusal.period == "minute"
            assert "spend-rate brake of session" in refusal_error(adm.refusal, adm).message
    # settled costs replace the holds: $0.12 in the window, so a third $0.05 did not fit ($0.15 - $0.12)
    assert outcomes == [True, True, True, False, False]
    total, window = await store.usage("t", rules, NOW)
    assert (total.spent_nano, total.reserved_nano) == (3 * 4 * CENTS_5 // 5, 0)
    assert (window.spent_nano, window.reserved_nano, window.period_id) == (0, 3 * 4 * CENTS_5 // 5, "w60")
    if h.faked:                                        # memory and SQLite: the fake clock moves
        await h.wait_past(45)                          # across a minute boundary: still the same 60 s
        assert not (await store.reserve(req("t", CENTS_5, rules, partial=False))).admitted
        await h.wait_past(16)                          # 61 s after the loop: the window is empty again
        assert (await store.reserve(req("t", CENTS_5, rules, partial=False))).admitted
    else:
        from redis.asyncio import Redis as _Redis

        from gateway.state.budgets_redis import bucket_keys as _keys
        assert h.port is not None
        client = _Redis(host="127.0.0.1", port=h.port)
        _, deadlines = _keys("t", brake, "w60")
        scores = [s for _, s in await client.zrange(deadlines, 0, -1, withscores=True)]
        now_ms = (await client.time())[0] * 1000
        assert len(scores) == 3 and all(now_ms + 55_000 < s <= now_ms + 61_000 for s in scores)
        await client.aclose()


async def test_user_rpm_is_shared_by_every_team(h: Harness) -> None:
    await h.fresh_window()
    store = h.make()
    user = f"u-{uuid.uuid4().hex[:8]}"
    rates = (RateRule("user", user, 2, None),)
    got = [(await store.reserve(req(team, 0, (), rates, now=datetime.now(UTC)))).admitted
           for team in ("a", "b", "c")]
    assert got == [True, True, False]


async def test_a_session_lifetime_bucket_lives_a_day_after_its_last_request(redis_port: int) -> None:
    from gateway.state.budgets_redis import RedisBudgetStore

    client = Redis(host="127.0.0.1", port=redis_port)
    store = RedisBudgetStore(client)
    session, user = f"s-{uuid.uuid4().hex[:8]}", f"u-{uuid.uuid4().hex[:8]}"
    s_rule, u_rule = BudgetRule("session", session, "total", USD), BudgetRule("user", user, "total", USD)
    r = req("t", CENTS_5, (s_rule, u_rule))
    assert (await store.reserve(r)).admitted
    await store.settle(r, CENTS_5, 10)
    s_key, _ = bucket_keys("t", s_rule, "t")
    u_key, _ = bucket_keys("t", u_rule, "t")
    assert s_key.startswith(f"gw:v2:{{session:{session}}}:")
    assert 86_000 < await client.ttl(s_key) <= 86_400
    assert await client.ttl(u_key) > 300 * 86_400     # a user's lifetime budget is kept
    await store.aclose()


async def test_memory_forgets_a_session_a_day_after_its_last_request() -> None:
    from redis_fixtures import FakeClock

    from gateway.state.budgets_memory import MemoryBudgetStore

    clock = FakeClock()
    store = MemoryBudgetStore(clock=clock)
    rule = BudgetRule("session", "s1", "total", USD)
    r = req("t", CENTS_5, (rule,))
    assert (await store.reserve(r)).admitted
    await store.settle(r, CENTS_5, 10)
    clock.t += 86_000
    assert [u.spent_nano for u in await store.usage("t", [rule], NOW)] == [CENTS_5]
    clock.t += 500
    assert [u.spent_nano for u in await store.usage("t", [rule], NOW)] == [0]


POLICY = """
models:
  demo: {deployments: [{provider: simulated, name: demo-sim, model: demo}]}
teams:
  research: {budgets: [{period: monthly, usd: 10}], max_usd_per_minute: 0.5}
users:
  default: {budgets: [{period: daily, usd: 2}], rpm: 30}
  vip@example.com: {budgets: [{period: monthly, usd: 100}]}
tags:
  batch: {budgets: [{period: monthly, usd: 300}]}
sessions:
  default: {budgets: [{period: total, usd: 5}], max_usd_per_minute: 0.5}
"""


def test_policy_sections_become_rules(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    policies = load_policies(str(tmp_path))
    team = policies.teams["research"]
    who = Attribution(user="someone", tags=("batch", "other"), session="run-1")
    attributed = attributed_limits(policies, who)
    assert [(s, o) for s, o, _ in attributed] == [("user", "someone"), ("tag", "batch"), ("session", "run-1")]
    rules = budget_rules(team, None, False, attributed)
    assert [(r.scope, r.owner, r.period, r.limit_nano) for r in rules] == [
        ("team", "research", "monthly", 10 * USD), ("team", "research", "minute", USD // 2),
        ("user", "someone", "daily", 2 * USD), ("tag", "batch", "monthly", 300 * USD),
        ("session", "run-1", "total", 5 * USD), ("session", "run-1", "minute", USD // 2)]
    assert rate_rules(team, None, attributed) == (RateRule("user", "someone", 30, None),)
    vip = attributed_limits(policies, Attribution(user="vip@example.com"))
    assert [(r.owner, r.period) for r in budget_rules(TeamSpec("x"), None, False, vip)] == [
        ("vip@example.com", "monthly")]
    assert attributed_limits(policies, Attribution(tags=("other",))) == ()


@pytest.mark.parametrize("bad, where", [
    ("users:\n  bob: {budgets: [{period: yearly, usd: 1}]}\n", "users.bob.budgets[0]"),
    ("sessions:\n  default: {max_usd_per_minute: -1}\n", "sessions.default"),
    ("tags:\n  batch: {budgets: [{period: total, usd: 1}], burst: 3}\n", "tags.batch"),
    ("teams:\n  t: {budgets: [{period: total, usd: 1}]}\n", "teams.t.budgets[0]"),
])
def test_bad_limit_policies_name_the_key(tmp_path: Path, bad: str, where: str) -> None:
    (tmp_path / "p.yaml").write_text("models:\n  demo: {deployments: [{provider: simulated, name: d, model: demo}]}\n"
                                     + bad)
    with pytest.raises(PolicyError, match=where.replace("[", r"\[").replace("]", r"\]")):
        load_policies(str(tmp_path))


def test_period_ids_of_total_and_minute() -> None:
    assert period_id("total", NOW) == "t"
    assert period_id("minute", NOW) == "w60"   # one sliding-window bucket


async def test_admin_views_of_users_tags_and_sessions(tmp_path: Path) -> None:
    from gateway.admin import ops as adminops
    from gateway.errors import InvalidRequest, NotFound
    from gateway.state.budgets_memory import MemoryBudgetStore

    (tmp_path / "p.yaml").write_text(POLICY)
    policies = load_policies(str(tmp_path))
    store = MemoryBudgetStore()
    rule = BudgetRule("user", "carol", "daily", 2 * USD)
    r = req("research", CENTS_5, (rule,), now=datetime.now(UTC))
    assert (await store.reserve(r)).admitted
    await store.settle(r, CENTS_5, 10)
    listed = await adminops.limit_views(policies.users, store)
    assert [u["name"] for u in listed["data"]] == ["vip@example.com"]
    assert listed["default"]["budgets"] == [{"period": "daily", "limit_usd": "2.00"}] and listed["default"]["rpm"] == 30
    [carol] = (await adminops.limit_views(policies.users, store, "carol"))["data"]
    assert carol["from_default"] and carol["budgets"][0]["spent_nano"] == CENTS_5
    assert carol["budgets"][0]["remaining_usd"] == "1.95"
    [session] = (await adminops.limit_views(policies.sessions, store, "run-9"))["data"]
    assert [b["period"] for b in session["budgets"]] == ["total", "minute"]
    assert session["max_usd_per_minute"] == "0.50"
    with pytest.raises(NotFound):
        await adminops.limit_views(policies.tags, store, "unknown-tag")
    with pytest.raises(InvalidRequest):
        await adminops.limit_views(policies.users, store, "x" * 300)


async def test_a_key_carries_its_own_spend_rate_brake() -> None:
    from gateway.admin import ops as adminops
    from gateway.errors import InvalidRequest
    from gateway.state.budgets_memory import MemoryBudgetStore
    from gateway.state.keys import KeyRecord, MemoryKeyStore

    keys = MemoryKeyStore()
    asked = adminops.key_request({"team": "t", "max_usd_per_minute": "0.1", "budget_usd": 5, "budget_period": "total"})
    view = await adminops.create_key(keys, asked, None)
    record = await keys.get(view["key"]["id"])
    assert record is not None and record.max_usd_per_minute == "0.1" and view["key"]["max_usd_per_minute"] == "0.1"
    assert KeyRecord.from_json(record.to_json()) == record
    legacy = orjson_without(record.to_json(), "max_usd_per_minute")   # a record stored before the field existed
    assert KeyRecord.from_json(legacy).max_usd_per_minute is None
    rules = budget_rules(TeamSpec("t"), record)
    assert [(r.period, r.limit_nano) for r in rules] == [("total", 5 * USD), ("minute", USD // 10)]
    store = MemoryBudgetStore()
    got = []
    for _ in range(3):
        r = req("t", CENTS_5, rules, now=datetime.now(UTC).replace(second=1), partial=False)
        adm = await store.reserve(r)
        got.append(adm.admitted)
        if adm.admitted:
            await store.settle(r, CENTS_5, 10)
    assert got == [True, True, False]
    for bad in ({"team": "t", "max_usd_per_minute": "lots"}, {"team": "t", "max_usd_per_minute": -1},
                {"team": "t", "budget_usd": 1, "budget_period": "minute"}):
        with pytest.raises(InvalidRequest):
            adminops.key_request(bad)


def orjson_without(raw: bytes, field: str) -> bytes:
    import orjson

    doc = orjson.loads(raw)
    doc.pop(field)
    return orjson.dumps(doc)
