"""Requests admitted unmetered while Redis is down (fail mode ``allow``) keep their intent in the spool
(``GATEWAY_SPOOL_DIR``), so a process killed with such requests in flight leaves them to the next process as
``interrupted`` records (:class:`gateway.state.spool.IntentSpool`). Real files; the last tests a private
redis-server. A process "dies" by closing its files without cleaning up: the lock goes, the file stays."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.settings import Settings
from gateway.state import State, open_state
from gateway.state.budgets import BudgetRule, ReserveRequest, StateUnavailable
from gateway.state.budgets_redis import RedisBudgetStore
from gateway.state.keys import CachedKeys, MemoryKeyStore
from gateway.state.ledger import BufferedLedger, LedgerRecord, RedisLedger
from gateway.state.spool import IntentSpool, SettleSpool, Spool, intent_records

USD = 1_000_000_000
WORST = 70_000_000     # each request's worst case (the hold it would have taken)
COST = 23_456_789      # what a finished request really cost
TS = float(int(time.time()))   # when the requests were admitted (the ledger's stream is read by time)


def reservation(team: str, hold: str) -> ReserveRequest:
    return ReserveRequest(hold, team, WORST, 100, (BudgetRule("team", team, "monthly", 10 * USD),), (),
                          datetime.now(UTC))


def fields(team: str, hold: str) -> dict[str, Any]:
    return {"request_id": f"req-{hold}", "ts": TS, "team": team, "key_id": "k1",
            "requested_model": "gpt", "model": "gpt-x", "deployment": "d1", "provider": "openai", "route": "chat",
            "stream": True, "endpoint": "chat", "user": "u1", "tags": ["t"]}


def final(team: str, hold: str) -> LedgerRecord:
    return LedgerRecord.from_dict({**fields(team, hold), "input_tokens": 9, "output_tokens": 5,
                                   "cost_nano": COST})


def die(*files: Any) -> None:
    for f in files:
        f._fh.close()


def test_a_dead_files_open_intents_become_interrupted_records_and_done_ones_nothing(tmp_path: Path) -> None:
    dead = IntentSpool(tmp_path)
    for hold in ("open1", "done", "unwritten", "unsettled", "open2"):
        dead.begin(reservation("alpha", hold), fields("alpha", hold))
    assert dead.live == 5 and dead.path.stat().st_size > 0          # in the OS's hands at once
    for hold in ("done", "unwritten", "unsettled"):
        record = final("alpha", hold)
        record.hold_id = hold
        dead.finish(hold, record, COST, 14)
        if hold != "unwritten":
            dead.stored([record])                                     # its batch was written (or spilled)
        if hold != "unsettled":
            dead.settled(hold)
    assert dead.live == 4                                            # "done" is safe: forgotten
    alive = IntentSpool(tmp_path)
    alive.begin(reservation("alpha", "mine"), fields("alpha", "mine"))
    die(dead)

    lines = dead.path.read_bytes().splitlines(keepends=True)
    assert intent_records(lines) == intent_records(lines)             # one file, one batch: a replay is a no-op
    heir = IntentSpool(tmp_path)
    owed: list[tuple[list[LedgerRecord], list[Any]]] = []
    assert heir.adopt(lambda records, settles: owed.append((records, settles))) == 3
    [(records, settles)] = owed                                      # the live process's file is not touched
    assert [r.request_id for r in records] == ["req-open1", "req-unwritten", "req-open2"]
    for r in (records[0], records[2]):
        hold = r.request_id.removeprefix("req-")
        assert (r.status, r.cost_nano, r.estimated, r.hold_id, r.input_tokens, r.output_tokens) == \
            ("interrupted", WORST, True, hold, 0, 0)
        assert (r.team, r.key_id, r.model, r.user, r.tags, r.stream, r.ts) == \
            ("alpha", "k1", "gpt-x", "u1", ("t",), True, TS)
    assert (records[1].status, records[1].cost_nano, records[1].hold_id) == ("ok", COST, "unwritten")
    assert [(q.request_id, cost, tokens) for q, cost, tokens in settles] == \
        [("open1", WORST, 0), ("unsettled", COST, 14), ("open2", WORST, 0)]
    assert not dead.path.exists() and alive.path.exists()
    assert heir.adopt(lambda records, settles: owed.append((records, settles))) == 0   # adopted once
    heir.close()
    assert not heir.path.exists()                                    # nothing live: no file left


def test_the_file_empties_when_nothing_is_live_and_a_clean_close_removes_it(tmp_path: Path) -> None:
    spool = IntentSpool(tmp_path)
    spool.begin(reservation("a", "h1"), fields("a", "h1"))
    record = final("a", "h1")
    record.hold_id = "h1"
    spool.finish("h1", record, COST, 1)
    spool.sync()
    assert spool.path.stat().st_size > 0                             # record not yet written
    spool.stored([final("a", "other"), record])
    spool.settled("h1")
    spool.sync()
    assert spool.live == 0 and spool.path.stat().st_size == 0
    spool.close()
    assert list(tmp_path.iterdir()) == []


def test_a_large_file_is_rewritten_with_its_live_lines_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.state.spool.REWRITE_BYTES", 4096)
    spool = IntentSpool(tmp_path)
    spool.begin(reservation("a", "keep"), fields("a", "keep"))
    for i in range(40):
        hold = f"h{i}"
        spool.begin(reservation("a", hold), fields("a", hold))
        spool.finish(hold, None, COST, 1)                            # no record of its own: written elsewhere
        spool.settled(hold)
    big = spool.path.stat().st_size
    spool.sync()
    assert spool.path.stat().st_size < big // 4 and spool.live == 1
    die(spool)
    heir = IntentSpool(tmp_path)
    owed: list[list[LedgerRecord]] = []
    heir.adopt(lambda records, settles: owed.append(records))
    assert [[r.request_id for r in rs] for rs in owed] == [["req-keep"]]
    heir.close()


@pytest.mark.e2e
async def test_a_process_killed_during_an_outage_leaves_its_unmetered_requests_to_the_next(
        redis_port: int, tmp_path: Path) -> None:
    """State level: three requests admitted unmetered (Redis down), one finished and flushed, two in flight when
    the process dies. The next process (Redis up) writes exactly two interrupted records at the worst case, the
    finished one keeps its own record, nothing doubles, and the budget's spend equals the ledger's sum."""
    team = f"team-{uuid.uuid4().hex[:8]}"
    spool_dir = tmp_path / "spool"
    down = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    keys = MemoryKeyStore()
    intents = IntentSpool(spool_dir)
    ledger = BufferedLedger(RedisLedger(down), spool=Spool(spool_dir))
    ledger.on_stored = intents.stored
    crashed = State(RedisBudgetStore(down), keys, CachedKeys(keys), ledger, fail_open=True,
                    settle_spool=SettleSpool(spool_dir), intents=intents)
    reqs = [reservation(team, f"{team}-h{i}") for i in range(3)]
    for r in reqs:
        with pytest.raises(StateUnavailable):
            await crashed.reserve(r, lambda r=r: fields(team, r.request_id))
    assert intents.live == 3
    await crashed.finish(reqs[0], COST, 14, final(team, reqs[0].request_id))
    await crashed.flush()                                            # record spilled, settle spooled
    assert intents.live == 2
    assert crashed.settle_spool is not None and ledger.spool is not None
    die(intents, crashed.settle_spool, ledger.spool)                 # SIGKILL with two requests in flight

    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_port}/0", spool_dir=str(spool_dir),
                        redis_fail_mode="allow")
    since = TS - 60
    heir = open_state(settings)
    try:
        assert heir.intents is not None and heir.intents.live == 0
        await heir.flush()
        await heir.flush()
        assert heir.pending == 0
        records = await heir.ledger.read(since, team=team)
        by_id: dict[str, list[LedgerRecord]] = {}
        for r in records:
            by_id.setdefault(r.request_id, []).append(r)
        assert {k: [(r.status, r.cost_nano) for r in v] for k, v in by_id.items()} == {
            f"req-{reqs[0].request_id}": [("ok", COST)],
            f"req-{reqs[1].request_id}": [("interrupted", WORST)],
            f"req-{reqs[2].request_id}": [("interrupted", WORST)]}
        [usage] = await heir.budgets.usage(team, list(reqs[0].budgets), datetime.now(UTC))
        assert (usage.spent_nano, usage.reserved_nano) == (COST + 2 * WORST, 0)   # spend equals the ledger sum
        # with Redis up, a reserve writes nothing to the intents file
        ok = await heir.reserve(reservation(team, f"{team}-live"), lambda: fields(team, "live"))
        assert ok.admitted and heir.intents.path.stat().st_size == 0 and heir.intents.live == 0
        await heir.settle(reservation(team, f"{team}-live"), 0, 0)
    finally:
        await heir.aclose()
    again = open_state(settings)                                     # adopted once: nothing more to write
    try:
        await again.flush()
        assert len(await again.ledger.read(since, team=team)) == 3
    finally:
        await again.aclose()
    await down.aclose()
