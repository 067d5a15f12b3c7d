"""The OS-process worker of the cross-process SQLite budget test (an importable module, for ``spawn``):
``n`` concurrent $0.05 reserve/settle rounds against one team budget in a shared database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any


def sqlite_budget_worker(data_dir: str, team: str, n: int, worker: int, barrier: Any, out: Any) -> None:
    out.put(asyncio.run(_worker(data_dir, team, n, worker, barrier)))


async def _worker(data_dir: str, team: str, n: int, worker: int, barrier: Any) -> int:
    from gateway.state.budgets import BudgetRule, ReserveRequest
    from gateway.state.budgets_sqlite import SqliteBudgetStore
    from gateway.state.sqlite_db import connect

    store = SqliteBudgetStore(connect(data_dir))
    rule = BudgetRule("team", team, "daily", 1_000_000_000)
    now = datetime.now(UTC)
    reqs = [ReserveRequest(f"p{worker}-{i}", team, 50_000_000, 100, (rule,), (), now) for i in range(n)]
    try:
        barrier.wait(60)   # every process has its connection: start all requests at once

        async def one(req: ReserveRequest) -> int:
            admission = await store.reserve(req)
            await asyncio.sleep(0)   # interleave with the other requests of this process
            if admission.admitted:
                await store.settle(req, 50_000_000, 100)
            return int(admission.admitted)

        return sum(await asyncio.gather(*(one(r) for r in reqs)))
    finally:
        await store.aclose()
