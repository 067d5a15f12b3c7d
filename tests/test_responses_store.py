"""The Responses conversation store, in memory (fake clock) and on a private redis-server: put, get,
delete and input items by response id and team, another team's id invisible, TTL expiry, the
memory store's bounds, and records shared by two clients as by two replicas."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.api.responses import chat_to_response, request_input_items, with_item_ids
from gateway.state.budgets import StateUnavailable
from gateway.state.responses_store import (
    KEY_PREFIX,
    MemoryResponsesStore,
    RedisResponsesStore,
    ResponsesStore,
    StoredResponse,
    should_store,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def record(team: str = "alpha", text: str = "Hi", answer: str = "Hello", history: list[dict[str, Any]] | None = None,
           response_id: str | None = None) -> StoredResponse:
    body = {"model": "demo", "input": text}
    rid = response_id or f"resp_{uuid.uuid4().hex}"
    chat = {"model": "demo-sim-1", "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                                "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
    items = with_item_ids((history or []) + request_input_items(body))
    return StoredResponse(id=rid, team=team, deployment="sim-1", model="demo", input_items=items,
                          response=chat_to_response(chat, body, rid))


class Kit:
    def __init__(self, kind: str, port: int | None) -> None:
        self.kind, self.port, self.clock = kind, port, Clock()
        self.clients: list[Redis] = []

    def make(self, ttl_s: float = 60.0) -> ResponsesStore:
        if self.kind == "memory":
            return MemoryResponsesStore(ttl_s, clock=self.clock)
        client = Redis(host="127.0.0.1", port=self.port)
        self.clients.append(client)
        return RedisResponsesStore(client, ttl_s)

    async def wait_past(self, seconds: float) -> None:
        if self.kind == "memory":
            self.clock.t += seconds
        else:
            await asyncio.sleep(seconds)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.e2e)])
async def kit(request: pytest.FixtureRequest) -> AsyncIterator[Kit]:
    port = request.getfixturevalue("redis_port") if request.param == "redis" else None
    k = Kit(request.param, port)
    yield k
    for client in k.clients:
        await client.aclose()


def test_store_false_keeps_nothing_and_store_defaults_to_true() -> None:
    assert should_store({"model": "m", "input": "x"})
    assert should_store({"model": "m", "input": "x", "store": True})
    assert not should_store({"model": "m", "input": "x", "store": False})


async def test_put_get_delete_and_input_items_by_team(kit: Kit) -> None:
    store = kit.make()
    rec = record(team="alpha")
    assert await store.put(rec)
    got = await store.get(rec.id, "alpha")
    assert got == rec
    assert got.output_items[0]["content"][0]["text"] == "Hello"
    assert await store.input_items(rec.id, "alpha") == rec.input_items
    assert rec.input_items[0]["id"].startswith("msg_")
    assert await store.get(rec.id, "beta") is None             # another team's id does not exist for it
    assert await store.input_items(rec.id, "beta") is None
    assert not await store.delete(rec.id, "beta")
    assert await store.get(rec.id, "alpha") == rec             # ... and cannot delete it either
    assert await store.delete(rec.id, "alpha")
    assert await store.get(rec.id, "alpha") is None
    assert not await store.delete(rec.id, "alpha")
    assert await store.get("resp_never_issued", "alpha") is None


async def test_history_of_a_three_turn_chain(kit: Kit) -> None:
    store = kit.make()
    first = record(text="one", answer="A1")
    await store.put(first)
    prior = await store.get(first.id, "alpha")
    assert prior is not None
    second = record(text="two", answer="A2", history=prior.history())
    await store.put(second)
    prior = await store.get(second.id, "alpha")
    assert prior is not None
    texts = [(i["role"], i["content"][0]["text"]) for i in prior.history()]
    assert texts == [("user", "one"), ("assistant", "A1"), ("user", "two"), ("assistant", "A2")]
    assert prior.deployment == "sim-1" and prior.model == "demo" and not prior.upstream_state


async def test_records_expire_after_the_ttl(kit: Kit) -> None:
    store = kit.make(ttl_s=0.3)
    rec = record()
    await store.put(rec)
    assert await store.get(rec.id, "alpha") is not None
    await kit.wait_past(0.6)
    assert await store.get(rec.id, "alpha") is None


async def test_two_clients_share_records_like_two_replicas(redis_port: int) -> None:
    one, two = Redis(host="127.0.0.1", port=redis_port), Redis(host="127.0.0.1", port=redis_port)
    try:
        rec = StoredResponse(id=f"resp_{uuid.uuid4().hex}", team="alpha", deployment="openai-eu", model="gpt-5",
                             input_items=[], response={"id": "x", "output": []}, upstream_state=True)
        await RedisResponsesStore(one, 60).put(rec)
        got = await RedisResponsesStore(two, 60).get(rec.id, "alpha")
        assert got == rec and got.upstream_state and got.deployment == "openai-eu"
        ttl_ms = await two.pttl(KEY_PREFIX + rec.id)
        assert 0 < ttl_ms <= 60_000
    finally:
        await one.aclose()
        await two.aclose()


async def test_redis_down_is_state_unavailable() -> None:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from conftest import free_port

    client = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    store = RedisResponsesStore(client, 60)
    try:
        with pytest.raises(StateUnavailable):
            await store.put(record())
        with pytest.raises(StateUnavailable):
            await store.get("resp_x", "alpha")
    finally:
        await client.aclose()


async def test_memory_store_is_bounded_by_entries_and_bytes() -> None:
    clock = Clock()
    store = MemoryResponsesStore(60, max_entries=3, max_bytes=10_000_000, clock=clock)
    recs = [record(text=f"turn {i}") for i in range(5)]
    for rec in recs:
        assert await store.put(rec)
    assert len(store) == 3
    assert [await store.get(r.id, "alpha") is not None for r in recs] == [False, False, True, True, True]

    size = len(record().to_json())
    store = MemoryResponsesStore(60, max_entries=1000, max_bytes=size * 2 + size // 2, clock=clock)
    recs = [record() for _ in range(4)]
    for rec in recs:
        await store.put(rec)
    assert len(store) == 2 and store.bytes <= store.max_bytes
    assert await store.get(recs[3].id, "alpha") is not None and await store.get(recs[0].id, "alpha") is None
    huge = record(text="x" * (size * 3))
    assert not await store.put(huge)                    # larger than the whole bound: refused, nothing evicted
    assert len(store) == 2 and await store.get(huge.id, "alpha") is None
    await store.delete(recs[3].id, "alpha")
    assert len(store) == 1 and store.bytes == len(recs[2].to_json())


async def test_memory_store_gives_copies() -> None:
    store = MemoryResponsesStore(60)
    rec = record()
    await store.put(rec)
    got = await store.get(rec.id, "alpha")
    assert got is not None
    got.input_items.append({"type": "message", "role": "user", "content": "tampered"})
    again = await store.get(rec.id, "alpha")
    assert again is not None and len(again.input_items) == 1


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        MemoryResponsesStore(0)
    with pytest.raises(ValueError):
        MemoryResponsesStore(60, max_entries=0)
    with pytest.raises(ValueError):
        RedisResponsesStore(object(), 0)


async def test_open_picks_redis_when_shared(redis_port: int) -> None:
    from gateway.state.responses_store import open_responses_store

    memory = open_responses_store(None, ttl_s=5, max_entries=2, max_bytes=1000)
    assert isinstance(memory, MemoryResponsesStore) and (memory.ttl_s, memory.max_entries) == (5, 2)
    client = Redis(host="127.0.0.1", port=redis_port)
    try:
        shared = open_responses_store(client, ttl_s=5)
        assert isinstance(shared, RedisResponsesStore) and shared.ttl_ms == 5000
    finally:
        await client.aclose()


async def test_put_later_is_readable_at_once_and_built_off_the_reply(kit: Kit) -> None:
    """The memory store builds a record on the event loop's next turn or at the first read, whichever
    comes first (off the reply); Redis builds and writes it at once (the next read may be another replica's)."""
    store = kit.make()
    rec, other = record(), record()
    built: list[str] = []

    def build(r: StoredResponse) -> Any:
        return lambda: built.append(r.id) or r

    await store.put_later(rec.id, build(rec))
    assert built == ([] if kit.kind == "memory" else [rec.id])
    assert await store.get(rec.id, "alpha") == rec and built == [rec.id]     # a read right after finds it
    await store.put_later(other.id, build(other))
    await asyncio.sleep(0)                                                    # the loop's next turn
    assert built == [rec.id, other.id]
    assert await store.get(other.id, "beta") is None and await store.get(other.id, "alpha") == other
    if isinstance(store, MemoryResponsesStore):
        assert len(store) == 2 and store.bytes == len(rec.to_json()) + len(other.to_json())


async def test_put_later_keeps_to_the_bounds_and_survives_a_failing_build() -> None:
    store = MemoryResponsesStore(60, max_entries=2)
    records = [record() for _ in range(3)]
    for r in records:
        await store.put_later(r.id, lambda r=r: r)

    def broken() -> StoredResponse:
        raise ValueError("no record")

    await store.put_later("resp_broken", broken)
    assert await store.get(records[0].id, "alpha") is None                  # the oldest went first
    assert [await store.get(r.id, "alpha") for r in records[1:]] == records[1:] and len(store) == 2
    assert await store.get("resp_broken", "alpha") is None
