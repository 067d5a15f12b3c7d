"""The notification claim and outbox stores (memory, Redis, SQLite): one claim wins per id, a claimed
delivery is in the outbox at once, a lease hides it from other workers, retry and done behave, and the
SQLite store is shared by processes and survives a restart."""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from gateway.state.notify_store import MemoryNotifyStore, NotifyStore, RedisNotifyStore, SqliteNotifyStore


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.e2e), "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[NotifyStore]:
    if request.param == "memory":
        yield MemoryNotifyStore()
    elif request.param == "sqlite":
        s = SqliteNotifyStore(str(tmp_path / "notify.sqlite3"))
        yield s
        s.close()
    else:
        client = Redis(host="127.0.0.1", port=request.getfixturevalue("redis_port"), db=6)
        await client.flushdb()
        yield RedisNotifyStore(client)
        await client.flushdb()
        await client.aclose()


async def test_one_claim_wins_and_the_outbox_leases(store: NotifyStore) -> None:
    cid = f"hook:team:t:{uuid.uuid4().hex[:6]}:0.5"
    assert await store.claim(cid, b'{"a": 1}', 3600)
    assert not await store.claim(cid, b'{"a": 2}', 3600)
    [first] = await store.take(30, 10)
    assert (first.id, first.payload, first.attempt) == (cid, b'{"a": 1}', 1)
    assert await store.take(30, 10) == []                       # leased to this worker
    await store.retry(cid, 0)                                   # due again at once
    [again] = await store.take(30, 10)
    assert again.attempt == 2
    await store.done(cid)
    await store.retry(cid, 0)                                   # a retry after done does not resurrect it
    assert await store.take(30, 10) == []
    assert not await store.claim(cid, b"{}", 3600)              # still claimed: never sent twice


def _claim_all(path: str, ids: list[str], out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    import asyncio

    s = SqliteNotifyStore(path)
    out.put(sum(asyncio.run(s.claim(i, b"{}", 3600)) for i in ids))
    s.close()


@pytest.mark.e2e
def test_sqlite_claims_are_exclusive_across_processes_and_survive_a_restart(tmp_path: Path) -> None:
    import asyncio

    path = str(tmp_path / "notify.sqlite3")
    ids = [f"h:team:t:m1:{t}" for t in (0.5, 0.8, 1.0)] * 3
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(path, ids, out)) for _ in range(4)]
    for p in procs:
        p.start()
    wins = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert sum(wins) == 3                                       # one winner per threshold, over 4 processes
    reopened = SqliteNotifyStore(path)                          # "the gateway restarted"
    pending = asyncio.run(reopened.take(30, 10))
    assert sorted(p.id for p in pending) == sorted(set(ids))
    reopened.close()
