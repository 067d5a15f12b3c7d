"""Worker leases on the embedded SQLite state, in process: a hold taken with an intent names its process, and a
live worker's sweep turns a dead process's holds into ``interrupted`` records charged exactly their holds, once.

A worker "dies" by its id: this process's PID with another start time is exactly what a dead worker whose PID
was reused looks like (:func:`~gateway.state.leases_sqlite.is_dead` compares the start time), so no process
is started or killed here (``tests/test_fault_matrix_e2e.py`` SIGKILLs a real ``gateway serve`` worker).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from test_fault_matrix_e2e import ANSWER_NANO, LIMIT_USD, Reply, drive, load_policy, wait_for, worker_pids

from conftest import start_gateway, stop
from gateway.settings import Settings
from gateway.state import open_state
from gateway.state.budgets import BudgetRule, ReserveRequest
from gateway.state.budgets_sqlite import SqliteBudgetStore
from gateway.state.keys_sqlite import SqliteKeyStore
from gateway.state.leases_sqlite import SqliteLeases, is_dead, namespace_tag, process_id, start_time
from gateway.state.ledger import SWEPT, LedgerRecord
from gateway.state.ledger_sqlite import SqliteLedger
from gateway.state.sqlite_db import connect, migrate

USD = 1_000_000_000
HOLD = 70_000_000            # the worst case each request reserves
COST = 23_456_789            # what a finished request really cost
TEAM = "alpha"
RULE = BudgetRule("team", TEAM, "monthly", 10 * USD)

pytestmark = pytest.mark.skipif(namespace_tag() is None or not process_id(), reason="needs /proc")


def dead_worker() -> str:
    """This process's PID with a start time it does not have: a worker that died (its PID since reused)."""
    tag, pid, started = process_id().split(":")
    return f"{tag}:{pid}:{int(started) + 1}"


def request(hold_id: str) -> ReserveRequest:
    return ReserveRequest(hold_id, TEAM, HOLD, 100, (RULE,), (), datetime.now(UTC))


def intent(hold_id: str) -> dict[str, Any]:
    return {"request_id": f"req-{hold_id}", "ts": 1_800_000_000.0, "team": TEAM, "key_id": "k1",
            "requested_model": "gpt", "model": "gpt-x", "deployment": "d1", "provider": "openai", "route": "chat",
            "stream": True, "endpoint": "chat", "user": "u1", "tags": ["t"]}


def worker(data: Path, name: str) -> tuple[SqliteBudgetStore, SqliteLedger, SqliteLeases]:
    """A worker's stores on its own connection (as each ``gateway serve`` worker has)."""
    db = connect(data)
    ledger = SqliteLedger(db)
    store = SqliteBudgetStore(db, 900, worker=name, group=ledger.group, owns_connection=False)
    return store, ledger, SqliteLeases(store, ledger)


def usage(store: SqliteBudgetStore) -> tuple[int, int]:
    [u] = asyncio.run(store.usage(TEAM, [RULE], datetime.now(UTC)))
    return u.spent_nano, u.reserved_nano



