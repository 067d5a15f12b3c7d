"""Worker leases on the 3-master Redis Cluster: intents in the slot of their hold, records kept with the settle until
their unit lands, and a dead worker's open requests (across slots, one holding end-user and tag budgets in other
slots) swept exactly once, by two sweepers at a time; a writer that dies mid-unit has its unit written again, the
same; a stalled worker's late batch writes nothing twice; and the lease thread keeps a busy worker alive.

The store, ledger and :class:`~gateway.state.leases.Leases` are driven directly; a worker "dies" by having its
lease deadline set in the past in ``gw:v2:workers``, never by waiting for a clock.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from redis.asyncio import RedisCluster
from redis_fixtures import teams_on_masters
from test_leases import COST, HOLD, USD, intent_of, record_of

from gateway.state import State
from gateway.state.budgets import BudgetRule, ReserveRequest
from gateway.state.budgets_redis import (
    OPEN_INDEX,
    SCRIPT,
    WORKERS_KEY,
    RedisBudgetStore,
    home_tag,
    open_key,
    team_tag,
)
from gateway.state.keys import CachedKeys, RedisKeyStore
from gateway.state.leases import Leases, cluster_renewer, parse_entry, split_record
from gateway.state.ledger import _APPLY, STREAM, BufferedLedger, LedgerRecord, RedisLedger, claim_of, open_ref

pytestmark = pytest.mark.e2e   # a private Redis Cluster


@dataclass
class Worker:
    name: str
    store: RedisBudgetStore
    ledger: RedisLedger
    leases: Leases


@pytest.fixture
async def cluster(redis_cluster_ports: list[int]) -> AsyncIterator[RedisCluster]:
    client = RedisCluster(host="127.0.0.1", port=redis_cluster_ports[0])
    await client.initialize()
    yield client
    await client.aclose()


def worker(client: RedisCluster, name: str, ledger: RedisLedger | None = None) -> Worker:
    store = RedisBudgetStore(client, 900, worker=name, lease_s=10)
    ledger = ledger or RedisLedger(client, writer=name)
    return Worker(name, store, ledger, Leases(store, client, ledger))


def team_rule(team: str) -> BudgetRule:
    return BudgetRule("team", team, "monthly", 10 * USD)


def request(team: str, rid: str, *extra: BudgetRule) -> ReserveRequest:
    return ReserveRequest(rid, team, HOLD, 100, (team_rule(team), *extra), (), datetime.now(UTC))


async def kill(cluster: RedisCluster, name: str) -> None:
    await cluster.zadd(WORKERS_KEY, {name: 0})   # its lease ran out long ago


async def used(store: RedisBudgetStore, team: str, rule: BudgetRule) -> tuple[int, int]:
    [u] = await store.usage(team, [rule], datetime.now(UTC))
    return u.spent_nano, u.reserved_nano


async def ledger_by_id(cluster: RedisCluster, since: float, ids: set[str]) -> dict[str, list[LedgerRecord]]:
    out: dict[str, list[LedgerRecord]] = {}
    for r in await RedisLedger(cluster).read(since):
        if r.request_id in ids:
            out.setdefault(r.request_id, []).append(r)
    return out


async def entry(cluster: RedisCluster, hold_id: str) -> bytes | None:
    key, name = open_ref(claim_of(hold_id)[0])
    value: bytes | None = await cluster.hget(key, name)
    return value


async def test_the_intent_lives_with_the_hold_that_carries_it_and_the_record_with_the_settle(
        cluster: RedisCluster) -> None:
    [team] = teams_on_masters(cluster, 1, prefix="lc")
    w = worker(cluster, f"w-{uuid.uuid4().hex[:8]}")
    user = BudgetRule("user", f"u-{uuid.uuid4().hex[:6]}", "monthly", USD)
    one, multi = request(team, uuid.uuid4().hex), request(team, uuid.uuid4().hex, user)
    only_user = ReserveRequest(uuid.uuid4().hex, team, HOLD, 100, (user,), (), datetime.now(UTC))
    for req in (one, multi, only_user):
        assert (await w.store.reserve(req, w.leases.intent(req, intent_of(team, req.request_id)))).admitted
    assert w.store.hold_id(one) == f"{open_key(team_tag(team))} {one.request_id}"
    assert w.store.hold_id(multi) == f"{open_key(team_tag(team))} {multi.request_id}"     # the team's slot: last
    assert w.store.hold_id(only_user) == f"{open_key(home_tag(team, 'user', user.owner))} {only_user.request_id}"
    registered = {k.decode() for k in await cluster.smembers(OPEN_INDEX)}
    assert {open_key(team_tag(team)), open_key(home_tag(team, "user", user.owner))} <= registered
    for req in (one, multi, only_user):
        value = await entry(cluster, w.store.hold_id(req))
        assert value is not None and parse_entry(value)[:3] == ("I", w.name, HOLD)
    # settled with its record: the record waits in the same entry; a request holding several slots keeps its
    # intent (with the cost) after it, so a sweep could settle its other slots
    for req in (one, multi):
        record = record_of(team, req.request_id, COST)
        record.hold_id = w.store.hold_id(req)
        assert await w.store.settle(req, COST, 12, record.to_json())
    kind, owner, _, tail = parse_entry(await entry(cluster, w.store.hold_id(one)) or b"")
    assert (kind, owner, split_record(tail)[1]) == ("R", w.name, None)
    raw, rest = split_record(parse_entry(await entry(cluster, w.store.hold_id(multi)) or b"")[3])
    assert LedgerRecord.from_json(raw).cost_nano == COST and rest is not None and rest[:2] == (COST, 12)
    assert await used(w.store, team, user) == (COST, HOLD)              # only_user still holds
    assert not await w.store.settle(multi, COST, 12, b"x")              # settled already: no second charge
    assert await used(w.store, team, team_rule(team)) == (2 * COST, 0)


class DiesMidUnit(RedisLedger):
    """A writer that dies after its unit's claim and its first part (the rest never sent)."""

    async def _finish_unit(self, records: Sequence[LedgerRecord], payloads: list[bytes]) -> None:
        marker, keys, args = next(iter(self._parts(records, payloads).values()))
        await self._r.eval(_APPLY, len(keys) + 1, marker, *keys, *args)
        raise ConnectionError("killed mid-unit")


