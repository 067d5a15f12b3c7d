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
from gateway.state.ledger import DAY_S, RedisLedger

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
