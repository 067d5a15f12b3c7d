"""Worker leases on a private redis-server: intents written with the hold, records kept with the settle until their
batch lands, and a dead worker's open requests swept exactly once (interrupted records charged their holds).

The store, ledger and :class:`~gateway.state.leases.Leases` are driven directly; a worker "dies" by having its
lease deadline set in the past in ``gw:v2:workers`` (what a lease that was not renewed looks like), never by
waiting for a clock.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.state import State
from gateway.state.budgets import BudgetRule, ReserveRequest
from gateway.state.budgets_redis import OPEN_KEY, WORKERS_KEY, RedisBudgetStore
from gateway.state.keys import CachedKeys, RedisKeyStore
from gateway.state.leases import Leases, parse_entry
from gateway.state.ledger import BufferedLedger, LedgerRecord, RedisLedger

pytestmark = pytest.mark.e2e   # a private redis-server process

USD = 1_000_000_000
HOLD = 70_000_000            # the worst case each request reserves
COST = 23_456_789            # what a finished request really cost


@dataclass
class Worker:
    store: RedisBudgetStore
    ledger: RedisLedger
    leases: Leases


@pytest.fixture
async def redis(redis_port: int) -> AsyncIterator[Redis]:
    client = Redis(host="127.0.0.1", port=redis_port)
    yield client
    await client.aclose()


def worker(client: Redis, name: str) -> Worker:
    store = RedisBudgetStore(client, 900, worker=name, lease_s=10)
    return Worker(store, RedisLedger(client, open_key=OPEN_KEY), Leases(store, client))


def rule(team: str) -> BudgetRule:
    return BudgetRule("team", team, "monthly", 10 * USD)


def request(team: str, hold_id: str) -> ReserveRequest:
    return ReserveRequest(hold_id, team, HOLD, 100, (rule(team),), (), datetime.now(UTC))


def record_of(team: str, request_id: str, cost: int = 0) -> LedgerRecord:
    return LedgerRecord(request_id=request_id, ts=datetime.now(UTC).timestamp(), team=team, key_id="k1",
                        requested_model="m", model="m", deployment="d1", provider="openai", route="direct",
                        input_tokens=5, output_tokens=7, cost_nano=cost, user="u1", tags=("a",), session="s1",
                        endpoint="messages")


def intent_of(team: str, request_id: str) -> dict[str, Any]:
    """The fields a ticket's intent carries (see :meth:`Ticket.intent`)."""
    r = record_of(team, request_id)
    return {k: v for k, v in asdict(r).items() if k in INTENT_FIELDS}


INTENT_FIELDS = ("request_id", "ts", "team", "key_id", "requested_model", "model", "deployment", "provider", "route",
                 "stream", "endpoint", "user", "tags", "session", "agent", "parent_agent")


async def used(store: RedisBudgetStore, team: str) -> tuple[int, int]:
    [u] = await store.usage(team, [rule(team)], datetime.now(UTC))
    return u.spent_nano, u.reserved_nano


async def kill(client: Redis, name: str) -> None:
    """The worker's lease ran out: its deadline is in the past (it renewed nothing since)."""
    await client.zadd(WORKERS_KEY, {name: 1})


async def ledger_of(client: Redis, team: str) -> dict[str, list[LedgerRecord]]:
    grouped: dict[str, list[LedgerRecord]] = {}
    for r in await RedisLedger(client).read(0, team=team):
        grouped.setdefault(r.request_id, []).append(r)
    return grouped


async def test_the_intent_goes_with_the_hold_and_the_record_with_the_settle(redis: Redis) -> None:
    team, name = f"t-{uuid.uuid4().hex[:8]}", f"w-{uuid.uuid4().hex[:8]}"
    w = worker(redis, name)
    req = request(team, f"h-{uuid.uuid4().hex}")
    admission = await w.store.reserve(req, Leases.intent(req, intent_of(team, "r1")))
    assert admission.admitted and admission.reserved_nano == HOLD
    kind, owner, held, raw = parse_entry(await redis.hget(OPEN_KEY, req.request_id))
    assert (kind, owner, held) == ("I", name, HOLD)
    assert await redis.zscore(WORKERS_KEY, name) is not None          # the reserve registered the lease
    final = record_of(team, "r1", COST)
    final.hold_id = req.request_id
    assert await w.store.settle(req, COST, 12, final.to_json()) is True
    kind, owner, held, raw = parse_entry(await redis.hget(OPEN_KEY, req.request_id))
    assert (kind, owner) == ("R", name) and LedgerRecord.from_json(raw) == final
    assert await used(w.store, team) == (COST, 0)
    await w.ledger.append([final])                                     # the batch lands: the entry goes with it
    assert await redis.hget(OPEN_KEY, req.request_id) is None
    assert [r.cost_nano for r in (await ledger_of(redis, team))["r1"]] == [COST]
    assert await w.store.settle(req, COST, 12, final.to_json()) is False   # settled once