async def test_a_dead_workers_requests_across_slots_are_swept_once_at_their_holds(cluster: RedisCluster) -> None:
    teams = teams_on_masters(cluster, 3, prefix="lc")
    name = f"dead-{uuid.uuid4().hex[:8]}"
    dead = worker(cluster, name, DiesMidUnit(cluster, writer=name))
    user = BudgetRule("user", f"u-{uuid.uuid4().hex[:6]}", "monthly", 10 * USD)
    tag = BudgetRule("tag", f"t-{uuid.uuid4().hex[:6]}", "monthly", 10 * USD)
    since = time.time() - 1
    reqs = [request(t, uuid.uuid4().hex, user, tag) if i % 2 else request(t, uuid.uuid4().hex)
            for t in teams for i in range(4)]
    for req in reqs:
        assert (await dead.store.reserve(req, dead.leases.intent(req, intent_of(req.team, req.request_id)))).admitted
    # a third finished (record unwritten), a third finished and mid-write when it died, a third in flight
    finished: list[LedgerRecord] = []
    for req in reqs[::3] + reqs[1::3]:
        record = record_of(req.team, req.request_id, COST)
        record.hold_id = dead.store.hold_id(req)
        assert await dead.store.settle(req, COST, 12, record.to_json())
        finished.append(record)
    mid = [r for r in finished if r.request_id in {q.request_id for q in reqs[1::3]}]
    with pytest.raises(ConnectionError):
        await dead.ledger.append(mid)
    assert all([(await entry(cluster, r.hold_id) or b"")[:1] == b"B" for r in mid])
    in_flight = {q.request_id for q in reqs[2::3]}
    await kill(cluster, name)

    # two live workers sweep at once: every record once, whoever writes it
    a, b = worker(cluster, f"a-{uuid.uuid4().hex[:8]}"), worker(cluster, f"b-{uuid.uuid4().hex[:8]}")
    got = await asyncio.gather(a.leases.keep(), b.leases.keep())
    await asyncio.gather(a.ledger.append(got[0]), b.ledger.append(got[1]))
    assert sum(len(g) for g in got) == len(reqs) - len(mid)          # the mid-write ones were written by the sweep
    assert a.leases.recovered + b.leases.recovered == len(mid)
    assert a.leases.swept + b.leases.swept == len(in_flight)
    # the same again (the lock let go, the batches replayed): nothing new
    await cluster.delete(*(f"gw:v2:sweep:{name}",))
    again = await a.leases.keep()
    await a.ledger.append(again)
    await a.ledger.append(got[0])
    await b.ledger.append(got[1])

    ids = {q.request_id for q in reqs}
    records = await ledger_by_id(cluster, since, ids)
    assert records.keys() == ids
    assert all(len(v) == 1 for v in records.values()), {k: len(v) for k, v in records.items() if len(v) != 1}
    for rid, [r] in records.items():
        if rid in in_flight:
            assert (r.status, r.cost_nano, r.estimated, r.input_tokens) == ("interrupted", HOLD, True, 0)
        else:
            assert (r.status, r.cost_nano) == ("ok", COST)
    # every budget (the teams', the user's and the tag's, in their own slots) equals its ledger sum, none held
    for t in teams:
        assert await used(a.store, t, team_rule(t)) == (sum(v[0].cost_nano for v in records.values()
                                                           if v[0].team == t), 0)
    shared = sum(records[q.request_id][0].cost_nano for q in reqs if len(q.budgets) == 3)
    assert await used(a.store, teams[0], user) == (shared, 0)
    assert await used(a.store, teams[0], tag) == (shared, 0)
    # only tombstones are left of the dead worker (its swept records)
    left = [await entry(cluster, dead.store.hold_id(q)) for q in reqs]
    assert all(v is None or v[:1] == b"W" for v in left), left


