"""The ledger's disk spool (``GATEWAY_SPOOL_DIR``): records the shared ledger cannot take wait on local
disk, nothing is dropped however long Redis is away, and a gateway killed during the outage loses
nothing: the next process adopts its spool and writes it. Real files, a real private redis-server
and real gateway processes, killed by PID.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import redis
from redis.asyncio import Redis
from redis_fixtures import RedisProc, free_port
from test_budgets_e2e import CENTS_5, ask, client_for, ledger_records, new_key, policy, team_name
from test_keys_ledger import FlakyLedger, make_records

from conftest import GatewayFactory
from gateway.state.ledger import BufferedLedger, LedgerRecord
from gateway.state.spool import Spool


def ids(records: list[LedgerRecord]) -> list[str]:
    return [r.request_id for r in records]


def test_spill_read_back_truncate_and_a_torn_line(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    records = make_records(6)
    spool.spill([records[:2], records[2:5]])
    assert spool.records == 5 and spool.path.read_bytes().count(b"\n") == 2
    first = spool.next_batch()
    assert first is not None and ids(first) == ["r0", "r1"] and first == records[:2]   # every field back
    assert spool.next_batch() == first                       # not written yet: offered again
    spool.written(first)
    second = spool.next_batch()
    assert second is not None and ids(second) == ["r2", "r3", "r4"] and spool.records == 3
    spool.written(second)
    assert spool.next_batch() is None and spool.records == 0 and spool.path.stat().st_size == 0
    with open(spool.path, "ab") as fh:                       # a crash in the middle of a write
        fh.write(b'[{"request_id": "half')
    assert spool.next_batch() is None
    spool.close()


def test_a_live_spool_is_never_adopted_and_a_dead_one_is(tmp_path: Path) -> None:
    alive, dead = Spool(tmp_path), Spool(tmp_path)
    alive.spill([make_records(2, tag="a")])
    dead.spill([make_records(3, tag="d")])
    dead.close()                                             # its process is gone; its records are not
    assert dead.path.exists()
    heir = Spool(tmp_path)
    assert heir.adopt() == 3                                 # the dead one's, not the live one's (locked)
    assert not dead.path.exists() and alive.path.exists()
    batch = heir.next_batch()
    assert batch is not None and ids(batch) == ["d0", "d1", "d2"]
    heir.written(batch)
    heir.close()
    alive.close()
    assert not heir.path.exists() and alive.path.exists()   # an empty spool goes, a full one stays


async def test_buffered_ledger_spools_instead_of_dropping(tmp_path: Path) -> None:
    inner = FlakyLedger()
    buf = BufferedLedger(inner, max_buffer=4, spool=Spool(tmp_path))
    records = make_records(30)
    await buf.append(records[:2])
    inner.fail = redis.exceptions.ConnectionError("down")
    for i in range(2, 30, 2):
        await buf.append(records[i:i + 2])                 # far past max_buffer: onto the disk
    assert buf.dropped == 0 and buf.pending == 28
    assert buf.spool is not None and buf.spool.records >= 24 and buf._pending <= 4
    assert await buf.flush() == 0 and buf.pending == 28
    inner.fail = None
    assert await buf.flush() == 28 and buf.pending == 0 and buf.spool.records == 0
    written = [LedgerRecord.from_json(raw).request_id for raw in inner._records]
    assert written == [f"r{i}" for i in range(30)]          # each once, oldest first
    await buf.aclose()


async def test_a_gateway_killed_during_an_outage_loses_no_record(
        gateway: GatewayFactory, mock_reset: str, tmp_path: Path) -> None:
    port = free_port()
    rdir, spool_dir = tmp_path / "redis", tmp_path / "spool"
    aof = ("--appendonly", "yes", "--appendfsync", "always")
    redis_proc = RedisProc(port, rdir, *aof)
    team = team_name()
    env = {"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{port}/0", "GATEWAY_REDIS_FAIL_MODE": "allow",
           "GATEWAY_SPOOL_DIR": str(spool_dir)}
    text = policy(mock_reset, f"  {team}: {{budgets: [{{period: monthly, usd: 1000}}]}}")
    try:
        _, secret = await new_key(port, team)
        since = time.time() - 1
        first = gateway(text, env=env)
        client = client_for(first, secret)
        assert (await ask(client))[0] == "ok"                # the key is cached now
        rc = Redis(host="127.0.0.1", port=port)
        assert len(await ledger_records(rc, since, team, 1)) == 1   # and its record written
        await rc.aclose()
        redis_proc.stop()
        results: list[tuple[str, Any]] = [await ask(client, stream=i % 3 == 0) for i in range(12)]
        assert all(r[0] == "ok" for r in results)            # fail mode "allow": admitted, unmetered
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:                   # bounded: the writer spills within a flush
            spooled = b"".join(p.read_bytes() for p in spool_dir.glob("spool-*.jsonl"))
            if spooled.count(b'"request_id"') >= 12:
                break
            await asyncio.sleep(0.05)
        assert spooled.count(b'"request_id"') == 12
        first.proc.send_signal(signal.SIGKILL)               # no shutdown flush: only the disk has them
        first.proc.wait(10)
        await client.close()
        redis_proc.__init__(port, rdir, *aof)  # type: ignore[misc]
        second = gateway(text, env=env)                      # adopts the dead process's spool
        rc = Redis(host="127.0.0.1", port=port)
        try:
            records = await ledger_records(rc, since, team, 13)
            assert len(records) == 13 and len({r.request_id for r in records}) == 13
            assert sum(r.cost_nano for r in records) == 13 * CENTS_5
        finally:
            await rc.aclose()
        assert "adopted 12 unwritten ledger records" in second.output()
        deadline = time.monotonic() + 10
        while any(p.stat().st_size for p in spool_dir.glob("spool-*.jsonl")) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not any(p.stat().st_size for p in spool_dir.glob("spool-*.jsonl"))
    finally:
        redis_proc.stop()
