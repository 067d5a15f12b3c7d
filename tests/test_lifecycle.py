"""Every exit of a request leaves exactly one ledger record and settles its hold exactly once.

In process, on the simulated provider (no network): the app is driven through its ASGI
interface, the state's ``settle`` is wrapped to count settles per hold, and the ledger is read
back. Exits: success (JSON and stream), an upstream error before the first byte (JSON and
stream) and after it, a client gone mid-stream, a cache hit, a budget refusal, a rate-limit
refusal, a compression summary call, a cancelled request, and a bug inside the request path.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from inprocess import Gateway, in_process

POLICY = """\
models:
  fast:
    deployments:
      - provider: simulated
        name: fast-sim
        price: {input_per_mtok: 1.0, output_per_mtok: 2.0}
        simulated: {output_tokens: 12}
  broken:
    deployments:
      - provider: simulated
        name: broken-sim
        price: {input_per_mtok: 1.0, output_per_mtok: 2.0}
        simulated: {failure_rate: 1.0, failure_status: 500}
  cut:
    deployments:
      - provider: simulated
        name: cut-sim
        price: {input_per_mtok: 1.0, output_per_mtok: 2.0}
        simulated: {output_tokens: 40, fail_after_tokens: 5}
  slow:
    deployments:
      - provider: simulated
        name: slow-sim
        price: {input_per_mtok: 1.0, output_per_mtok: 2.0}
        simulated: {latency_ms: 30000, ttft_ms: 30000}
  paced:
    deployments:
      - provider: simulated
        name: paced-sim
        price: {input_per_mtok: 1.0, output_per_mtok: 2.0}
        simulated: {output_tokens: 400, tokens_per_second: 200}
  summarizer:
    deployments:
      - provider: simulated
        name: summarizer-sim
        price: {input_per_mtok: 0.5, output_per_mtok: 1.0}
        simulated: {output_tokens: 8}
teams:
  paying:
    budgets: [{period: daily, usd: 50}]
  poor:
    budgets: [{period: daily, usd: 0.000001}]
    on_exceed: block
  limited:
    budgets: [{period: daily, usd: 50}]
    rpm: 1
  squeeze:
    budgets: [{period: daily, usd: 50}]
compression:
  teams:
    squeeze:
      enabled: true
      trigger_tokens: 60
      strategies: [summarize]
      summary_model: summarizer
      keep_last_turns: 1
"""

@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with in_process(tmp_path, POLICY) as gateway:
        yield gateway


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 50, **extra}


async def test_success_json_and_stream(gw: Gateway) -> None:
    key = await gw.key("paying")
    status, body = await gw.post(key, chat("fast"))
    assert status == 200
    record = await gw.one_exit("paying")
    assert record.status == "ok" and record.cost_nano == orjson.loads(body)["usage"]["cost_usd"] * 1e9 > 0
    status, body = await gw.post(key, chat("fast", stream=True))
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    records = await gw.records()
    assert [r.status for r in records] == ["ok", "ok"] and len(gw.settles) == 2
    assert set(gw.settles.values()) == {1} and await gw.reserved("paying") == 0


async def test_upstream_error_before_the_first_byte(gw: Gateway) -> None:
    key = await gw.key("paying")
    assert (await gw.post(key, chat("broken")))[0] == 502
    record = await gw.one_exit("paying")
    assert record.status == "upstream_error" and record.cost_nano == 0
    assert (await gw.post(key, chat("broken", stream=True)))[0] == 502
    assert [r.status for r in await gw.records()] == ["upstream_error"] * 2
    assert sorted(gw.settles.values()) == [1, 1] and await gw.reserved("paying") == 0


async def test_upstream_cut_after_the_first_byte(gw: Gateway) -> None:
    key = await gw.key("paying")
    status, body = await gw.post(key, chat("cut", stream=True))
    assert status == 200 and b'"error"' in body and not body.endswith(b"[DONE]\n\n")
    record = await gw.one_exit("paying")
    assert record.status != "ok" and record.output_tokens > 0 and record.cost_nano > 0   # charged what it delivered
    assert await gw.reserved("paying") == 0


async def test_client_gone_mid_stream(gw: Gateway) -> None:
    key = await gw.key("paying")
    status, _ = await gw.post(key, chat("paced", stream=True, max_tokens=400), disconnect_after=2)
    assert status == 200
    record = await gw.one_exit("paying")
    assert record.status == "client_closed" and 0 < record.output_tokens < 400
    assert await gw.reserved("paying") == 0


async def test_cache_hit(gw: Gateway) -> None:
    key = await gw.key("paying")
    body = chat("fast", temperature=0)
    assert (await gw.post(key, body))[0] == 200
    status, _ = await gw.post(key, body)
    assert status == 200
    records = await gw.records()
    assert [r.cache for r in records] == ["miss", "hit"] and records[1].cost_nano == 0
    assert len(gw.settles) == 2 and set(gw.settles.values()) == {1} and await gw.reserved("paying") == 0


async def test_budget_refusal(gw: Gateway) -> None:
    key = await gw.key("poor")
    status, body = await gw.post(key, chat("fast"))
    assert status == 429 and orjson.loads(body)["error"]["code"] == "budget_exceeded"
    record = await gw.one_exit("poor")
    assert record.status == "budget_exceeded" and record.cost_nano == 0 and not gw.settles   # nothing was held


async def test_rate_limit_refusal(gw: Gateway) -> None:
    key = await gw.key("limited")
    assert (await gw.post(key, chat("fast")))[0] == 200
    status, body = await gw.post(key, chat("fast"))
    assert status == 429 and orjson.loads(body)["error"]["code"] == "rate_limit_exceeded"
    records = await gw.records()
    assert [r.status for r in records] == ["ok", "rate_limit_exceeded"]
    assert list(gw.settles.values()) == [1]          # the admitted one; the refused one held nothing


async def test_compression_summary_call(gw: Gateway) -> None:
    key = await gw.key("squeeze")
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": " ".join(["word"] * 40) + f" {i}"}
             for i in range(7)]
    status, _ = await gw.post(key, {"model": "fast", "messages": turns, "max_tokens": 20})
    assert status == 200
    records = await gw.records()
    assert sorted(r.route for r in records) == ["compression_summary", "default"]
    summary = next(r for r in records if r.route == "compression_summary")
    assert summary.cost_nano > 0 and summary.status == "ok"
    assert len(gw.settles) == 2 and set(gw.settles.values()) == {1} and await gw.reserved("squeeze") == 0


async def test_cancelled_request(gw: Gateway) -> None:
    key = await gw.key("paying")
    task = asyncio.ensure_future(gw.post(key, chat("slow")))
    while not gw.app.state.state._holds:    # the hold is taken and the upstream call is under way
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    record = await gw.one_exit("paying")
    assert record.status == "client_closed" and await gw.reserved("paying") == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_a_bug_in_the_request_path_still_settles_and_records(gw: Gateway, stream: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A foreign exception after the hold (not a gateway error) answers 500 and releases the hold."""
    sim = gw.app.state.providers["simulated"]

    def boom(*_: Any, **__: Any) -> Callable[..., Awaitable[Any]]:
        raise RecursionError("maximum recursion depth exceeded while encoding a JSON object")

    monkeypatch.setattr(sim, "complete", boom)
    monkeypatch.setattr(sim, "stream", boom)
    key = await gw.key("paying")
    status, body = await gw.post(key, chat("fast", stream=stream, max_tokens=100_000))
    assert status == 500 and b"recursion" not in body
    record = await gw.one_exit("paying")
    assert record.status == "internal_error" and record.cost_nano == 0
    assert await gw.reserved("paying") == 0
    monkeypatch.undo()
    assert (await gw.post(key, chat("fast")))[0] == 200     # the team's budget is not locked