async def test_one_batch_naming_an_entry_twice_writes_it_once(cluster: RedisCluster) -> None:
    """The mechanism that fits the next test's rare failure (about one run in ten before the fix): one worker
    swept twice (the lock lapsed between), so its one batch carried each record twice; each unit claims an
    entry once, whatever the batch repeats."""
    teams = teams_on_masters(cluster, 2, prefix="lc")
    name = f"dead-{uuid.uuid4().hex[:8]}"
    dead, a = worker(cluster, name), worker(cluster, f"a-{uuid.uuid4().hex[:8]}")
    since = time.time() - 1
    reqs = [request(t, uuid.uuid4().hex) for t in teams for _ in range(2)]
    for req in reqs:
        await dead.store.reserve(req, dead.leases.intent(req, intent_of(req.team, req.request_id)))
    record = record_of(reqs[0].team, reqs[0].request_id, COST)
    record.hold_id = dead.store.hold_id(reqs[0])
    assert await dead.store.settle(reqs[0], COST, 12, record.to_json())
    await kill(cluster, name)
    first = await a.leases.sweep(name)
    await cluster.delete(f"gw:v2:sweep:{name}")
    second = await a.leases.sweep(name)
    assert len(first) == len(second) == len(reqs)
    await a.ledger.append(first + second)
    records = await ledger_by_id(cluster, since, {q.request_id for q in reqs})
    assert {k: len(v) for k, v in records.items()} == {q.request_id: 1 for q in reqs}
    assert sorted(v[0].cost_nano for v in records.values()) == [COST] + [HOLD] * 3
    assert a.ledger.left_out == len(reqs)


