"""Deployment health: cooldown after repeated failures, its expiry, sharing through a private Redis, latency
averages, and active checks of self-hosted deployments."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.policy import Deployment, HealthSpec
from gateway.pricing import Price
from gateway.routing.cooldowns import HealthBook


class Clock:
    def __init__(self) -> None:
        self.t = 1_900_000_000.0

    def __call__(self) -> float:
        return self.t


def deployment(name: str | None = None, self_hosted: bool = False) -> Deployment:
    return Deployment(id=name or f"d-{uuid.uuid4().hex[:8]}", model="m", provider="openai", upstream_model="m",
                      api_base="http://127.0.0.1:9/v1", api_key=None, api_key_env=None, weight=1.0,
                      context_window=None, max_output_tokens=None, capabilities=frozenset({"chat"}),
                      price=Price(0, 0, 0, 0, 0), price_source="policy", timeout_s=None, headers=(),
                      simulated=None, self_hosted=self_hosted)


SPEC = HealthSpec(failures=3, window_s=10, cooldown_s=30, latency_alpha=0.5)


def test_cooldown_after_failures_within_the_window_and_expiry() -> None:
    clock, d = Clock(), deployment()
    book = HealthBook(SPEC, clock=clock)
    book.failed(d)
    book.failed(d)
    clock.t += 11                       # the first two fall out of the 10 s window
    book.failed(d)
    assert d.id not in book.view().cooled
    book.failed(d)
    book.failed(d)
    assert book.view().cooled == frozenset({d.id})
    clock.t += 29.9
    assert d.id in book.view().cooled
    clock.t += 0.2
    assert book.view().cooled == frozenset()


def test_rare_failures_among_many_successes_do_not_cool_a_deployment_down() -> None:
    clock, d = Clock(), deployment()
    book = HealthBook(SPEC, clock=clock)                 # 3 failures, at least half of the window's calls
    for _ in range(20):
        book.succeeded(d, duration_s=0.1)
    for _ in range(5):
        book.failed(d)
    assert not book.view().cooled                        # 5 of 25: 20%
    clock.t += 11                                        # the successes age out of the 10 s window
    for _ in range(3):
        book.failed(d)
    assert book.view().cooled == frozenset({d.id})       # 3 of 3 within the window


def test_latency_moving_averages() -> None:
    d = deployment()
    book = HealthBook(SPEC, clock=Clock())
    book.succeeded(d, duration_s=1.0)
    book.succeeded(d, duration_s=3.0)           # alpha 0.5: 1.0 -> 2.0
    book.succeeded(d, ttft_s=0.2)
    view = book.view()
    assert view.latency[d.id] == pytest.approx(2.0) and view.ttft[d.id] == pytest.approx(0.2)


async def test_two_replicas_share_cooldowns_and_latency(redis_port: int) -> None:
    d = deployment()
    clients = [Redis(host="127.0.0.1", port=redis_port) for _ in range(2)]
    a, b = (HealthBook(SPEC, client) for client in clients)
    try:
        a.failed(d)                          # two failures on one replica, one on the other:
        a.failed(d)                          # neither reaches 3 alone
        b.failed(d)
        assert not a.view().cooled and not b.view().cooled
        await a.sync()
        await b.sync()                       # the shared count reaches 3 here
        await a.sync()
        assert d.id in a.view().cooled and d.id in b.view().cooled
        a.succeeded(d, duration_s=1.0)
        await a.sync()
        await b.sync()
        assert b.view().latency[d.id] == pytest.approx(1.0)
        b.succeeded(d, duration_s=3.0)
        await b.sync()
        await a.sync()
        assert a.view().latency[d.id] == pytest.approx(2.0)   # 1.0 folded with 3.0 at alpha 0.5
        busy = deployment()                                   # successes on one replica, failures on the other
        for _ in range(10):
            a.succeeded(busy, duration_s=0.1)
        await a.sync()
        for _ in range(2):
            b.failed(busy)
        await b.sync()
        b.failed(busy)
        await b.sync()
        await a.sync()
        assert busy.id not in a.view().cooled        # 3 of all 13 calls failed: not cooled down for everyone
        assert busy.id in b.view().cooled            # but b saw only its own 3 failures and stops using it
    finally:
        for client in clients:
            await client.aclose()


async def test_sync_survives_an_unreachable_redis() -> None:
    d = deployment()
    unreachable = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    book = HealthBook(replace(SPEC, failures=1), unreachable)
    book.failed(d)
    await book.sync()                        # no exception; the local view still holds
    assert d.id in book.view().cooled


async def test_active_checks_cool_down_and_restore_self_hosted_deployments() -> None:
    local, hosted = deployment(self_hosted=True), deployment()
    state: dict[str, Any] = {"up": False, "checked": []}

    async def checker(dep: Deployment, timeout: float) -> None:
        state["checked"].append(dep.id)
        if not state["up"]:
            raise ConnectionError("refused")

    book = HealthBook(SPEC, checker=checker)
    book.watch((local, hosted))
    await book.check()
    assert state["checked"] == [local.id]            # only self-hosted deployments are checked
    assert book.view().cooled == frozenset({local.id})
    assert book.healthy() == {local.id: False, hosted.id: True}
    state["up"] = True
    await book.check()
    assert book.view().cooled == frozenset() and book.healthy()[local.id] is True
