"""Embedded state in SQLite (``GATEWAY_DATA_DIR``): the schema's versions and forward migrations, keys,
the ledger and its rollups against the memory ledger, group commit, budgets shared by OS processes,
and end to end: a gateway SIGKILLed and started again keeps every key, its budget's spend and the
whole history; two gateways on one database never overspend; ``keys``/``spend``/``ledger export``
work on the data directory with no master key. (The budget semantics themselves run on SQLite in
tests/test_budgets.py, through the ``h`` harness.)"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import multiprocessing
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, GatewayFactory, Server, mock_policy, stop
from gateway.settings import Settings
from gateway.state import open_state
from gateway.state.budgets import BudgetRule, RateRule, ReserveRequest, StateUnavailable
from gateway.state.budgets_sqlite import SqliteBudgetStore
from gateway.state.keys import hash_secret
from gateway.state.keys_sqlite import SqliteKeyStore
from gateway.state.ledger import DAY_S, LedgerRecord, MemoryLedger
from gateway.state.ledger_sqlite import SqliteLedger
from gateway.state.sqlite_db import MIGRATIONS, SCHEMA_VERSION, SchemaError, connect, db_path, migrate, version

USD = 1_000_000_000
SECRET = re.compile(r"sk-gw-[A-Za-z0-9_-]{20,}")
KEY_ID = re.compile(r"key_[0-9a-f]{12}")


# --- schema ----------------------------------------------------------------------------------------

def test_a_new_database_is_at_the_latest_version(tmp_path: Path) -> None:
    db = connect(tmp_path)
    try:
        assert version(db) == SCHEMA_VERSION == len(MIGRATIONS) >= 2
        assert [r[0] for r in db.execute("SELECT version FROM schema_version ORDER BY version")] == \
            list(range(1, SCHEMA_VERSION + 1))
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 1   # NORMAL
    finally:
        db.close()
    assert oct(db_path(tmp_path).stat().st_mode & 0o777) == "0o600"
    assert connect(tmp_path).execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == SCHEMA_VERSION


async def test_forward_migration_keeps_the_data_of_an_older_schema(tmp_path: Path) -> None:
    old = connect(tmp_path, migrate_to=None)
    assert migrate(old, 1) == 1 and version(old) == 1
    assert "ledger_team_ts" not in {r[0] for r in old.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    keys = SqliteKeyStore(old)
    record, secret = await keys.create("alpha", "before")
    await SqliteLedger(old, owns_connection=False).append([rec("r1", 1_800_000_000.0, "alpha", cost=7)])
    old.close()

    db = connect(tmp_path)   # what a newer gateway does on start
    try:
        assert version(db) == SCHEMA_VERSION
        assert "ledger_team_ts" in {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert await SqliteKeyStore(db, owns_connection=False).lookup(secret) == record
        [row] = await SqliteLedger(db, owns_connection=False).totals(0)
        assert (row["key"], row["requests"], row["cost_nano"]) == ("alpha", 1, 7)
    finally:
        db.close()


@pytest.mark.e2e
def test_a_database_from_a_newer_gateway_is_refused(tmp_path: Path) -> None:
    db = connect(tmp_path)
    db.execute("INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    db.close()
    with pytest.raises(SchemaError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this gateway"):
        connect(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | {"GATEWAY_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "gateway", "keys", "list"], env=env, capture_output=True, text=True,
                         cwd=str(ROOT), timeout=60)
    assert out.returncode == 1 and "newer than this gateway" in out.stderr and "Traceback" not in out.stderr


def test_concurrent_opens_apply_each_migration_once(tmp_path: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        conns = list(pool.map(lambda _: connect(tmp_path), range(4)))
    try:
        assert [r[0] for r in conns[0].execute("SELECT version FROM schema_version ORDER BY version")] == \
            list(range(1, SCHEMA_VERSION + 1))
    finally:
        for c in conns:
            c.close()


# --- keys and ledger ---------------------------------------------------------------------------------

async def test_keys_store_only_the_hash(tmp_path: Path) -> None:
    store = SqliteKeyStore(connect(tmp_path))
    assert not await store.has_keys()
    a, secret_a = await store.create("alpha", "one", budget_usd="0.5", budget_period="daily", rpm=10)
    b, _ = await store.create("beta", "two")
    assert await store.has_keys()
    assert await store.lookup(secret_a) == a and await store.lookup("sk-gw-nope") is None
    assert await store.get(b.id) == b and await store.get("key_missing") is None
    assert [k.id for k in await store.list()] == [a.id, b.id] and await store.list("beta") == [b]
    assert await store.revoke(a.id) and not await store.revoke(a.id) and not await store.revoke("key_missing")
    revoked = await store.lookup(secret_a)
    assert revoked is not None and not revoked.active(time.time())
    await store.aclose()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert secret_a.encode() not in raw and hash_secret(secret_a).encode() in raw


def rec(rid: str, ts: float, team: str, model: str = "m1", cost: int = 1_000, savings: int = 0) -> LedgerRecord:
    return LedgerRecord(rid, ts, team, None, model, model, f"dep/{model}", "openai", "default", 10, 20,
                        cost_nano=cost, baseline_nano=cost + savings, savings={"routing": savings} if savings else {})


async def test_ledger_totals_equal_the_memory_ledgers_for_every_grouping_and_range(tmp_path: Path) -> None:
    day0 = 20_000 * DAY_S
    records = [rec(f"r{i}", day0 + i * 7_919.5, ("alpha", "beta")[i % 2], ("m1", "m2", "m3")[i % 3],
                   cost=1_000 + i, savings=i % 4) for i in range(60)]   # about 5.5 days of records
    sqlite_ledger = SqliteLedger(connect(tmp_path))
    memory = MemoryLedger()
    for start in range(0, 60, 7):   # in batches, as the buffered writer sends them
        await sqlite_ledger.append(records[start:start + 7])
        await memory.append(records[start:start + 7])
    ranges = [(0, None), (day0 + 3_000, None), (day0 + DAY_S, day0 + 3 * DAY_S), (day0 + 5_000, day0 + 4.5 * DAY_S),
              (day0 + 1_000, day0 + 9_000)]
    for since, until in ranges:
        for team in (None, "alpha"):
            for by in ("team", "model", "day"):
                got = await sqlite_ledger.totals(since, until, team, by)
                assert got == await memory.totals(since, until, team, by), (since, until, team, by)
                assert sum(r["requests"] for r in got) == len([r for r in records if since <= r.ts and
                                                              (until is None or r.ts < until) and
                                                              (team is None or r.team == team)])
    assert await sqlite_ledger.read(day0 + 1_000, day0 + 20_000, "beta") == \
        [r for r in records if day0 + 1_000 <= r.ts < day0 + 20_000 and r.team == "beta"]
    await sqlite_ledger.aclose()


async def test_read_pages_through_the_whole_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.state.ledger_sqlite as ledger_sqlite

    monkeypatch.setattr(ledger_sqlite, "_PAGE", 3)
    ledger = SqliteLedger(connect(tmp_path))
    same_ts = [rec(f"s{i}", 1_800_000_000.0, "alpha") for i in range(5)]   # equal stamps across a page boundary
    later = [rec(f"l{i}", 1_800_000_001.0 + i, "alpha") for i in range(6)]
    await ledger.append(later[3:] + same_ts)
    await ledger.append(later[:3])
    assert [r.request_id for r in await ledger.read(0)] == [r.request_id for r in same_ts + later]
    await ledger.aclose()


async def test_settles_are_on_disk_when_they_return_and_finish_commits_the_record_with_them(tmp_path: Path) -> None:
    state = open_state(Settings(data_dir=str(tmp_path)))
    assert state.backend == "sqlite" and state.group is not None
    rule = BudgetRule("team", "alpha", "daily", USD)
    reqs = [ReserveRequest(f"g{i}", "alpha", 5_000, 10, (rule,), (), datetime.now(UTC)) for i in range(4)]
    other = sqlite3.connect(db_path(tmp_path))   # another process's view, as after a SIGKILL

    def seen() -> tuple[int, int, int]:
        spent, reserved = other.execute("SELECT spent, reserved FROM budget_buckets").fetchone()
        return other.execute("SELECT COUNT(*) FROM ledger").fetchone()[0], spent, reserved

    try:
        for r in reqs:
            assert (await state.reserve(r)).admitted   # a transaction each, committed at once
        assert seen() == (0, 0, 20_000)
        # concurrent settles share one commit, and each is on disk when it returns
        await asyncio.gather(state.settle(reqs[0], 1_000, 10), state.settle(reqs[1], 1_001, 10))
        assert seen() == (0, 2_001, 10_000)
        state.record(rec("g0", time.time(), "alpha"))   # the pipeline's record: queued ...
        assert seen()[0] == 0 and state.pending == 1
        await asyncio.sleep(0)
        assert seen()[0] == 0                            # ... not at once: in a batch ...
        await asyncio.sleep(0.1)                         # ... within 10 ms (GroupCommit.delay_s)
        assert seen()[0] == 1 and state.pending == 0
        # finish: the settle and the record in one commit, done before it returns
        await state.finish(reqs[2], 3_000, 10, rec("g2", time.time(), "alpha"))
        assert seen() == (2, 5_001, 5_000)
        await state.finish(None, 0, 0, rec("refused", time.time(), "alpha"))   # a request that reserved nothing
        assert seen() == (3, 5_001, 5_000)
        await state.settle(reqs[0], 1_000, 10)   # a second settle of the same request changes nothing
        assert seen() == (3, 5_001, 5_000)
    finally:
        await state.aclose()
        other.close()


async def test_concurrent_reserves_share_a_transaction_and_never_overspend(tmp_path: Path) -> None:
    """30 reserves of $0.05 and their settles queued together against a $1.00 daily budget: one
    transaction decides every reserve of the batch in order, so exactly 20 are admitted whole
    and the settled spend is $1.00 to the nano-dollar; the batch cost one commit, not one per reserve."""
    state = open_state(Settings(data_dir=str(tmp_path)))
    assert state.db is not None and state.group is not None
    rule = BudgetRule("team", "alpha", "daily", USD)
    reqs = [ReserveRequest(f"b{i}", "alpha", 50_000_000, 10, (rule,), (), datetime.now(UTC)) for i in range(30)]
    other = sqlite3.connect(db_path(tmp_path))
    commits = 0
    transaction = state.group.transaction

    def counting():  # type: ignore[no-untyped-def]
        nonlocal commits
        commits += 1
        return transaction()

    state.group.transaction = counting  # type: ignore[method-assign]
    try:
        admissions = await asyncio.gather(*(state.reserve(r) for r in reqs))
        assert commits == 1
        admitted = [r for r, a in zip(reqs, admissions, strict=True) if a.admitted]
        assert [r.request_id for r in admitted] == [f"b{i}" for i in range(20)]
        assert all(a.reserved_nano == 50_000_000 for a in admissions[:20])
        assert admissions[19].remaining_nano == 0 and admissions[20].refusal is not None
        assert other.execute("SELECT spent, reserved FROM budget_buckets").fetchone() == (0, USD)
        assert other.execute("SELECT COUNT(*) FROM reservations").fetchone()[0] == 20
        await asyncio.gather(*(state.settle(r, 49_999_999, 10) for r in admitted))
        assert other.execute("SELECT spent, reserved FROM budget_buckets").fetchone() == (20 * 49_999_999, 0)
        assert other.execute("SELECT COUNT(*) FROM reservations").fetchone()[0] == 0
    finally:
        await state.aclose()
        other.close()


async def test_a_batch_of_settles_spends_and_corrects_tpm_once_per_bucket(tmp_path: Path) -> None:
    """Three holds of $0.40 (300 estimated tokens each) on a $1.50 team budget with a 1,000 TPM limit,
    reserved together, then settled together at $0.10, $0.20 and $0.30 and 100 tokens each: one
    transaction writes the spend ($0.60 to the nano-dollar), releases every hold and replaces the
    900 estimated tokens by the 300 used, so a reserve of 700 tokens fits the minute again."""
    t = [1_800_000_005.0]
    store = SqliteBudgetStore(connect(tmp_path), clock=lambda: t[0])
    rule = BudgetRule("team", "alpha", "daily", 1_500_000_000)
    rates = (RateRule("team", "alpha", None, 1_000),)
    now = datetime.now(UTC)
    reqs = [ReserveRequest(f"s{i}", "alpha", 400_000_000, 300, (rule,), rates, now) for i in range(3)]
    other = sqlite3.connect(db_path(tmp_path))
    try:
        assert all(a.admitted for a in await asyncio.gather(*(store.reserve(r) for r in reqs)))
        assert other.execute("SELECT spent, reserved FROM budget_buckets").fetchone() == (0, 1_200_000_000)
        assert other.execute("SELECT requests, tokens FROM rate_windows").fetchone() == (3, 900)
        await asyncio.gather(*(store.settle(r, (i + 1) * 100_000_000, 100) for i, r in enumerate(reqs)))
        assert other.execute("SELECT spent, reserved FROM budget_buckets").fetchone() == (600_000_000, 0)
        assert other.execute("SELECT requests, tokens FROM rate_windows").fetchone() == (3, 300)
        fits = await store.reserve(ReserveRequest("s3", "alpha", 0, 700, (rule,), rates, now))
        assert fits.admitted and fits.rate.remaining_tokens == 0
    finally:
        await store.aclose()
        other.close()


async def test_a_failed_batch_fails_its_reserves_and_keeps_its_settles(tmp_path: Path) -> None:
    """Another connection holds the write lock: the batch's reserves raise StateUnavailable at once
    (the fail mode decides), the settle queued with them stays queued and is written by the next
    transaction, exactly once; a reserve whose caller was cancelled while it waited takes no hold."""
    store = SqliteBudgetStore(connect(tmp_path))
    rule = BudgetRule("team", "alpha", "daily", USD)
    now = datetime.now(UTC)
    first, second, third = (ReserveRequest(f"f{i}", "alpha", 100_000_000, 10, (rule,), (), now) for i in range(3))
    other = sqlite3.connect(db_path(tmp_path), isolation_level=None, timeout=0)
    try:
        assert (await store.reserve(first)).admitted
        store.conn.execute("PRAGMA busy_timeout = 0")   # do not wait 5 s for the lock below
        other.execute("BEGIN IMMEDIATE")
        settle = asyncio.ensure_future(store.settle(first, 30_000_000, 10))
        with pytest.raises(StateUnavailable):
            await store.reserve(second)
        with pytest.raises(StateUnavailable):
            await settle
        assert store.queued == 1   # the settle waits for the next transaction
        other.execute("ROLLBACK")
        assert (await store.reserve(second)).admitted   # carries the settle
        assert other.execute("SELECT spent, reserved FROM budget_buckets").fetchone() == (30_000_000, 100_000_000)
        waiting = asyncio.ensure_future(store.reserve(third))
        await asyncio.sleep(0)      # queued: the commit runs at the end of this iteration ...
        waiting.cancel()            # ... and its caller is gone by then
        with pytest.raises(asyncio.CancelledError):
            await waiting
        store.flush()
        assert store.queued == 0
        assert other.execute("SELECT spent, reserved FROM budget_buckets").fetchone() == (30_000_000, 100_000_000)
        assert other.execute("SELECT request_id FROM reservations").fetchall() == [("f1",)]
    finally:
        await store.aclose()
        other.close()


def test_the_memory_mode_stays_in_memory(tmp_path: Path) -> None:
    state = open_state(Settings(data_dir=":memory:"))
    assert state.backend == "memory" and state.db is None and state.group is None


# --- budgets across processes -----------------------------------------------------------------------

@pytest.mark.e2e
def test_many_processes_share_one_sqlite_budget_exactly(tmp_path: Path) -> None:
    """4 OS processes, 200 simultaneous $0.05 requests against $1 in one database: exactly 20 admitted."""
    from sqlite_workers import sqlite_budget_worker

    team = f"team-{uuid.uuid4().hex[:8]}"
    connect(tmp_path).close()
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=sqlite_budget_worker, args=(str(tmp_path), team, 50, w, barrier, out))
             for w in range(4)]
    for p in procs:
        p.start()
    counts: list[int] = []
    rule = BudgetRule("team", team, "daily", USD)
    sampler = SqliteBudgetStore(connect(tmp_path))
    try:
        for _ in range(12_000):   # <= ~120 s; sample the bucket while the workers run
            [u] = asyncio.run(sampler.usage(team, [rule], datetime.now(UTC)))
            assert u.spent_nano <= USD and u.spent_nano + u.reserved_nano <= USD, u
            while not out.empty():
                counts.append(out.get())
            if len(counts) == len(procs):
                break
            time.sleep(0.01)
        [u] = asyncio.run(sampler.usage(team, [rule], datetime.now(UTC)))
    finally:
        asyncio.run(sampler.aclose())
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
                p.join(5)
    assert len(counts) == 4 and sum(counts) == 20, counts
    assert all(p.exitcode == 0 for p in procs)
    assert (u.spent_nano, u.reserved_nano) == (USD, 0)


# --- end to end ---------------------------------------------------------------------------------------

def cli(*args: str, data_dir: Path) -> str:
    """``python -m gateway ...`` on the data directory, with no master key and nothing else set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | {"GATEWAY_DATA_DIR": str(data_dir)}
    proc = subprocess.run([sys.executable, "-m", "gateway", *args], cwd=str(ROOT), env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stdout, proc.stderr)
    return proc.stdout


