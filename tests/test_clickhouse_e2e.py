"""The ledger in ClickHouse end to end: ``gateway serve --workers 2`` on a private Redis with
``GATEWAY_CLICKHOUSE_URL`` on the ClickHouse engine in process (chdb, an on-disk path both workers
share in turn), the official ``openai`` SDK as the client. ClickHouse is unavailable for the first
half of the load (this test holds the engine), then back: the spend report (``/admin/spend``, from
ClickHouse) equals the Redis rollups and the clients' ``cost_usd`` to the nano-dollar, and the
records in ClickHouse are each request once."""

from __future__ import annotations

import asyncio
import fcntl
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis_fixtures import RedisProc, free_port
from test_budgets_e2e import USD, ask, client_for, cost_of, new_key, policy, team_name

from conftest import GatewayFactory, stop
from gateway.admin.spend_report import iso
from gateway.state.ledger import DAY_S, STREAM, RedisLedger

pytest.importorskip("chdb")
pytest.importorskip("clickhouse_connect")

MASTER = "sk-master-clickhouse-e2e"


async def report(url: str, team: str, since: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=60) as c:
        r = await c.get(f"{url}/admin/spend", params={"team": team, "since": since, "format": "json"},
                        headers={"Authorization": f"Bearer {MASTER}"})
        assert r.status_code == 200, r.text
        return dict(r.json())