async def test_a_dead_workers_requests_are_swept_once_at_their_holds(redis: Redis) -> None:
    team = f"t-{uuid.uuid4().hex[:8]}"
    dead_name, live_name = f"dead-{uuid.uuid4().hex[:8]}", f"live-{uuid.uuid4().hex[:8]}"
    dead, live, other = worker(redis, dead_name), worker(redis, live_name), worker(redis, f"o-{uuid.uuid4().hex}")
    running = [request(team, f"h-{uuid.uuid4().hex}") for _ in range(3)]     # in flight when the worker died
    answered = request(team, f"h-{uuid.uuid4().hex}")                       # settled, its record not yet written
    for i, req in enumerate([*running, answered]):
        assert (await dead.store.reserve(req, Leases.intent(req, intent_of(team, f"r{i}")))).admitted
    final = record_of(team, "r3", COST)
    final.hold_id = answered.request_id
    assert await dead.store.settle(answered, COST, 12, final.to_json())
    assert await used(dead.store, team) == (COST, 3 * HOLD)
    await kill(redis, dead_name)

    records, again = await asyncio.gather(live.leases.sweep(dead_name), other.leases.sweep(dead_name))
    assert again == []                                                  # the lock: one sweeper
    await redis.delete(f"gw:v2:sweep:{dead_name}")                    # that sweeper died before writing them:
    retaken = await other.leases.sweep(dead_name)                       # the next one finds the same records
    assert sorted((r.request_id, r.hold_id, r.cost_nano) for r in retaken) == \
        sorted((r.request_id, r.hold_id, r.cost_nano) for r in records)
    by_id = {r.request_id: r for r in records}
    assert sorted(by_id) == ["r0", "r1", "r2", "r3"] and len(records) == 4
    for i in range(3):
        r = by_id[f"r{i}"]
        assert (r.status, r.cost_nano, r.estimated, r.hold_id) == \
            ("interrupted", HOLD, True, "swept:" + running[i].request_id)
        assert (r.team, r.key_id, r.user, r.tags, r.session, r.endpoint, r.deployment) == \
            (team, "k1", "u1", ("a",), "s1", "messages", "d1")
    assert by_id["r3"] == replace(final, hold_id="swept:" + answered.request_id)   # taken over as it was
    assert await used(live.store, team) == (COST + 3 * HOLD, 0)         # the holds end now, charged in full

    # the dead worker was only stalled: its late settle finds the request swept, its late batch is left out
    assert await dead.store.settle(running[0], 1, 1, record_of(team, "r0", 1).to_json()) is False
    late = record_of(team, "r0", 1)
    late.hold_id = running[0].request_id
    await dead.ledger.append([late])
    assert dead.ledger.left_out == 1

    await live.ledger.append(records)
    await live.ledger.append(records)                                   # the same batch again: its marker
    await live.ledger.append(records[:2])                               # in another batch: left out
    assert live.ledger.left_out == 2
    await dead.ledger.append([final])                                   # the dead worker's own batch, late
    assert dead.ledger.left_out == 2
    grouped = await ledger_of(redis, team)
    assert {k: len(v) for k, v in grouped.items()} == {"r0": 1, "r1": 1, "r2": 1, "r3": 1}
    total = sum(v[0].cost_nano for v in grouped.values())
    assert total == COST + 3 * HOLD == (await used(live.store, team))[0]
    left = [parse_entry(v)[0] for v in (await redis.hgetall(OPEN_KEY)).values() if parse_entry(v)[1] == dead_name]
    assert left == ["W"] * 4                                            # tombstones until the worker is forgotten
    await redis.delete(f"gw:v2:sweep:{dead_name}")                    # the lock's time is up
    assert await live.leases.sweep(dead_name) == []
    parked = await redis.zscore(WORKERS_KEY, dead_name)                # tombstones younger than a day: kept,
    assert parked is not None and parked > (await redis.time())[0] * 1000 + 86_000_000   # not dead till then
    assert dead_name not in await live.store.lease()
    await kill(redis, dead_name)
    tombstones = {k: v for k, v in (await redis.hgetall(OPEN_KEY)).items() if parse_entry(v)[1] == dead_name}
    assert len(tombstones) == 4
    await redis.hset(OPEN_KEY, mapping={k: f"W{dead_name} 1" for k in tombstones})   # as if a day had passed
    await redis.delete(f"gw:v2:sweep:{dead_name}")
    assert await live.leases.sweep(dead_name) == []
    assert await redis.zscore(WORKERS_KEY, dead_name) is None          # nothing left of it: forgotten
    assert [v for v in (await redis.hgetall(OPEN_KEY)).values() if parse_entry(v)[1] == dead_name] == []


