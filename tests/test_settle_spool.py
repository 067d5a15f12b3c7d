"""Settles queued while Redis is down wait on disk too (``GATEWAY_SPOOL_DIR``, issue 11 item 4): a process
killed during the outage leaves them in its ``settles-*.jsonl``, and the next process adopts and applies
them, once. A clean shutdown removes empty spool files (item 9). Real files and a private redis-server."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from test_keys_ledger import make_records

from gateway.settings import Settings
from gateway.state import State, open_state
from gateway.state.budgets import BudgetRule, RateRule, ReserveRequest
from gateway.state.budgets_redis import RedisBudgetStore
from gateway.state.keys import CachedKeys, MemoryKeyStore
from gateway.state.ledger import BufferedLedger, MemoryLedger
from gateway.state.spool import SettleSpool, decode_settle, encode_settle

USD = 1_000_000_000


def reservation(team: str, rid: str) -> ReserveRequest:
    return ReserveRequest(rid, team, 5_000_000, 300, (BudgetRule("team", team, "daily", USD, 900_000_000),
                                                      BudgetRule("key", "key_1", "monthly", USD)),
                          (RateRule("team", team, 100, None),), datetime.now(UTC), 1_000, False)


def test_a_settle_survives_the_trip_through_a_file() -> None:
    settle = (reservation("alpha", "r1"), 123_456, 789)
    assert decode_settle(encode_settle(settle)) == settle


def test_a_dead_processes_settles_are_adopted_and_a_live_ones_are_not(tmp_path: Path) -> None:
    alive, dead = SettleSpool(tmp_path), SettleSpool(tmp_path)
    alive.add([(reservation("a", "live"), 1, 1)])
    dead.add([(reservation("d", "d1"), 10, 1), (reservation("d", "d2"), 20, 2)])
    dead._fh.close()                                    # SIGKILL: the lock goes, the file stays
    heir = SettleSpool(tmp_path)
    adopted = heir.adopt()
    assert [(r.request_id, cost) for r, cost, _ in adopted] == [("d1", 10), ("d2", 20)]
    assert not dead.path.exists() and alive.path.exists() and heir.entries == 2
    heir.rewrite(adopted[1:])                           # one applied: only the other is left on disk
    assert [decode_settle(line)[0].request_id for line in heir.path.read_bytes().splitlines()] == ["d2"]
    heir.rewrite([])
    heir.close()
    alive.close()
    assert not heir.path.exists() and alive.path.exists()   # an empty spool goes, a full one stays


async def test_settles_queued_during_an_outage_are_applied_by_the_next_process(redis_port: int,
                                                                               tmp_path: Path) -> None:
    team = f"team-{uuid.uuid4().hex[:8]}"
    spool_dir = tmp_path / "spool"
    dead_redis = RedisBudgetStore(Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5,
                                        retry=Retry(NoBackoff(), 0)))
    keys = MemoryKeyStore()
    crashed = State(dead_redis, keys, CachedKeys(keys), BufferedLedger(MemoryLedger()), fail_open=True,
                    settle_spool=SettleSpool(spool_dir))
    reqs = [reservation(team, f"r{i}") for i in range(3)]
    for i, r in enumerate(reqs):
        await crashed.settle(r, 1_000_000 * (i + 1), 100)   # Redis is down: queued, and on disk
    await crashed.flush()                                    # still down: nothing applied, all kept
    assert crashed.pending == 3
    assert crashed.settle_spool is not None
    crashed.settle_spool._fh.close()                         # the process is killed here
    await dead_redis.aclose()

    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_port}/0", spool_dir=str(spool_dir))
    heir = open_state(settings)
    try:
        assert heir.pending == 3                             # adopted
        await heir.flush()
        assert heir.pending == 0
        usage = await heir.budgets.usage(team, list(reqs[0].budgets), datetime.now(UTC))
        assert [u.spent_nano for u in usage] == [6_000_000, 6_000_000]
        for r in reqs:                                        # replaying again changes nothing
            await heir.budgets.settle(r, 1_000_000, 100)
        usage = await heir.budgets.usage(team, list(reqs[0].budgets), datetime.now(UTC))
        assert [u.spent_nano for u in usage] == [6_000_000, 6_000_000]
        assert heir.settle_spool is not None and heir.settle_spool.path.stat().st_size == 0
    finally:
        await heir.aclose()
    assert list(spool_dir.iterdir()) == []                   # a clean shutdown leaves no empty spool file


async def test_a_clean_shutdown_removes_the_empty_ledger_spool(redis_port: int, tmp_path: Path) -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_port}/0", spool_dir=str(tmp_path))
    state = open_state(settings)
    assert state.ledger.spool is not None and state.ledger.spool.path.exists()
    for r in make_records(3):
        state.record(r)
    await state.aclose()                                     # written to Redis, spool empty: removed
    assert list(tmp_path.iterdir()) == []