async def test_two_sweepers_whose_lock_lapsed_still_record_each_request_once(cluster: RedisCluster) -> None:
    """The sweep lock let go mid-sweep (a sweeper slower than it): two sweep the same dead worker at once, and
    the entries' own checks (gate, claim, unit claim) still let each request be charged and recorded once."""
    teams = teams_on_masters(cluster, 2, prefix="lc")
    name = f"dead-{uuid.uuid4().hex[:8]}"
    dead = worker(cluster, name)
    user = BudgetRule("user", f"u-{uuid.uuid4().hex[:6]}", "monthly", 10 * USD)
    since = time.time() - 1
    reqs = [request(t, uuid.uuid4().hex, *((user,) if i % 2 else ())) for t in teams for i in range(6)]
    for req in reqs:
        await dead.store.reserve(req, dead.leases.intent(req, intent_of(req.team, req.request_id)))
    for req in reqs[::2]:
        record = record_of(req.team, req.request_id, COST)
        record.hold_id = dead.store.hold_id(req)
        assert await dead.store.settle(req, COST, 12, record.to_json())
    await kill(cluster, name)
    a, b = worker(cluster, f"a-{uuid.uuid4().hex[:8]}"), worker(cluster, f"b-{uuid.uuid4().hex[:8]}")

    async def unlocked(w: Worker) -> list[LedgerRecord]:
        await cluster.delete(f"gw:v2:sweep:{name}")
        return await w.leases.sweep(name)

    got = await asyncio.gather(unlocked(a), unlocked(b), unlocked(a), unlocked(b))
    await asyncio.gather(a.ledger.append(got[0] + got[2]), b.ledger.append(got[1] + got[3]))
    records = await ledger_by_id(cluster, since, {q.request_id for q in reqs})
    assert len(records) == len(reqs) and all(len(v) == 1 for v in records.values()), {
        k: [(r.status, r.hold_id, r.cost_nano) for r in v] for k, v in records.items() if len(v) != 1}
    assert sorted(v[0].cost_nano for v in records.values()) == [COST] * 6 + [HOLD] * 6
    for t in teams:
        assert await used(a.store, t, team_rule(t)) == (sum(v[0].cost_nano for v in records.values()
                                                           if v[0].team == t), 0)
    assert await used(a.store, teams[0], user) == (
        sum(records[q.request_id][0].cost_nano for q in reqs if len(q.budgets) == 2), 0)


async def test_a_stalled_worker_coming_back_writes_nothing_twice(cluster: RedisCluster) -> None:
    [team] = teams_on_masters(cluster, 1, prefix="lc")
    name = f"stalled-{uuid.uuid4().hex[:8]}"
    stalled = worker(cluster, name)
    user = BudgetRule("user", f"u-{uuid.uuid4().hex[:6]}", "monthly", 10 * USD)
    since = time.time() - 1
    reqs = [request(team, uuid.uuid4().hex, user) for _ in range(3)]
    for req in reqs:
        await stalled.store.reserve(req, stalled.leases.intent(req, intent_of(team, req.request_id)))
    settled: list[LedgerRecord] = []
    for req in reqs[:2]:
        record = record_of(team, req.request_id, COST)
        record.hold_id = stalled.store.hold_id(req)
        assert await stalled.store.settle(req, COST, 12, record.to_json())
        settled.append(record)
    await kill(cluster, name)
    live = worker(cluster, f"live-{uuid.uuid4().hex[:8]}")
    swept = await live.leases.keep()
    assert len(swept) == 3
    # it comes back: its settle of the swept one is refused (no second charge), its batch leaves out what the
    # sweep took over, and the sweep's batch writes each once
    assert not await stalled.store.settle(reqs[2], COST, 12, record_of(team, reqs[2].request_id, COST).to_json())
    await stalled.ledger.append(settled)
    assert stalled.ledger.left_out == 2
    await live.ledger.append(swept)
    await stalled.ledger.append(settled)
    records = await ledger_by_id(cluster, since, {q.request_id for q in reqs})
    assert sorted((v[0].status, v[0].cost_nano, len(v)) for v in records.values()) == [
        ("interrupted", HOLD, 1), ("ok", COST, 1), ("ok", COST, 1)]
    total = sum(v[0].cost_nano for v in records.values())
    assert await used(live.store, team, team_rule(team)) == (total, 0)
    assert await used(live.store, team, user) == (total, 0)