def chat(server: Server, secret: str, rid_log: list[str], costs: list[Decimal]) -> httpx.Response:
    reply = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                       json={"model": "mock", "messages": [{"role": "user", "content": "a few words here"}],
                             "max_tokens": 20}, timeout=30)
    if reply.status_code == 200:
        rid_log.append(reply.headers["x-request-id"])
        costs.append(Decimal(str(reply.json()["usage"]["cost_usd"])))
    return reply


def key_usage(data_dir: Path, key_id: str, limit_nano: int) -> tuple[int, int]:
    async def go() -> tuple[int, int]:
        store = SqliteBudgetStore(connect(data_dir))
        try:
            [u] = await store.usage("alpha", [BudgetRule("key", key_id, "daily", limit_nano)], datetime.now(UTC))
            return u.spent_nano, u.reserved_nano
        finally:
            await store.aclose()
    return asyncio.run(go())


def nano(costs: list[Decimal]) -> int:
    return int(sum(costs, Decimal(0)) * USD)


def test_sigkill_and_restart_keep_keys_spend_history_and_the_budget(gateway: GatewayFactory, mock_reset: str,
                                                                    tmp_path: Path) -> None:
    data = tmp_path / "data"
    limit = Decimal("0.0004")
    out = cli("keys", "create", "--team", "alpha", "--budget-usd", str(limit), "--budget-period", "daily",
              data_dir=data)
    [secret], [key_id] = SECRET.findall(out), list(set(KEY_ID.findall(out)))
    policy = mock_policy(mock_reset) + "teams:\n  alpha: {}\n"
    env = {"GATEWAY_DATA_DIR": str(data)}
    first = gateway(policy, env=env)
    rids: list[str] = []
    costs: list[Decimal] = []
    for _ in range(4):
        assert chat(first, secret, rids, costs).status_code == 200
    # A settle is on disk before its answer is sent; the ledger record follows within 10 ms (in the
    # settle's own commit once the pipeline calls State.finish): let it land first.
    db = sqlite3.connect(db_path(data))
    deadline = time.monotonic() + 10
    while db.execute("SELECT COUNT(*) FROM ledger").fetchone()[0] < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    db.close()
    first.proc.kill()   # SIGKILL right after the last answer: no shutdown, no flush
    first.proc.wait(10)
    spent_before = nano(costs)
    assert key_usage(data, key_id, int(limit * USD)) == (spent_before, 0)   # every settle, the last one too
    assert 0 < spent_before < int(limit * USD)

    # the data directory alone, with the gateway dead: the key, the spend, every record
    keys = json.loads(cli("keys", "list", "--json", data_dir=data))
    assert [(k["id"], k["status"]) for k in keys] == [(key_id, "active")]
    assert key_usage(data, key_id, int(limit * USD)) == (spent_before, 0)
    report = json.loads(cli("spend", "--format", "json", data_dir=data))
    assert (report["total"]["requests"], report["total"]["cost_nano"]) == (4, spent_before)
    exported = [json.loads(line) for line in cli("ledger", "export", "--format", "jsonl", data_dir=data).splitlines()]
    assert [r["request_id"] for r in exported] == rids and sum(r["cost_nano"] for r in exported) == spent_before
    second = gateway(policy, env=env)
    refused = None
    for _ in range(100):   # the same key works, on the same budget, until the budget refuses
        reply = chat(second, secret, rids, costs)
        if reply.status_code != 200:
            refused = reply
            break
    assert refused is not None and refused.status_code == 429, refused
    assert refused.json()["error"]["code"] == "budget_exceeded"
    assert len(costs) > 4   # the restart did not start the budget over, nor lose it
    spent, reserved = key_usage(data, key_id, int(limit * USD))
    assert spent == nano(costs) <= int(limit * USD) and reserved == 0
    stop(second.proc)   # a clean shutdown this time: what was queued is written
    report = json.loads(cli("spend", "--format", "json", data_dir=data))
    assert (report["total"]["requests"], report["total"]["cost_nano"]) == (len(costs) + 1, nano(costs))  # + the 429
    rows = list(csv.DictReader(io.StringIO(cli("ledger", "export", "--format", "csv", data_dir=data))))
    assert [r["request_id"] for r in rows if r["status"] == "ok"] == rids
    assert [r["status"] for r in rows][-1] == "budget_exceeded"
    assert sum(int(r["cost_nano"]) for r in rows) == nano(costs)
    assert all(Decimal(r["cost_usd"]) * USD == int(r["cost_nano"]) for r in rows)