async def test_a_lost_reserve_reply_releases_its_hold(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store applied the hold but its reply was lost (issue 11, item 10): the client gets 503 and a $0
    settle releases the hold at once, not after the reservation TTL."""
    from gateway.state.budgets import StateUnavailable
    state = gw.app.state.state
    reserve = state.budgets.reserve

    async def applied_then_lost(req: Any) -> Any:
        await reserve(req)
        raise StateUnavailable("reply lost")

    monkeypatch.setattr(state.budgets, "reserve", applied_then_lost)
    key = await gw.key("paying")
    status, body = await gw.post(key, chat("fast"))
    assert status == 503 and orjson.loads(body)["error"]["code"] == "state_unavailable"
    assert await gw.reserved("paying") == 0
    record = await gw.one_exit("paying")
    assert record.status == "state_unavailable" and record.cost_nano == 0


async def get_json(gw: Gateway, path: str) -> tuple[int, dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await gw.app({"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""}, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, orjson.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


async def test_a_503_at_authentication_leaves_a_ledger_record(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11, item 12: the key state unreachable (a key record on a dead master) refuses with 503 and leaves a
    $0 ledger record, team and key unknown: ``(none)``; a bad key (the client's error) leaves none."""
    from gateway.state.budgets import StateUnavailable
    from gateway.state.ledger import NONE

    key = await gw.key("paying")
    state = gw.app.state.state

    async def unreachable(secret: str) -> Any:
        raise StateUnavailable("key state down")

    assert (await gw.post("not-a-key", chat("fast")))[0] == 401
    monkeypatch.setattr(state.keys, "lookup", unreachable)
    status, body = await gw.post(key, chat("fast"), path="/v1/messages")
    assert status == 503 and b"could not be verified" in body
    [record] = await gw.records()
    assert (record.team, record.key_id, record.status, record.cost_nano) == (NONE, None, "state_unavailable", 0)
    assert (record.requested_model, record.endpoint, record.input_tokens, record.output_tokens) == \
        ("fast", "messages", 0, 0)
    [row] = await state.ledger.totals(0, None, by="team")
    assert (row["key"], row["requests"], row["cost_nano"]) == (NONE, 1, 0)
    assert not gw.settles                                   # nothing was held, nothing settled


async def test_readiness_reports_unwritten_records(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11, item 11: while the ledger store refuses writes, ``/health/ready`` says how many records wait
    and in how many slots; once written, zero."""
    import redis

    state = gw.app.state.state
    inner = state.ledger.inner
    append = inner.append

    async def down(records: Any) -> None:
        raise redis.exceptions.ConnectionError("ledger master down")

    monkeypatch.setattr(inner, "append", down)
    key = await gw.key("paying")
    assert (await gw.post(key, chat("fast")))[0] == 200
    assert (await gw.post(key, chat("fast", stream=True)))[0] == 200
    await state.flush()
    status, body = await get_json(gw, "/health/ready")
    assert status == 200 and (body["unwritten_records"], body["ledger_slots_waiting"]) == (2, 1)
    monkeypatch.setattr(inner, "append", append)
    await state.flush()
    status, body = await get_json(gw, "/health/ready")
    assert status == 200 and (body["unwritten_records"], body["ledger_slots_waiting"]) == (0, 0)
    assert [r.status for r in await gw.records()] == ["ok", "ok"]