@pytest.mark.e2e
async def test_two_workers_on_redis_and_clickhouse_agree_to_the_nano_dollar(
        gateway: GatewayFactory, mock_reset: str, tmp_path: Path) -> None:
    port = free_port()
    redis_proc = RedisProc(port, tmp_path / "redis")
    engine = tmp_path / "clickhouse"
    team = team_name()
    holder = open(str(engine) + ".lock", "a+b")  # noqa: SIM115 - the engine, held: ClickHouse unavailable
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        server = gateway(policy(mock_reset, f"  {team}: {{budgets: [{{period: monthly, usd: 1000}}]}}"),
                         env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{port}/0", "GATEWAY_MASTER_KEY": MASTER,
                              "GATEWAY_CLICKHOUSE_URL": f"chdb://{engine}",
                              "GATEWAY_SPOOL_DIR": str(tmp_path / "spool")},
                         args=("--workers", "2"))
        _, secret = await new_key(port, team)
        start = time.time()
        client = client_for(server, secret)
        results = list(await asyncio.gather(*(ask(client, stream=i % 3 == 0) for i in range(20))))
        deadline = time.monotonic() + 30   # a write gives up on the held engine after 5 s, then spools
        while not (spooled := sum(p.stat().st_size for p in (tmp_path / "spool" / "clickhouse").glob("*.jsonl"))):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert spooled > 0, "the records wait on disk while ClickHouse is away"
        holder.close()                                                  # ClickHouse is back
        results += await asyncio.gather(*(ask(client, stream=i % 3 == 0) for i in range(20)))
        await client.close()
        ok = [r for r in results if r[0] == "ok"]
        assert len(ok) == 40
        paid = int(sum((cost_of(r) for r in ok), Decimal(0)) * USD)
        assert paid > 0

        day = int(start // DAY_S) * DAY_S
        deadline = time.monotonic() + 90
        while True:   # each worker writes its batches when it gets its turn at the engine
            spend = await report(server.url, team, iso(start - 1))
            if spend["total"]["requests"] >= 40 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert (spend["total"]["requests"], spend["total"]["cost_nano"]) == (40, paid)
        whole_days = await report(server.url, team, iso(day)[:10])        # from ClickHouse's daily rollup
        assert (whole_days["total"]["requests"], whole_days["total"]["cost_nano"]) == (40, paid)

        rc = Redis(host="127.0.0.1", port=port)
        try:
            rolled = await RedisLedger(rc).totals(day, day + 2 * DAY_S, team, "team", source="rollup")
        finally:
            await rc.aclose()
        assert [(r["key"], r["requests"], r["cost_nano"]) for r in rolled] == [(team, 40, paid)]
        assert whole_days["rows"][0]["cost_nano"] == rolled[0]["cost_nano"]
        assert whole_days["rows"][0]["baseline_nano"] == rolled[0]["baseline_nano"]

        stop(server.proc)
        from gateway.state.ledger_clickhouse import ClickHouseLedger
        ledger = ClickHouseLedger(f"chdb://{engine}", wait_s=30)
        try:
            records = await ledger.read(start - 1, team=team)
        finally:
            await ledger.aclose()
        assert len(records) == 40 and len({r.request_id for r in records}) == 40   # nothing lost or doubled
        assert sum(r.cost_nano for r in records) == paid
    finally:
        holder.close()
        redis_proc.stop()


PHASES, PER_PHASE, CAP = 8, 1_000, 500
MEMORY_BOUND = 1 << 20   # growth of Redis used_memory allowed after warm-up: an uncapped stream grows ~4 MiB here


@pytest.mark.e2e
async def test_with_clickhouse_the_redis_stream_is_a_bounded_buffer_and_redis_memory_stays_flat(
        gateway: GatewayFactory, mock_reset: str, tmp_path: Path) -> None:
    """8,000 requests through a gateway on Redis with ClickHouse configured and the stream capped at
    500 records (``GATEWAY_LEDGER_BUFFER_RECORDS``), in eight bounded phases: after each, the stream
    is within its cap (``MAXLEN ~`` trims whole nodes of 100 entries) and, once the first phase has
    filled it, Redis' ``used_memory`` moves by less than 1 MiB, while the records it let go are all
    in ClickHouse: every request once, with the clients' cost to the nano-dollar."""
    port = free_port()
    redis_proc = RedisProc(port, tmp_path / "redis")
    engine = tmp_path / "clickhouse"
    team = team_name()
    rc = Redis(host="127.0.0.1", port=port)
    try:
        server = gateway(policy(mock_reset, f"  {team}: {{}}"),
                         env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{port}/0", "GATEWAY_MASTER_KEY": MASTER,
                              "GATEWAY_CLICKHOUSE_URL": f"chdb://{engine}", "GATEWAY_LEDGER_BUFFER_RECORDS": str(CAP),
                              "GATEWAY_SPOOL_DIR": str(tmp_path / "spool"), "GATEWAY_LOG_LEVEL": "warning"})
        _, secret = await new_key(port, team)
        start = time.time()
        body = {"model": "pricey", "messages": [{"role": "user", "content": "hi"}]}
        paid, lengths, memory, keys = 0, [], [], []
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60,
                                     headers={"Authorization": f"Bearer {secret}"}) as http:
            async def one() -> int:
                r = await http.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                return int(Decimal(r.headers["x-gateway-cost-usd"]) * USD)

            for _ in range(PHASES):
                for _ in range(PER_PHASE // 250):
                    paid += sum(await asyncio.gather(*(one() for _ in range(250))))
                await asyncio.sleep(0.3)   # the ledger's batch of the last requests (every 0.1 s)
                lengths.append(int(await rc.xlen(STREAM)))
                memory.append(int((await rc.info("memory"))["used_memory"]))
                keys.append(int(await rc.dbsize()))
        assert paid == PHASES * PER_PHASE * 50_000_000   # 10 output tokens at $5,000 per million each
        markers = len([k async for k in rc.scan_iter("gw:v1:dedup:*", count=1000)])
        print(f"stream length after each phase: {lengths}; used_memory: {memory}; keys: {keys} "
              f"({markers} ledger batch markers)")
        assert all(n <= CAP + 100 for n in lengths), lengths
        assert lengths[-1] >= CAP   # the buffer is full: it is the cap that holds it there
        assert max(memory[1:]) - min(memory[1:]) < MEMORY_BOUND, memory
        stop(server.proc)   # its last batches go to ClickHouse at shutdown

        from gateway.state.ledger_clickhouse import ClickHouseLedger
        ledger = ClickHouseLedger(f"chdb://{engine}", wait_s=30)
        try:
            [row] = await ledger.totals(start - 1, team=team)
        finally:
            await ledger.aclose()
        assert (row["requests"], row["cost_nano"]) == (PHASES * PER_PHASE, paid)
    finally:
        await rc.aclose()
        redis_proc.stop()