def test_two_gateways_on_one_database_never_overspend(gateway: GatewayFactory, mock_reset: str,
                                                      tmp_path: Path) -> None:
    """Two processes (as ``--workers 2`` runs them) share one budget: 60 concurrent requests against a
    budget that pays for about 20; what is settled never passes the limit and equals what clients paid."""
    data = tmp_path / "data"
    out = cli("keys", "create", "--team", "alpha", "--budget-usd", "0.0002", "--budget-period", "daily",
              data_dir=data)
    [secret], [key_id] = SECRET.findall(out), list(set(KEY_ID.findall(out)))
    policy = mock_policy(mock_reset) + "teams:\n  alpha: {}\n"
    servers = [gateway(policy, env={"GATEWAY_DATA_DIR": str(data)}) for _ in range(2)]
    rids: list[str] = []
    costs: list[Decimal] = []
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: chat(servers[i % 2], secret, rids, costs), range(60)))
    statuses = {r.status_code for r in replies}
    assert statuses <= {200, 429} and 429 in statuses and 200 in statuses, statuses
    assert all(r.json()["error"]["code"] == "budget_exceeded" for r in replies if r.status_code == 429)
    spent, reserved = key_usage(data, key_id, 200_000)
    assert spent == nano(costs) <= 200_000 and reserved == 0
    deadline = time.monotonic() + 10
    while (report := json.loads(cli("spend", "--format", "json", data_dir=data)))["total"]["requests"] < 60:
        assert time.monotonic() < deadline, report
        time.sleep(0.2)
    assert report["total"]["requests"] == 60 and report["total"]["cost_nano"] == spent


