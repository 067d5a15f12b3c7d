"""Shared by the admin API and CLI tests: a policy with teams, the admin client, SDK traffic that
records the ``cost_usd`` the client received, and the private Redis database these tests use."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
import redis

from conftest import Server, mock_policy

MASTER = "sk-admin-test-master"
DB = 7   # the admin tests' logical database on the session's private redis-server (flushed per test)
NANO = 10**9
TEAMS = """teams:
  default: {}
  alpha:
    budgets:
      - {period: monthly, usd: 1}
      - {period: daily, usd: 0.5}
    soft_alert: 0.5
    rpm: 1000
  beta:
    allowed_models: [mock, demo]
"""


def admin_policy(mock: str, teams: str = TEAMS) -> str:
    return mock_policy(mock) + teams


def redis_url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/{DB}"


@pytest.fixture
def admin_redis(redis_port: int) -> Iterator[int]:
    """The private server's port, with this module's database emptied first (never the Redis on 6379)."""
    client = redis.Redis(host="127.0.0.1", port=redis_port, db=DB)
    client.flushdb()
    client.close()
    yield redis_port


def admin(server: Server, method: str, path: str, key: str | None = MASTER, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.request(method, f"{server.url}{path}", headers=headers, timeout=30, **kw)


def sdk(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=30)


def traffic(client: openai.OpenAI, n: int, models: tuple[str, ...] = ("mock", "demo")) -> dict[str, Decimal]:
    """``n`` chat requests (every third streamed) of varying prompt sizes; the cost_usd received, per model."""
    costs: dict[str, Decimal] = {}
    for i in range(n):
        model = models[i % len(models)]
        messages = [{"role": "user", "content": " ".join(["word"] * (i + 1))}]
        if i % 3 == 2:
            cost = None
            for chunk in client.chat.completions.create(model=model, messages=messages, stream=True,  # type: ignore
                                                        stream_options={"include_usage": True}):
                if chunk.usage is not None:
                    cost = Decimal(str(chunk.usage.model_extra["cost_usd"]))
            assert cost is not None
        else:
            reply = client.chat.completions.create(model=model, messages=messages)  # type: ignore[arg-type]
            assert reply.usage is not None
            cost = Decimal(str(reply.usage.model_extra["cost_usd"]))
        assert cost > 0
        costs[model] = costs.get(model, Decimal(0)) + cost
    return costs


def nano(usd: Decimal) -> int:
    value = usd * NANO
    assert value == value.to_integral_value(), usd   # the SDK received whole nano-dollars
    return int(value)
