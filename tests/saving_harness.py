"""One way to drive a gateway on either state backend, for the caching and compression tests.

``memory``: the app built in this process on the embedded state (its in-memory ledger, keys and
budgets read directly), reached by the ``openai`` SDK through httpx's ASGI transport. ``redis``: a
``gateway serve`` process on a private redis-server, reached over loopback; its ledger, keys and
budgets are read from that Redis. Both call the real mock upstream process over HTTP.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
from redis.asyncio import Redis

from conftest import Server
from gateway.api.app import GatewayApp, create_app
from gateway.settings import Settings
from gateway.state.budgets import BudgetRule
from gateway.state.budgets_redis import RedisBudgetStore
from gateway.state.keys import RedisKeyStore
from gateway.state.ledger import LedgerRecord, RedisLedger


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def nano(usd: float) -> int:
    return round(usd * 1e9)


class Harness:
    kind = ""

    async def key(self, team: str, **kw: Any) -> str:
        raise NotImplementedError

    def client(self, secret: str) -> openai.AsyncOpenAI:
        raise NotImplementedError

    async def metrics(self) -> str:
        raise NotImplementedError

    async def ledger(self, since: float) -> list[LedgerRecord]:
        raise NotImplementedError

    async def spent(self, team: str, period: str, limit_nano: int) -> tuple[int, int]:
        raise NotImplementedError

    async def records(self, since: float, team: str, expect: int, timeout: float = 10.0) -> list[LedgerRecord]:
        """The team's records since ``since`` once ``expect`` of them are written."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in await self.ledger(since) if r.team == team]
            if len(found) >= expect or time.monotonic() > deadline:
                return sorted(found, key=lambda r: r.ts)
            await asyncio.sleep(0.05)

    async def aclose(self) -> None:
        return None


class InProcess(Harness):
    kind = "memory"

    def __init__(self, policy_dir: Path) -> None:
        self.app: GatewayApp = create_app(Settings(config_dir=str(policy_dir)))
        self.app.state.state.start()
        self._clients: list[httpx.AsyncClient] = []

    @property
    def state(self) -> Any:
        return self.app.state.state

    async def key(self, team: str, **kw: Any) -> str:
        _, secret = await self.state.key_store.create(team, "test", **kw)
        return str(secret)

    def client(self, secret: str) -> openai.AsyncOpenAI:
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://gateway")
        self._clients.append(http)
        return openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=secret, max_retries=0, http_client=http)

    async def metrics(self) -> str:
        return self.app.state.metrics.render().decode()

    async def ledger(self, since: float) -> list[LedgerRecord]:
        await self.state.flush()
        return list(await self.state.ledger.read(since))

    async def spent(self, team: str, period: str, limit_nano: int) -> tuple[int, int]:
        [u] = await self.state.budgets.usage(team, [BudgetRule("team", team, period, limit_nano)],  # type: ignore[arg-type]
                                             datetime.now(UTC))
        return u.spent_nano, u.reserved_nano

    async def aclose(self) -> None:
        for http in self._clients:
            await http.aclose()
        await self.state.aclose()
        await self.app.state.client.aclose()


class OverRedis(Harness):
    kind = "redis"

    def __init__(self, server: Server, redis_port: int) -> None:
        self.server, self.port = server, redis_port
        self._redis: list[Redis] = []

    def redis(self) -> Redis:
        client = Redis(host="127.0.0.1", port=self.port)
        self._redis.append(client)
        return client

    async def key(self, team: str, **kw: Any) -> str:
        _, secret = await RedisKeyStore(self.redis()).create(team, "test", **kw)
        return secret

    def client(self, secret: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.server.url}/v1", api_key=secret, max_retries=0, timeout=60)

    async def metrics(self) -> str:
        async with httpx.AsyncClient() as c:
            return (await c.get(f"{self.server.url}/metrics")).text

    async def ledger(self, since: float) -> list[LedgerRecord]:
        return await RedisLedger(self.redis()).read(since)

    async def spent(self, team: str, period: str, limit_nano: int) -> tuple[int, int]:
        [u] = await RedisBudgetStore(self.redis()).usage(team, [BudgetRule("team", team, period, limit_nano)],  # type: ignore[arg-type]
                                                         datetime.now(UTC))
        return u.spent_nano, u.reserved_nano

    async def aclose(self) -> None:
        for client in self._redis:
            await client.aclose()