def test_export_on_the_api_for_memory_state_and_its_errors(gateway: GatewayFactory, mock_reset: str) -> None:
    from admin_helpers import MASTER, admin

    server = gateway(mock_policy(mock_reset), env={"GATEWAY_MASTER_KEY": MASTER})   # GATEWAY_DATA_DIR=:memory:
    rids: list[str] = []
    costs: list[Decimal] = []
    for _ in range(3):
        assert chat(server, MASTER, rids, costs).status_code == 200
    reply = admin(server, "GET", "/admin/ledger/export", params={"since": "1h", "format": "jsonl"})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/x-ndjson")
    assert [json.loads(line)["request_id"] for line in reply.text.splitlines()] == rids
    reply = admin(server, "GET", "/admin/ledger/export", params={"format": "csv", "until": "1m"})
    assert reply.status_code == 200 and reply.text.splitlines()[0].startswith("time,request_id,ts,team")
    for params, param in (({"format": "xml"}, "format"), ({"since": "yesterday"}, "since"),
                          ({"since": "1h", "until": "2h"}, "until"), ({"sort": "ts"}, "sort")):
        bad = admin(server, "GET", "/admin/ledger/export", params=params)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, (params, bad.text)
    assert admin(server, "GET", "/admin/ledger/export", key="wrong").status_code == 401


