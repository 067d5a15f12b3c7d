"""A worker SIGKILLed mid-stream during a Redis outage (fail mode ``allow``, ``GATEWAY_SPOOL_DIR`` set) loses no
ledger record: ``gateway serve --workers 2`` on a private redis-server, Redis stopped, requests answered
unmetered, then slow streams opened and the worker with unfinished intents in its spool killed mid-stream.
uvicorn starts a new worker, which adopts the dead one's spool files (while Redis is still down); Redis comes
back, and every request the clients started has exactly one ledger record: ``ok`` for the answers, ``interrupted``
at the worst case for the streams the kill cut, nothing doubled, and the team's spent equals the ledger's sum
with nothing reserved. Every wait is a bounded poll on a condition, never a timing margin."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from redis_fixtures import RedisProc, free_port
from test_fault_matrix_e2e import ANSWER_NANO, LIMIT_USD, MSG, PRICE, budget, redis_args, worker_pids

from conftest import GatewayFactory
from gateway.state.ledger import LedgerRecord, RedisLedger

pytestmark = pytest.mark.e2e

STREAMS = 16


def policy(mock: str, team: str) -> str:
    # "long": 10 chunks 500 ms apart, so every stream is still running when the worker dies
    return (f"models:\n  priced:\n    deployments:\n      - {{provider: openai, name: priced, "
            f"model: mock-tokens10-chunks10, api_base: '{mock}/v1', {PRICE}}}\n"
            f"  long:\n    deployments:\n      - {{provider: openai, name: long, "
            f"model: mock-tokens10-chunks10-delay500, api_base: '{mock}/v1', {PRICE}}}\n"
            f"teams:\n  {team}: {{budgets: [{{period: monthly, usd: {LIMIT_USD}}}]}}\n")


def body(model: str, stream: bool) -> dict[str, object]:
    out: dict[str, object] = {"model": model, "messages": MSG, "max_tokens": 10}
    if stream:
        out |= {"stream": True, "stream_options": {"include_usage": True}}
    return out


def open_intents(spool: Path) -> dict[int, int]:
    """Per PID: requests whose intent its intents file holds with no finish (``I`` lines without an ``F``)."""
    counts: dict[int, int] = {}
    for path in spool.glob("intents-*.jsonl"):
        pid = int(path.name.rsplit("-", 2)[-2])
        begun, finished = set(), set()
        try:
            lines = path.read_bytes().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            hold = line[1:].split(b" ", 1)[0]
            (begun if line[:1] == b"I" else finished if line[:1] == b"F" else set()).add(hold)
        counts[pid] = counts.get(pid, 0) + len(begun - finished)
    return counts


async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def poll(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():   # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        await asyncio.sleep(0.1)


async def test_a_worker_killed_mid_stream_during_an_outage_leaves_every_record(
        gateway: GatewayFactory, mock_upstream: str, tmp_path: Path) -> None:
    port = free_port()
    rdir = tmp_path / "redis"
    redis_proc = RedisProc(port, rdir, *redis_args())
    team = "default"   # the master key's team: no key to look up, so no worker depends on having cached one
    master = f"sk-master-{uuid.uuid4().hex[:8]}"
    spool = tmp_path / "spool"
    run = uuid.uuid4().hex[:6]
    try:
        server = gateway(policy(mock_upstream, team), args=("--workers", "2"), env={
            "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{port}/0", "GATEWAY_REDIS_FAIL_MODE": "allow",
            "GATEWAY_SPOOL_DIR": str(spool), "GATEWAY_MASTER_KEY": master})
        workers = worker_pids(server.proc.pid)
        assert len(workers) == 2, workers
        auth = {"authorization": f"Bearer {master}"}
        since = time.time() - 1
        statuses: dict[str, int] = {}
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)   # a new connection each
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            async def one(rid: str, model: str, stream: bool) -> None:
                resp = await client.post(f"{server.url}/v1/chat/completions", json=body(model, stream),
                                         headers={**auth, "x-request-id": rid})
                statuses[rid] = resp.status_code

            for i in range(3):
                await asyncio.gather(*(one(f"{run}-warm{i}-{n}", "priced", False) for n in range(16)))
            assert set(statuses.values()) == {200}, statuses
            redis_proc.stop()
            # the port stays ours while Redis is down (a test running beside this one could take it otherwise):
            # a listener that drops every connection at once, so Redis calls fail fast as when nothing listens
            placeholder = await asyncio.start_server(drop, "127.0.0.1", port, reuse_address=True)

            # answered unmetered during the outage: their records go to the spools
            for i in range(3):
                await asyncio.gather(*(one(f"{run}-down{i}-{n}", "priced", n % 2 == 0) for n in range(8)))
            assert set(statuses.values()) == {200}, statuses

            # slow streams, all admitted (their headers came), then the worker with unfinished intents dies
            started: set[str] = set()
            complete: dict[str, bool] = {}

            async def stream(rid: str) -> None:
                try:
                    async with client.stream("POST", f"{server.url}/v1/chat/completions",
                                             json=body("long", True), headers={**auth, "x-request-id": rid}) as r:
                        statuses[rid] = r.status_code
                        text = b""
                        try:
                            async for chunk in r.aiter_bytes():
                                started.add(rid)
                                text += chunk
                        except httpx.HTTPError:
                            pass                                   # cut by the kill
                        complete[rid] = text.rstrip().endswith(b"data: [DONE]")
                except httpx.HTTPError:
                    started.add(rid)
                    complete[rid] = False

            rids = [f"{run}-long-{n}" for n in range(STREAMS)]
            tasks = [asyncio.create_task(stream(rid)) for rid in rids]

            async def all_started() -> bool:
                return len(started) == STREAMS
            await poll(all_started, 60, "every stream sent its first bytes")
            victim = 0

            async def victim_found() -> bool:
                nonlocal victim
                counts = {pid: n for pid, n in open_intents(spool).items() if pid in workers and n}
                if counts:
                    victim = max(counts, key=lambda pid: counts[pid])
                return bool(counts)
            try:
                await poll(victim_found, 30, "a worker with unfinished intents")
            except AssertionError as exc:
                raise AssertionError((str(exc), workers, open_intents(spool), sorted(p.name for p in spool.iterdir()),
                                      {rid: statuses.get(rid) for rid in rids}, server.output()[-4000:])) from None
            os.kill(victim, signal.SIGKILL)                       # our own gateway's worker, by PID
            await asyncio.wait_for(asyncio.gather(*tasks), 120)

        async def adopted() -> bool:   # a new worker started and took the dead one's files (Redis still down)
            now = worker_pids(server.proc.pid)
            return len(now) == 2 and victim not in now and \
                not any(spool.glob(f"*-{victim}-*.jsonl"))
        await poll(adopted, 120, "a new worker adopting the dead one's spool files")
        placeholder.close()
        await placeholder.wait_closed()
        redis_proc = RedisProc(port, rdir, *redis_args())

        ids = set(statuses)
        rc = Redis(host="127.0.0.1", port=port)
        ledger = RedisLedger(rc)
        grouped: dict[str, list[LedgerRecord]] = {}
        try:
            async def settled() -> bool:
                grouped.clear()
                for record in await ledger.read(since, team=team):
                    grouped.setdefault(record.request_id, []).append(record)
                spent, reserved = await budget(rc, team)
                total = sum(r.cost_nano for v in grouped.values() for r in v)
                return ids <= grouped.keys() and (spent, reserved) == (total, 0)
            with contextlib.suppress(AssertionError):   # the checks below say what is missing
                await poll(settled, 120, "every record written and every settle applied")
            used = await budget(rc, team)
        finally:
            await rc.aclose()
        missing = ids - grouped.keys()
        assert not missing, (f"{len(missing)} requests without a record: {sorted(missing)[:5]}",
                             {rid: (statuses[rid], complete.get(rid)) for rid in sorted(missing)[:5]},
                             server.output()[-3000:])
        doubled = {i: [r.status for r in v] for i, v in grouped.items() if len(v) != 1}
        assert not doubled, doubled
        assert grouped.keys() == ids                               # nothing else was recorded for the team
        assert used == (sum(v[0].cost_nano for v in grouped.values()), 0)
        for rid in ids - set(rids):
            [record] = grouped[rid]
            assert (record.status, record.cost_nano) == ("ok", ANSWER_NANO), record
        cut = [rid for rid in rids if not complete[rid]]
        assert cut, "the killed worker had no stream in flight"
        worst = {grouped[rid][0].cost_nano for rid in cut}
        for rid in rids:
            [record] = grouped[rid]
            if complete[rid]:
                assert (record.status, record.cost_nano) == ("ok", ANSWER_NANO), record
            else:
                assert record.status == "interrupted" and record.estimated and record.hold_id, record
        assert len(worst) == 1 and worst.pop() > ANSWER_NANO       # the worst case, not what an answer costs
        assert not list(spool.glob(f"*-{victim}-*")), list(spool.iterdir())
    finally:
        redis_proc.stop()