async def test_a_batch_that_names_one_entry_twice_records_it_once(redis: Redis) -> None:
    """Two sweeps of one dead worker (the lock lapsed between them) find the same records; written together in
    one batch, each request still gets one record and one charge."""
    team = f"t-{uuid.uuid4().hex[:8]}"
    dead_name = f"dead-{uuid.uuid4().hex[:8]}"
    dead, live = worker(redis, dead_name), worker(redis, f"live-{uuid.uuid4().hex[:8]}")
    reqs = [request(team, f"h-{uuid.uuid4().hex}") for _ in range(4)]
    for i, req in enumerate(reqs):
        assert (await dead.store.reserve(req, Leases.intent(req, intent_of(team, f"r{i}")))).admitted
    final = record_of(team, "r3", COST)
    final.hold_id = reqs[3].request_id
    assert await dead.store.settle(reqs[3], COST, 12, final.to_json())
    await kill(redis, dead_name)
    first = await live.leases.sweep(dead_name)
    await redis.delete(f"gw:v2:sweep:{dead_name}")
    second = await live.leases.sweep(dead_name)
    assert len(first) == len(second) == 4
    await live.ledger.append(first + second)
    grouped = await ledger_of(redis, team)
    assert {k: len(v) for k, v in grouped.items()} == {"r0": 1, "r1": 1, "r2": 1, "r3": 1}
    assert sum(v[0].cost_nano for v in grouped.values()) == COST + 3 * HOLD == (await used(live.store, team))[0]
    assert live.ledger.left_out == 4


async def test_a_record_whose_entry_redis_lost_is_still_written(redis: Redis) -> None:
    """A Redis restarted without its data has no open entry for a settled request: its record is written anyway
    (only a swept entry stops a worker's own record)."""
    team = f"t-{uuid.uuid4().hex[:8]}"
    w = worker(redis, f"w-{uuid.uuid4().hex[:8]}")
    req = request(team, f"h-{uuid.uuid4().hex}")
    assert (await w.store.reserve(req, Leases.intent(req, intent_of(team, "x1")))).admitted
    final = record_of(team, "x1", COST)
    final.hold_id = req.request_id
    assert await w.store.settle(req, COST, 12, final.to_json())
    await redis.hdel(OPEN_KEY, req.request_id)                         # what a data loss looks like
    await w.ledger.append([final])
    assert w.ledger.left_out == 0
    assert [r.cost_nano for r in (await ledger_of(redis, team))["x1"]] == [COST]


async def test_keep_renews_this_lease_and_finds_the_dead(redis: Redis) -> None:
    team = f"t-{uuid.uuid4().hex[:8]}"
    dead_name = f"dead-{uuid.uuid4().hex[:8]}"
    dead, live = worker(redis, dead_name), worker(redis, f"live-{uuid.uuid4().hex[:8]}")
    req = request(team, f"h-{uuid.uuid4().hex}")
    assert (await dead.store.reserve(req, Leases.intent(req, intent_of(team, "k0")))).admitted
    await kill(redis, dead_name)
    records = await live.leases.keep()
    mine = [r for r in records if r.team == team]
    assert [(r.request_id, r.status, r.cost_nano) for r in mine] == [("k0", "interrupted", HOLD)]
    assert (await redis.zscore(WORKERS_KEY, live.leases.worker) or 0) > 1
    assert await used(live.store, team) == (HOLD, 0)


async def test_state_keeps_the_record_in_redis_until_its_batch_lands(redis: Redis) -> None:
    """Through State: the final record is queued only after the settle put it in Redis, and the flush removes it."""
    team, name = f"t-{uuid.uuid4().hex[:8]}", f"w-{uuid.uuid4().hex[:8]}"
    w = worker(redis, name)
    keys = RedisKeyStore(redis)
    state = State(w.store, keys, CachedKeys(keys, ttl_s=0), BufferedLedger(w.ledger), False, redis=redis,
                  leases=w.leases)
    req = request(team, f"h-{uuid.uuid4().hex}")
    assert (await state.reserve(req, lambda: intent_of(team, "s1"))).admitted
    assert parse_entry(await redis.hget(OPEN_KEY, req.request_id))[0] == "I"
    await state.finish(req, COST, 12, record_of(team, "s1", COST))
    kind, _, _, raw = parse_entry(await redis.hget(OPEN_KEY, req.request_id))
    assert kind == "R" and LedgerRecord.from_json(raw).cost_nano == COST   # a SIGKILL now loses nothing
    await state.flush()
    assert await redis.hget(OPEN_KEY, req.request_id) is None
    assert [r.cost_nano for r in (await ledger_of(redis, team))["s1"]] == [COST]
    assert await used(w.store, team) == (COST, 0)
