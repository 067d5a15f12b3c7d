"""Virtual keys and the spend ledger, in memory, on the private redis-server and 3-master Redis Cluster
of ``redis_fixtures`` (this module works in its own logical database there, which it flushes), and on
a private server with an append-only file that one test stops and restarts by PID. The Redis on 6379
is never touched."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from gateway.state.budgets import StateUnavailable
from gateway.state.keys import CachedKeys, KeyRecord, MemoryKeyStore, RedisKeyStore, hash_secret
from gateway.state.ledger import (
    DAY_S,
    STREAM,
    BufferedLedger,
    LedgerRecord,
    MemoryLedger,
    RedisLedger,
    roll_key,
    rollm_key,
)

DB = 9  # this module's logical database on the shared private server


def client_for(port: int, **kwargs: Any) -> aioredis.Redis:
    return aioredis.Redis(host="127.0.0.1", port=port, db=DB, socket_connect_timeout=0.5, socket_timeout=2.0,
                          retry=Retry(NoBackoff(), 1), **kwargs)


@pytest.fixture
async def rclient(redis_port: int) -> AsyncIterator[aioredis.Redis]:
    client = client_for(redis_port)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.e2e),
                        pytest.param("redis-decoded", marks=pytest.mark.e2e)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "memory":
        yield MemoryKeyStore()
        return
    client = client_for(request.getfixturevalue("redis_port"), decode_responses=request.param == "redis-decoded")
    await client.flushdb()
    s = RedisKeyStore(client)
    yield s
    await s.aclose()


# ---------------------------------------------------------------- keys


async def test_create_lookup_get_list_revoke(store: Any) -> None:
    rec, secret = await store.create("acme", "ci", budget_usd="12.50", budget_period="monthly", rpm=60, tpm=1000)
    other, other_secret = await store.create("globex", "web")
    assert re.fullmatch(r"key_[0-9a-f]{12}", rec.id) and secret.startswith("sk-gw-") and len(secret) > 40
    assert rec.prefix == secret[:8] and rec.budget_usd == "12.50" and (rec.rpm, rec.tpm) == (60, 1000)
    assert await store.lookup(secret) == rec and await store.get(rec.id) == rec
    assert await store.lookup(other_secret) == other
    assert await store.lookup(secret + "x") is None and await store.get("key_000000000000") is None
    assert [r.id for r in await store.list()] == [rec.id, other.id]
    assert await store.list("acme") == [rec] and await store.list("nobody") == []
    assert rec.active(time.time())
    assert await store.revoke(rec.id) is True
    assert await store.revoke(rec.id) is False and await store.revoke("key_000000000000") is False
    revoked = await store.lookup(secret)
    assert revoked is not None and revoked.revoked_at is not None and not revoked.active(time.time())
    assert (await store.get(rec.id)) == revoked and (await store.lookup(other_secret)) == other


async def test_expiry_and_validation(store: Any) -> None:
    now = time.time()
    rec, secret = await store.create("acme", "temp", expires_at=now + 60)
    assert rec.active(now) and not rec.active(now + 61)
    cached = CachedKeys(store)
    assert await cached.lookup_active(secret, now=now) == rec
    assert await cached.lookup_active(secret, now=now + 61) is None  # cached record, expiry still checked
    for bad in ({"budget_usd": "ten"}, {"budget_usd": "-1"}, {"budget_usd": "1e7"}, {"rpm": 0}, {"tpm": 1.5},
                {"rpm": 2**53}, {"budget_usd": "1", "budget_period": "month"}):
        with pytest.raises(ValueError):
            await store.create("acme", "bad", **bad)
    with pytest.raises(ValueError):
        await store.create("", "no team")


async def test_secret_never_stored(rclient: aioredis.Redis) -> None:
    store = RedisKeyStore(rclient)
    made = [await store.create("acme", f"k{i}") for i in range(3)]
    await store.revoke(made[0][0].id)
    dump = b""
    async for key in rclient.scan_iter(match="*"):
        kind = await rclient.type(key)
        value = await rclient.get(key) if kind == b"string" else b"|".join(await rclient.smembers(key))
        dump += key + b"=" + value + b"\n"
    assert sorted(k for k in dump.split(b"\n") if k.startswith(b"gw:v1:keys="))  # the id set exists
    for rec, secret in made:
        assert secret.encode() not in dump and secret[6:].encode() not in dump
        assert hash_secret(secret).encode() in dump and rec.id.encode() in dump


async def test_cached_keys_hits_misses_and_bound() -> None:
    store = MemoryKeyStore()
    calls = 0
    real_lookup = store.lookup

    async def counting(secret: str) -> KeyRecord | None:
        nonlocal calls
        calls += 1
        return await real_lookup(secret)

    store.lookup = counting  # type: ignore[method-assign]
    clock = [100.0]
    cached = CachedKeys(store, ttl_s=2.0, max_entries=3, clock=lambda: clock[0])
    rec, secret = await store.create("acme", "k")
    assert await cached.lookup(secret) == rec and await cached.lookup(secret) == rec and calls == 1
    assert await cached.lookup("sk-gw-nope") is None and await cached.lookup("sk-gw-nope") is None and calls == 2
    await store.revoke(rec.id)
    clock[0] += 1.9
    assert await cached.lookup(secret) == rec and calls == 2  # still within ttl
    clock[0] += 0.2
    after = await cached.lookup(secret)
    assert after is not None and after.revoked_at is not None and calls == 3
    for i in range(10):
        await cached.lookup(f"sk-gw-{i}")
    assert len(cached) == 3


async def test_cached_keys_with_no_ttl_asks_the_store_every_time() -> None:
    """ttl_s 0 (the in-memory state): a new or revoked key is seen at once, and a failing store is
    StateUnavailable, as with a cache."""
    store = MemoryKeyStore()
    cached = CachedKeys(store, ttl_s=0.0)
    assert await cached.lookup("sk-gw-nope") is None
    rec, secret = await store.create("acme", "k")
    assert await cached.lookup(secret) == rec
    await store.revoke(rec.id)
    after = await cached.lookup(secret)
    assert after is not None and after.revoked_at is not None and len(cached) == 0

    async def broken(secret: str) -> KeyRecord | None:
        raise ConnectionError("down")

    store.lookup = broken  # type: ignore[method-assign]
    with pytest.raises(StateUnavailable, match="key store unavailable"):
        await cached.lookup(secret)


async def test_cached_keys_sees_revocation_from_another_replica(rclient: aioredis.Redis, redis_port: int) -> None:
    admin = RedisKeyStore(client_for(redis_port))  # e.g. the admin API on replica A
    replica = RedisKeyStore(client_for(redis_port))  # the hot path on replica B
    cached = CachedKeys(replica, ttl_s=0.5)
    try:
        rec, secret = await admin.create("acme", "k")
        assert await cached.lookup_active(secret) == rec
        assert await admin.revoke(rec.id)
        started = time.monotonic()
        for _ in range(100):  # bounded: 100 x 20 ms
            if await cached.lookup_active(secret) is None:
                break
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - started
        assert await cached.lookup_active(secret) is None
        assert elapsed <= 0.5 + 0.3, elapsed
    finally:
        await admin.aclose()
        await replica.aclose()


# ---------------------------------------------------------------- ledger

DAY0 = (time.time() // DAY_S - 30) * DAY_S  # a UTC midnight well in the past (rollups cover up to today)
BIG = 10**15 + 7  # beyond float precision once summed: sums must stay integers


def make_records(n: int = 24, start: float = DAY0, tag: str = "r") -> list[LedgerRecord]:
    teams, models = ("acme", "glo bex:{x}"), ("gpt-4o", "openai/gpt-4o-mini")
    out = []
    for i in range(n):
        savings = {"routing": BIG + i, "cache": i * 3} if i % 2 else {"compression": 5, "prompt_cache": i}
        out.append(LedgerRecord(
            request_id=f"{tag}{i}", ts=start + i * 7_200 + 0.25, team=teams[i % 2], key_id=f"key_{i % 3:012x}",
            requested_model="auto", model=models[i % 3 % 2], deployment="d1", provider="openai", route="default",
            input_tokens=1_000 + i, output_tokens=10 * i, cached_input_tokens=i, cost_nano=BIG * (i + 1) + i,
            baseline_nano=BIG * (i + 2), savings=savings, latency_ms=12.5, ttft_ms=3.0 if i % 2 else None,
            status="ok", cache="miss", stream=bool(i % 2)))
    return out


SOURCES = ("routing", "cache", "compression", "prompt_cache")


def expected_totals(records: list[LedgerRecord], by: str) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        day = time.strftime("%Y-%m-%d", time.gmtime(r.ts))
        key = {"team": r.team, "model": r.model, "day": day}[by]
        row = rows.setdefault(key, {"key": key, "requests": 0, "cost_nano": 0, "baseline_nano": 0,
                                    "input_tokens": 0, "output_tokens": 0,
                                    "savings_nano": dict.fromkeys(SOURCES, 0)})
        row["requests"] += 1
        row["cost_nano"] += r.cost_nano
        row["baseline_nano"] += r.baseline_nano
        row["input_tokens"] += r.input_tokens
        row["output_tokens"] += r.output_tokens
        for source, nano in r.savings.items():
            row["savings_nano"][source] += nano
    return [rows[k] for k in sorted(rows)]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.e2e),
                        pytest.param("redis-decoded", marks=pytest.mark.e2e)])
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "memory":
        yield MemoryLedger()
        return
    client = client_for(request.getfixturevalue("redis_port"), decode_responses=request.param == "redis-decoded")
    await client.flushdb()
    led = RedisLedger(client)
    yield led
    await led.aclose()


def test_record_json_roundtrip() -> None:
    rec = make_records(2)[1]
    assert LedgerRecord.from_json(rec.to_json()) == rec


async def test_ledger_append_read_totals(ledger: Any) -> None:
    records = make_records()  # 24 records every 2 h: two UTC days
    await ledger.append(records[:5])
    await ledger.append(records[5:])
    assert [r.request_id for r in await ledger.read(DAY0)] == [r.request_id for r in records]
    assert await ledger.read(DAY0) == records
    assert [r.request_id for r in await ledger.read(records[3].ts, records[6].ts)] == ["r3", "r4", "r5"]
    assert [r.request_id for r in await ledger.read(DAY0, team="acme")] == [f"r{i}" for i in range(0, 24, 2)]
    for by in ("team", "model", "day"):
        for since, until in ((DAY0, DAY0 + 2 * DAY_S), (DAY0, None), (records[3].ts, records[20].ts)):
            chosen = [r for r in records if since <= r.ts and (until is None or r.ts < until)]
            assert await ledger.totals(since, until, by=by) == expected_totals(chosen, by), (by, since, until)
            acme = [r for r in chosen if r.team == "acme"]
            assert await ledger.totals(since, until, team="acme", by=by) == expected_totals(acme, by)
    day_rows = await ledger.totals(DAY0, DAY0 + 2 * DAY_S, by="day")
    days = [time.strftime("%Y-%m-%d", time.gmtime(DAY0 + d * DAY_S)) for d in (0, 1)]
    assert [row["key"] for row in day_rows] == days
    assert sum(row["cost_nano"] for row in day_rows) == sum(r.cost_nano for r in records)
    with pytest.raises(ValueError):
        await ledger.totals(DAY0, by="provider")


@pytest.mark.parametrize("atomic", [True, False])
async def test_rollups_equal_stream_and_retries_are_idempotent(rclient: aioredis.Redis, atomic: bool) -> None:
    led = RedisLedger(rclient, atomic=atomic)
    records = make_records()
    await led.append(records[:10])
    await led.append(records[10:])
    await led.append(records[:10])  # a retry of an applied batch (reply lost): a no-op
    assert await rclient.xlen(STREAM) == len(records)
    assert len(await led.read(DAY0)) == len(records)
    whole = (DAY0, DAY0 + 2 * DAY_S)
    for by in ("team", "model", "day"):
        rolled = await led.totals(*whole, by=by, source="rollup")
        assert rolled == await led.totals(*whole, by=by, source="stream") == expected_totals(records, by)
        assert await led.totals(*whole, team="acme", by="day", source="rollup") == expected_totals(
            [r for r in records if r.team == "acme"], "day")
    with pytest.raises(ValueError):
        await led.totals(DAY0 + 1, DAY0 + DAY_S, source="rollup")
    day0 = [r for r in records if r.ts < DAY0 + DAY_S]
    day = time.strftime("%Y%m%d", time.gmtime(DAY0))
    acme = await rclient.hgetall(roll_key("acme", day))
    assert int(acme[b"cost_nano"]) == sum(r.cost_nano for r in day0 if r.team == "acme")
    assert int(acme[b"requests"]) == sum(1 for r in day0 if r.team == "acme")
    mini = await rclient.hgetall(rollm_key("openai/gpt-4o-mini", day))
    assert int(mini[b"savings_routing"]) == sum(r.savings.get("routing", 0) for r in day0 if r.model.endswith("mini"))
    assert await rclient.exists(roll_key("glo bex:{x}", day))
    assert roll_key("glo bex:{x}", day) == f"gw:v1:roll:{{team:glo%20bex%3A%7Bx%7D}}:{day}"
    await rclient.delete(STREAM)  # auto: whole days come from the rollups, partial ranges from the stream
    assert await led.totals(*whole, by="model") == expected_totals(records, "model")
    assert await led.totals(DAY0 + 1, DAY0 + DAY_S) == []


async def test_stream_maxlen_keeps_rollups(rclient: aioredis.Redis) -> None:
    led = RedisLedger(rclient, stream_maxlen=5)
    records = make_records(n=300)
    for i in range(0, 300, 10):
        await led.append(records[i:i + 10])
    assert await rclient.xlen(STREAM) < 300
    rows = await led.totals(DAY0, DAY0 + 26 * DAY_S, by="team")
    assert rows == expected_totals(records, "team")


async def test_memory_ledger_window_evicts_and_rollups_stay_exact() -> None:
    led = MemoryLedger(max_records=5)
    records = make_records()  # 24 records every 2 h over two UTC days
    for i in range(0, 24, 7):
        await led.append(records[i:i + 7])
    assert len(led) == 5 and led.evicted == 19 and led.horizon == records[18].ts
    assert await led.read(DAY0) == records[19:]    # only the window is readable
    assert await led.read(DAY0, team="acme") == [r for r in records[19:] if r.team == "acme"]
    for by in ("team", "model", "day"):            # whole UTC days: the rollups, exact
        for until in (DAY0 + 2 * DAY_S, None):
            assert await led.totals(DAY0, until, by=by) == expected_totals(records, by), (by, until)
            assert await led.totals(DAY0, until, team="glo bex:{x}", by=by) == expected_totals(
                [r for r in records if r.team == "glo bex:{x}"], by)
        # a range starting after the newest evicted record: the partial day from the window, exact
        assert await led.totals(records[19].ts, None, by=by) == expected_totals(records[19:], by)
        assert await led.totals(records[19].ts, records[22].ts, by=by) == expected_totals(records[19:22], by)
    # the partial first day lost its evicted records; the whole second day is still complete
    day1 = [r for r in records if r.ts >= DAY0 + DAY_S]
    assert await led.totals(DAY0 + 1, DAY0 + 2 * DAY_S, by="model") == expected_totals(day1, "model")
    assert await led.totals(DAY0 + 1, DAY0 + DAY_S) == []
    with pytest.raises(ValueError):
        MemoryLedger(max_records=0)


async def test_memory_ledger_memory_is_bounded() -> None:
    """The window holds exact-size copies (orjson's own output buffers are several KB each) and stops
    growing once full; the rollups grow with (day, team, model), not with requests."""
    import tracemalloc

    async def fill(led: MemoryLedger, n: int, tag: str) -> None:
        for i in range(0, n, 100):
            await led.append(make_records(100, start=DAY0 + i, tag=f"{tag}{i}-"))

    led = MemoryLedger(max_records=2_000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await fill(led, 2_000, "a")
        full = tracemalloc.get_traced_memory()[0]
        await fill(led, 6_000, "b")
        later = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(led) == 2_000 and led.evicted == 6_000
    per_record = (full - before) / 2_000
    assert per_record < 1_500, per_record           # a record's JSON is about 600 bytes
    assert later - full < 200_000, later - full     # three more windows' worth: no growth
    for by in ("team", "model", "day"):
        rows = await led.totals(0, None, by=by)
        assert sum(row["requests"] for row in rows) == 8_000


class FlakyLedger(MemoryLedger):
    def __init__(self) -> None:
        super().__init__()
        self.fail: BaseException | None = None

    async def append(self, records: Any) -> None:
        if self.fail is not None:
            raise self.fail
        await super().append(records)


async def test_buffered_ledger_order_reject_and_overflow() -> None:
    inner = FlakyLedger()
    buf = BufferedLedger(inner, max_buffer=6)
    records = make_records(12)
    await buf.append(records[:2])
    inner.fail = redis.exceptions.ConnectionError("down")
    await buf.append(records[2:4])
    await buf.append(records[4:6])
    assert buf.pending == 4 and await buf.flush() == 0 and buf.pending == 4
    inner.fail = None
    await buf.append(records[6:8])  # queued behind the backlog, not written ahead of it
    assert buf.pending == 6
    assert await buf.flush() == 6 and buf.pending == 0
    assert [LedgerRecord.from_json(raw).request_id for raw in inner._records] == [f"r{i}" for i in range(8)]
    inner.fail = redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
    await buf.append(records[8:9])  # a permanent error: logged and discarded, never blocks the queue
    assert buf.rejected == 1 and buf.pending == 0
    inner.fail = OSError("unreachable")
    for i in range(8, 12):
        await buf.append(records[i:i + 1])
    await buf.append(make_records(4, tag="x"))  # 8 queued > 6: the oldest batches go
    assert buf.pending == 6 and buf.dropped == 2
    inner.fail = None
    assert await buf.flush() == 6 and buf.pending == 0
    written = [LedgerRecord.from_json(raw).request_id for raw in inner._records]
    assert written[8:] == ["r10", "r11", "x0", "x1", "x2", "x3"]


@pytest.mark.e2e
async def test_buffered_ledger_survives_redis_restart(tmp_path: Path) -> None:
    from redis_fixtures import RedisProc, free_port

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    port = free_port()
    aof = ("--appendonly", "yes", "--appendfsync", "always")  # so the data outlives the process
    server = RedisProc(port, tmp_path, *aof)
    client = aioredis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=2.0,
                            retry=Retry(NoBackoff(), 1))
    buf = BufferedLedger(RedisLedger(client))
    records = make_records(40)
    try:
        await buf.append(records[:10])
        assert buf.pending == 0
        server.stop()
        for i in range(10, 40, 5):
            await buf.append(records[i:i + 5])  # Redis is down: must not raise
        assert buf.pending == 30
        assert await buf.flush() == 0 and buf.pending == 30
        server = RedisProc(port, tmp_path, *aof)  # a fresh process, same port and --dir: the AOF restores
        for _ in range(50):  # bounded: the first attempt may hit a stale pooled connection
            await buf.flush()
            if buf.pending == 0:
                break
            await asyncio.sleep(0.1)
        assert buf.pending == 0 and buf.dropped == 0 and buf.rejected == 0
        got = await buf.read(DAY0)
        assert sorted(r.request_id for r in got) == sorted(r.request_id for r in records)
        assert len(got) == len({r.request_id for r in got}) == 40
        inner = buf.inner
        assert isinstance(inner, RedisLedger)
        for by in ("team", "model", "day"):
            want = expected_totals(records, by)
            assert await buf.totals(DAY0, DAY0 + 4 * DAY_S, by=by) == want
            assert await inner.totals(DAY0, DAY0 + 4 * DAY_S, by=by, source="stream") == want
    finally:
        await buf.aclose()
        server.stop()


async def test_redis_cluster_keys_and_ledger(redis_cluster_ports: list[int]) -> None:
    cluster = RedisCluster(host="127.0.0.1", port=redis_cluster_ports[0])
    try:
        await cluster.initialize()
        keys = RedisKeyStore(cluster)
        team = f"team-{uuid.uuid4().hex[:8]}"
        rec, secret = await keys.create(team, "k")
        assert await keys.lookup(secret) == rec and await keys.get(rec.id) == rec
        assert [r.id for r in await keys.list(team)] == [rec.id]
        assert await keys.revoke(rec.id) and not (await keys.get(rec.id) or rec).active(time.time())
        led = RedisLedger(cluster)
        assert not led.atomic  # one script per hash slot
        start = DAY0 - 100 * DAY_S  # a range no other test writes
        records = make_records(start=start, tag=f"c{uuid.uuid4().hex[:6]}-")
        day = time.strftime("%Y%m%d", time.gmtime(start))
        touched = {STREAM, roll_key("acme", day), roll_key("glo bex:{x}", day), rollm_key("gpt-4o", day)}
        assert len({key_slot(k.encode()) for k in touched}) > 1
        await led.append(records[:12])
        await led.append(records[12:])
        await led.append(records[:12])  # a retry of an applied batch: a no-op on every slot
        assert await led.read(start, start + 2 * DAY_S) == records
        for by in ("team", "model", "day"):
            want = expected_totals(records, by)
            assert await led.totals(start, start + 2 * DAY_S, by=by, source="rollup") == want
            assert await led.totals(start, start + 2 * DAY_S, by=by, source="stream") == want
    finally:
        await cluster.aclose()


async def test_concurrent_lookups_of_one_key_share_one_store_call() -> None:
    store = MemoryKeyStore()
    record, secret = await store.create("acme", "busy")
    calls = 0
    real = store.lookup

    async def slow_lookup(value: str) -> Any:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return await real(value)

    store.lookup = slow_lookup  # type: ignore[method-assign]
    cached = CachedKeys(store, ttl_s=60)
    found = await asyncio.gather(*(cached.lookup(secret) for _ in range(200)))
    assert calls == 1 and all(r is not None and r.id == record.id for r in found)
    assert (await cached.lookup(secret)) is not None and calls == 1          # then from the cache

    async def failing(value: str) -> Any:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise ConnectionError("down")

    store.lookup = failing  # type: ignore[method-assign]
    cold = CachedKeys(store, ttl_s=60)
    results = await asyncio.gather(*(cold.lookup(secret) for _ in range(50)), return_exceptions=True)
    assert calls == 2 and all(isinstance(r, StateUnavailable) for r in results)