def test_export_on_redis_directly_and_bad_arguments(redis_port: int) -> None:
    """``gateway ledger export`` with GATEWAY_REDIS_URL reads the stream directly; bad arguments exit 2."""
    from redis.asyncio import Redis

    from gateway.state.ledger import RedisLedger

    team = f"team-{uuid.uuid4().hex[:8]}"
    now = time.time()
    records = [rec(f"x{i}", now - 60 + i, team, cost=1_000 + i, savings=i) for i in range(5)]

    async def write() -> None:
        client = Redis(host="127.0.0.1", port=redis_port, db=11)   # this test's own database
        await client.flushdb()
        await RedisLedger(client).append(records)
        await client.aclose()

    asyncio.run(write())
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | \
        {"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/11"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", "ledger", "export", *args], cwd=str(ROOT), env=env,
                              capture_output=True, text=True, timeout=60)

    out = run("--since", "1h", "--team", team)
    assert out.returncode == 0, out.stderr
    assert [LedgerRecord.from_json(line) for line in out.stdout.splitlines()] == records
    out = run("--since", "1h", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["request_id"] for r in rows] == [r.request_id for r in records]
    assert [json.loads(r["savings"]) for r in rows] == [r.savings for r in records]
    assert [r["cost_usd"] for r in rows] == ["0.000001", "0.000001001", "0.000001002", "0.000001003", "0.000001004"]
    later = run("--since", datetime.fromtimestamp(now - 58.5, UTC).isoformat(), "--team", team)
    assert [json.loads(line)["request_id"] for line in later.stdout.splitlines()] == ["x2", "x3", "x4"]
    for args, says in ((("--since", "yesterday"), "since must be"), (("--since", "1h", "--until", "2h"),
                                                                    "until must be later than since")):
        bad = run(*args)
        assert bad.returncode == 2 and bad.stdout == "" and says in bad.stderr and "Traceback" not in bad.stderr, \
            bad.stderr