async def test_state_writes_its_own_records_through_units_and_leaves_nothing_open(cluster: RedisCluster) -> None:
    [team] = teams_on_masters(cluster, 1, prefix="lc")
    name = f"st-{uuid.uuid4().hex[:8]}"
    w = worker(cluster, name)
    keys = RedisKeyStore(cluster)
    state = State(w.store, keys, CachedKeys(keys), BufferedLedger(w.ledger), False, redis=cluster, leases=w.leases)
    user = BudgetRule("user", f"u-{uuid.uuid4().hex[:6]}", "monthly", 10 * USD)
    since = time.time() - 1
    reqs = [request(team, uuid.uuid4().hex, *((user,) if i % 2 else ())) for i in range(6)]
    for req in reqs:
        assert (await state.reserve(req, lambda r=req: intent_of(team, r.request_id))).admitted
        await state.finish(req, COST, 12, record_of(team, req.request_id, COST))
    assert all([(await entry(cluster, w.store.hold_id(q)) or b"")[:1] == b"R" for q in reqs])
    await state.flush()
    assert all([await entry(cluster, w.store.hold_id(q)) is None for q in reqs])   # written: the entries gone
    records = await ledger_by_id(cluster, since, {q.request_id for q in reqs})
    assert sorted(len(v) for v in records.values()) == [1] * 6
    assert await used(w.store, team, team_rule(team)) == (6 * COST, 0)
    assert await used(w.store, team, user) == (3 * COST, 0)
    assert not await cluster.xlen(STREAM) == 0


async def test_the_lease_thread_keeps_a_busy_worker_alive(cluster: RedisCluster,
                                                          redis_cluster_ports: list[int]) -> None:
    """The event loop blocked for three leases: the lease thread renews it all along, so no other worker ever
    finds it dead; once the thread stops, the lease runs out."""
    name = f"busy-{uuid.uuid4().hex[:8]}"
    store = RedisBudgetStore(cluster, 900, worker=name, lease_s=1.5)
    url = f"redis://127.0.0.1:{redis_cluster_ports[0]}/0"
    leases = Leases(store, cluster, RedisLedger(cluster, writer=name), cluster_renewer(store, url, 5.0))
    probe = redis.cluster.RedisCluster(host="127.0.0.1", port=redis_cluster_ports[0])
    other = RedisBudgetStore(cluster, 900, worker=f"other-{uuid.uuid4().hex[:8]}", lease_s=1.5)

    def dead_now() -> list[str]:
        reply: Any = probe.eval(SCRIPT, 1, WORKERS_KEY, "lease", "v2", other.worker, 1500)
        return [w.decode() for w in reply]

    try:
        leases.start()
        deadline = time.monotonic() + 30
        while await cluster.zscore(WORKERS_KEY, name) is None:       # its first beat
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        end = time.monotonic() + 3 * 1.5
        while time.monotonic() < end:                                 # the loop is busy: it never yields
            assert name not in dead_now()
            time.sleep(0.1)
        assert name not in [w for w in await other.lease()]
        leases.stop()
        deadline = time.monotonic() + 30
        while name not in dead_now():                                 # not renewed any more: it runs out
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
    finally:
        leases.stop()
        await cluster.zrem(WORKERS_KEY, name, other.worker or "")
        probe.close()