def sweep_at_once(sweepers: list[SqliteLeases]) -> list[int]:
    """Each sweeper's :meth:`SqliteLeases.keep`, all started at the same moment in threads of their own."""
    start = threading.Barrier(len(sweepers))
    counts: list[int] = []

    def sweep(leases: SqliteLeases) -> None:
        start.wait(30)
        counts.append(leases.keep())

    threads = [threading.Thread(target=sweep, args=(leases,)) for leases in sweepers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return counts

def test_start_time_and_identity_of_processes(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid, stat in {11: "11 (a) b) c) S " + " ".join(str(i) for i in range(4, 30)),
                      12: "12 (zombie) Z " + " ".join(str(i) for i in range(4, 30))}.items():
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "stat").write_text(stat)
    assert start_time(11, proc) == "22"          # field 22, after a command name holding ") "
    assert start_time(12, proc) is None          # a zombie is dead
    assert start_time(13, proc) is None          # no such process
    me = process_id()
    assert me.split(":")[1] == str(os.getpid()) and not is_dead(me, namespace_tag())
    assert is_dead(dead_worker(), namespace_tag())
    assert not is_dead(f"other:{os.getpid()}:0", namespace_tag())   # another namespace: never judged from here
    assert not is_dead("", namespace_tag()) and not is_dead(dead_worker(), None)


def test_a_dead_workers_holds_are_charged_exactly_and_recorded_as_interrupted_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    dead_store, dead_ledger, _ = worker(data, dead_worker())
    live_store, live_ledger, leases = worker(data, process_id())

    async def dead_workers_requests() -> None:
        for i in range(3):
            assert (await dead_store.reserve(request(f"h{i}"), lambda i=i: intent(f"h{i}"))).admitted
        await dead_store.settle(request("h0"), COST, 50)   # finished before the worker died
        assert (await dead_store.reserve(request("plain"))).admitted   # no intent: no owner, lapses with the TTL
        assert (await live_store.reserve(request("mine"), lambda: intent("mine"))).admitted   # a live worker's

    asyncio.run(dead_workers_requests())
    owners = dict(live_store.conn.execute("SELECT request_id, worker FROM reservations").fetchall())
    assert owners == {"h1": dead_worker(), "h2": dead_worker(), "plain": "", "mine": process_id()}
    assert usage(live_store) == (COST, 4 * HOLD)

    assert leases.keep() == 2
    assert leases.keep() == 0                    # nothing left to sweep: never charged or recorded twice
    assert usage(live_store) == (COST + 2 * HOLD, 2 * HOLD)   # "plain" and "mine" still held
    records = asyncio.run(live_ledger.read(0))
    assert sorted(r.request_id for r in records) == ["req-h1", "req-h2"]
    for r in records:
        hold = r.request_id.removeprefix("req-")
        assert (r.status, r.cost_nano, r.estimated, r.hold_id) == ("interrupted", HOLD, True, SWEPT + hold)
        assert (r.team, r.key_id, r.model, r.deployment, r.user, r.tags, r.stream) == \
            (TEAM, "k1", "gpt-x", "d1", "u1", ("t",), True)
        assert (r.input_tokens, r.output_tokens) == (0, 0)
    [total] = asyncio.run(live_ledger.totals(0))
    assert (total["requests"], total["cost_nano"]) == (2, 2 * HOLD)
    for store in (dead_store, live_store):
        asyncio.run(store.aclose())
    dead_ledger.conn.close()
    live_ledger.conn.close()


def test_two_workers_sweeping_at_once_record_each_request_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    dead_store, _, _ = worker(data, dead_worker())

    async def reserve_all() -> None:
        for i in range(40):
            assert (await dead_store.reserve(request(f"h{i}"), lambda i=i: intent(f"h{i}"))).admitted

    asyncio.run(reserve_all())
    sweepers = [worker(data, process_id()) for _ in range(2)]
    counts = sweep_at_once([leases for _, _, leases in sweepers])
    assert sum(counts) == 40 and len(counts) == 2, counts
    store, ledger, _ = sweepers[0]
    records = asyncio.run(ledger.read(0))
    assert len(records) == len({r.request_id for r in records}) == 40
    assert sum(r.cost_nano for r in records) == 40 * HOLD
    assert usage(store) == (40 * HOLD, 0)
    asyncio.run(dead_store.aclose())
    dead_store.conn.close()
    for s, led, _ in sweepers:
        asyncio.run(s.aclose())
        led.conn.close()


def test_holds_of_an_older_schema_have_no_owner_and_are_left_to_the_ttl(tmp_path: Path) -> None:
    data = tmp_path / "data"
    old = connect(data, migrate_to=None)
    migrate(old, 3)
    old.execute("INSERT INTO reservations VALUES (?, 'old', 5, 0, 0, '[]', 9e9)", (TEAM,))
    old.close()
    store, ledger, leases = worker(data, process_id())
    assert store.conn.execute("SELECT worker, intent FROM reservations").fetchall() == [("", None)]
    assert store.owners() == [] and leases.keep() == 0
    asyncio.run(store.aclose())
    ledger.conn.close()


def test_the_state_writes_this_process_and_the_intent_with_a_hold(tmp_path: Path) -> None:
    state = open_state(Settings(data_dir=str(tmp_path / "data")))

    async def run() -> None:
        assert state.process_leases is not None and state.process_leases.store.worker == process_id()
        assert (await state.reserve(request("s1"), lambda: intent("s1"))).admitted
        await state.aclose()

    asyncio.run(run())
    db = sqlite3.connect(tmp_path / "data" / "gateway.db")
    [(owner, raw)] = db.execute("SELECT worker, intent FROM reservations").fetchall()
    db.close()
    assert owner == process_id() and b'"req-s1"' in raw


# --- holds of processes in another PID namespace or on another host: judged by their heartbeat

FOREIGN = "0123456789ab:4242:777"   # a process id of another boot or PID namespace (never judged by PID)


def foreign_holds(data: Path, n: int) -> None:
    """``n`` holds with intents taken by the foreign process, on its own connection."""
    store, ledger, _ = worker(data, FOREIGN)

    async def reserve_all() -> None:
        for i in range(n):
            assert (await store.reserve(request(f"f{i}"), lambda i=i: intent(f"f{i}"))).admitted

    asyncio.run(reserve_all())
    asyncio.run(store.aclose())
    ledger.conn.close()


def heartbeat(data: Path, worker_id: str, at: float) -> None:
    db = connect(data)
    with db:
        db.execute("INSERT OR REPLACE INTO worker_heartbeats VALUES (?, ?)", (worker_id, at))
    db.close()


def test_a_foreign_owner_with_a_stale_heartbeat_is_swept_exactly_once_by_two_sweepers(tmp_path: Path) -> None:
    data = tmp_path / "data"
    foreign_holds(data, 30)
    sweepers = [worker(data, process_id()) for _ in range(2)]
    stale_s = sweepers[0][2].stale_s
    assert stale_s == max(10.0, 5 * sweepers[0][2].every_s)
    heartbeat(data, FOREIGN, time.time() - stale_s - 5)         # it stopped beating a while ago
    store = sweepers[0][0]
    assert usage(store) == (0, 30 * HOLD)
    counts = sweep_at_once([leases for _, _, leases in sweepers])
    assert sorted(counts) == [0, 30], counts                     # one transaction took them all
    assert [leases.keep() for _, _, leases in sweepers] == [0, 0]
    records = asyncio.run(sweepers[0][1].read(0))
    assert sorted(r.request_id for r in records) == sorted(f"req-f{i}" for i in range(30))
    assert all((r.status, r.cost_nano, r.estimated, r.hold_id) ==
               ("interrupted", HOLD, True, SWEPT + r.request_id.removeprefix("req-")) for r in records)
    [total] = asyncio.run(sweepers[0][1].totals(0))
    assert usage(store) == (total["cost_nano"], 0) == (30 * HOLD, 0)   # spend equals the ledger's sum
    beats = dict(store.conn.execute("SELECT worker, at FROM worker_heartbeats").fetchall())
    assert FOREIGN not in beats and process_id() in beats        # the dead one's row went with its holds
    for s, led, _ in sweepers:
        asyncio.run(s.aclose())
        led.conn.close()


@pytest.mark.parametrize("beat", ["fresh", "none"])
def test_a_foreign_owner_with_a_fresh_heartbeat_or_none_keeps_its_holds(beat: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    foreign_holds(data, 3)
    store, ledger, leases = worker(data, process_id())
    if beat == "fresh":
        heartbeat(data, FOREIGN, time.time() - leases.stale_s + 3)   # beaten within the bound
    assert leases.dead() == [] and leases.keep() == 0
    assert usage(store) == (0, 3 * HOLD) and asyncio.run(ledger.read(0)) == []
    if beat == "fresh":   # the same holds once the beat is older than the bound
        later = SqliteLeases(store, ledger, clock=lambda: time.time() + 10)
        assert later.dead() == [FOREIGN] and later.keep() == 3
        assert usage(store) == (3 * HOLD, 0)
    asyncio.run(store.aclose())
    ledger.conn.close()


def test_same_namespace_owners_keep_the_pid_judgement_whatever_their_heartbeat(tmp_path: Path) -> None:
    data = tmp_path / "data"
    parent = process_id(os.getppid())                            # alive, in this namespace, not this process
    assert parent and not is_dead(parent, namespace_tag())
    alive_store, alive_ledger, _ = worker(data, parent)
    store, ledger, leases = worker(data, process_id())

    async def reserve() -> None:
        assert (await alive_store.reserve(request("a1"), lambda: intent("a1"))).admitted

    asyncio.run(reserve())
    heartbeat(data, parent, time.time() - 3600)                   # a stale beat: the PID says it is alive
    assert leases.dead() == [] and leases.keep() == 0
    assert usage(store) == (0, HOLD)
    for s, led in ((alive_store, alive_ledger), (store, ledger)):
        asyncio.run(s.aclose())
        led.conn.close()


def test_keep_beats_and_a_clean_shutdown_removes_the_row(tmp_path: Path) -> None:
    state = open_state(Settings(data_dir=str(tmp_path / "data")))
    assert state.process_leases is not None
    state.process_leases.keep()
    db = sqlite3.connect(tmp_path / "data" / "gateway.db")
    [(owner, at)] = db.execute("SELECT worker, at FROM worker_heartbeats").fetchall()
    assert owner == process_id() and abs(at - time.time()) < 60
    asyncio.run(state.aclose())
    assert db.execute("SELECT COUNT(*) FROM worker_heartbeats").fetchone()[0] == 0
    db.close()


# --- end to end: a worker of ``gateway serve --workers 2`` on one database SIGKILLed mid-load

def in_flight(db: sqlite3.Connection, workers: list[int]) -> tuple[dict[int, int], dict[int, set[int]]]:
    """Per worker PID: how many holds with an intent it has, and their amounts."""
    counts, amounts = dict.fromkeys(workers, 0), {w: set[int]() for w in workers}
    for owner, amount in db.execute("SELECT worker, amount FROM reservations WHERE worker != ''"):
        pid = int(owner.split(":")[1])
        if pid in counts:
            counts[pid] += 1
            amounts[pid].add(int(amount))
    return counts, amounts


@pytest.mark.e2e
def test_a_killed_workers_holds_end_within_seconds_as_interrupted_records(tmp_path: Path, mock_upstream: str) -> None:
    """96 slow streams (12 clients) on 2 workers sharing one database, reservation TTL 900 s; the worker with
    the most requests in flight is SIGKILLed after 20 answers. The other worker's sweep ends its holds: each
    request it had in flight gets one ``interrupted`` record charged exactly its hold, every answer its ``ok``
    record, nothing stays reserved and the budget's spend equals the ledger to the nano-dollar."""
    team = f"w-{uuid.uuid4().hex[:8]}"
    data = tmp_path / "data"
    (tmp_path / "models.yaml").write_text(load_policy(mock_upstream, team))
    keys = SqliteKeyStore(connect(data))
    _, secret = asyncio.run(keys.create(team, "killed"))
    keys.conn.close()
    server = start_gateway(tmp_path, tmp_path / "gateway.log", args=("--workers", "2"),
                           env={"GATEWAY_DATA_DIR": str(data), "GATEWAY_RESERVATION_TTL_S": "900"})
    try:
        workers = worker_pids(server.proc.pid)
        assert len(workers) == 2, workers
        replies, holds, killed, victims = list[Reply](), set[int](), list[float](), list[int]()
        db = sqlite3.connect(data / "gateway.db", timeout=10)

        async def kill_mid_load() -> None:
            for _ in range(100_000):
                if len(replies) >= 20:
                    break
                await asyncio.sleep(0.01)
            for _ in range(2000):                                   # the worker with requests in flight dies
                counts, amounts = in_flight(db, workers)
                victim = max(counts, key=lambda pid: counts[pid])
                if counts[victim]:
                    break
                await asyncio.sleep(0.01)
            holds.update(amounts[victim])
            os.kill(victim, signal.SIGKILL)                         # our own gateway's worker, by PID
            killed.append(time.monotonic())
            victims.append(victim)

        async def run() -> tuple[bool, tuple[dict[str, list[LedgerRecord]], tuple[int, int]]]:
            await asyncio.gather(drive(server.url, secret, 12, 8, replies, model="slow", every=1), kill_mid_load())
            check_db = connect(data)
            store = SqliteBudgetStore(check_db, 900, owns_connection=False)
            ledger = SqliteLedger(check_db, owns_connection=False, group=store.group)
            rule = BudgetRule("team", team, "monthly", LIMIT_USD * USD)

            async def check() -> tuple[bool, tuple[dict[str, list[LedgerRecord]], tuple[int, int]]]:
                grouped: dict[str, list[LedgerRecord]] = {}
                for record in await ledger.read(0, team=team):
                    grouped.setdefault(record.request_id, []).append(record)
                [u] = await store.usage(team, [rule], datetime.now(UTC))
                total = sum(r.cost_nano for v in grouped.values() for r in v)
                done = (u.spent_nano, u.reserved_nano) == (total, 0) and \
                    {r.request_id for r in answered if r.request_id} <= grouped.keys()
                return done, (grouped, (u.spent_nano, u.reserved_nano))

            answered = [r for r in replies if r.status and r.complete]
            try:
                return await wait_for(check, 60)
            finally:
                check_db.close()

        done, (records, (spent, reserved)) = asyncio.run(run())
        settled_after_s = time.monotonic() - killed[0]
        db.close()
    finally:
        stop(server.proc)
    answered = [r for r in replies if r.status and r.complete]
    lost = [r for r in replies if not (r.status and r.complete)]
    assert done, (spent, reserved, len(records))
    assert reserved == 0 and settled_after_s < 120         # swept, not waiting out the 900 s TTL
    assert len(answered) + len(lost) == 96 and len(answered) >= 20 and victims[0] in workers
    assert all(r.status == 200 and r.request_id for r in answered)
    doubled = {i: len(v) for i, v in records.items() if len(v) != 1}
    assert not doubled, doubled
    assert spent == sum(v[0].cost_nano for v in records.values())   # the budget equals the ledger's sum
    assert all(records[r.request_id][0].status == "ok" and records[r.request_id][0].cost_nano == ANSWER_NANO
               for r in answered if r.request_id)
    interrupted = [v[0] for v in records.values() if v[0].status == "interrupted"]
    assert interrupted, "no request was in flight on the killed worker"
    assert len(holds) == 1, holds                            # alike requests: one hold amount
    [hold] = holds
    assert hold > ANSWER_NANO                                # the worst case, not what an answer costs
    assert all(r.cost_nano == hold and r.estimated and r.hold_id.startswith(SWEPT) for r in interrupted)
    assert not {r.request_id for r in interrupted} & {r.request_id for r in answered}
    assert len(interrupted) <= len(lost)
    others = [v[0] for v in records.values() if v[0].status != "interrupted"]
    assert all(r.status == "ok" and r.cost_nano == ANSWER_NANO for r in others)