async def test_checkpoints_run_off_the_serving_connection(tmp_path: Path) -> None:
    state = open_state(Settings(data_dir=str(tmp_path)))
    try:
        assert state.db is not None and state.checkpointer is not None
        assert state.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0   # never on the event loop
        ledger = SqliteLedger(state.db, owns_connection=False)
        await ledger.append([rec(f"c{i}", 1_800_000_000.0 + i, "alpha") for i in range(200)])
        busy, frames, done = state.checkpointer.run_once()   # what the checkpoint thread does every second
        assert (busy, done) == (0, frames) and frames > 0
    finally:
        await state.aclose()
    assert not (tmp_path / "gateway.db-wal").exists()         # the last connection closed cleanly


async def test_random_operations_give_the_memory_stores_answers(tmp_path: Path) -> None:
    """The same random reserves (partial and strict, soft thresholds, RPM/TPM, repeats), settles (repeated,
    late, over the hold), renewals and clock jumps past the reservation TTL on both stores, for several
    seeds: every answer is the same, and the runs went through every kind of answer."""
    seen: set[str] = set()
    for seed in range(8):
        seen |= await random_run(tmp_path / str(seed), seed)
    assert {"admitted", "partial", "budget", "budget_soft", "rate_requests", "rate_tokens", "renewed True",
            "renewed False"} <= seen, seen


async def random_run(tmp_path: Path, seed: int) -> set[str]:
    import random

    from redis_fixtures import FakeClock

    from gateway.state.budgets import RateRule
    from gateway.state.budgets_memory import MemoryBudgetStore

    rnd = random.Random(seed)
    clock = FakeClock()
    memory = MemoryBudgetStore(5.0, clock=clock)
    sqlite_store = SqliteBudgetStore(connect(tmp_path), 5.0, clock=clock)
    sqlite_store.lapse_every_s = 0.0   # exact lapses, as the memory store purges on every access
    teams = ("alpha", "beta")
    budgets = {"alpha": (BudgetRule("team", "alpha", "daily", 40_000, 30_000),
                         BudgetRule("key", "k1", "monthly", 25_000)),
               "beta": (BudgetRule("team", "beta", "weekly", 60_000),)}
    rates = {"alpha": (RateRule("team", "alpha", 4, 5_000),), "beta": (RateRule("key", "k2", None, 2_000),)}
    issued: list[ReserveRequest] = []
    seen: set[str] = set()   # the outcomes the run went through: it must cover the interesting ones
    for step in range(600):
        op = rnd.random()
        if op < 0.45 or not issued:
            team = rnd.choice(teams)
            if issued and rnd.random() < 0.1:
                r = rnd.choice(issued)   # a repeated reserve
            else:
                r = ReserveRequest(f"q{step}", team, rnd.randrange(0, 9_000), rnd.randrange(0, 900), budgets[team],
                                   rates[team], datetime(2026, 11, 23, tzinfo=UTC), rnd.randrange(0, 500),
                                   rnd.random() < 0.8)
                issued.append(r)
            admission = await sqlite_store.reserve(r)
            assert admission == await memory.reserve(r), (seed, step)
            seen.add(admission.refusal.kind if admission.refusal else
                     "partial" if 0 < admission.reserved_nano < r.cost_nano else "admitted")
        elif op < 0.8:
            r = rnd.choice(issued)
            cost, tokens = rnd.randrange(0, r.cost_nano + 2), rnd.randrange(0, 900)   # at times over the hold
            await memory.settle(r, cost, tokens)
            await sqlite_store.settle(r, cost, tokens)
        elif op < 0.9:
            r = rnd.choice(issued)
            alive = await sqlite_store.renew(r)
            assert alive == await memory.renew(r), (seed, step)
            seen.add(f"renewed {alive}")
        else:
            clock.t += rnd.choice((0.5, 2.0, 6.0, 61.0))
        for team in teams:
            now = datetime(2026, 11, 23, tzinfo=UTC)
            assert await sqlite_store.usage(team, budgets[team], now) == await memory.usage(team, budgets[team], now)
    await sqlite_store.aclose()
    return seen


async def test_export_is_rendered_a_chunk_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.state.ledger_sqlite as ledger_sqlite
    from gateway.admin.export import export, export_chunks, render, render_chunks

    records = [rec(f"e{i}", time.time() - 100 + i, "alpha", cost=10 + i) for i in range(5)]
    for fmt in ("csv", "jsonl"):
        chunks = list(render_chunks(records, fmt, chunk=2))
        assert len(chunks) == 3 and "".join(chunks) == render(records, fmt)
    monkeypatch.setattr(ledger_sqlite, "_PAGE", 2)   # SQLite pages through the range as it renders
    ledger = SqliteLedger(connect(tmp_path))
    await ledger.append(records)
    text = await export(ledger, None, "1h", None, "jsonl")
    assert [LedgerRecord.from_json(line) for line in text.splitlines()] == records
    assert "".join([c async for c in export_chunks(ledger, "alpha", "1h", None, "csv")]) == render(records, "csv")
    await ledger.aclose()
