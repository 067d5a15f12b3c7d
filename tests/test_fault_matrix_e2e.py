"""The fault matrix end to end (issue 11, "make it a suite"): every upstream fault, a Redis outage in both fail
modes with and without the spool, and a worker killed mid-load, each against real ``gateway serve`` processes
(2 workers on a private Redis) in front of the mock upstream (bench/mock_upstream.py and its fault knobs).

Each case checks what the client got (status and error code), the request's ledger record (found by its
``x-request-id``: status and cost) and the team's budget to the nano-dollar: spent equal to the ledger's sum and
nothing left reserved. Every wait is on a condition with a generous deadline, never on a timing margin.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis_fixtures import RedisProc, free_port

from conftest import GatewayFactory, Server
from gateway.state.budgets import BudgetRule, period_id
from gateway.state.budgets_redis import OPEN_KEY, RedisBudgetStore, bucket_keys
from gateway.state.keys import RedisKeyStore
from gateway.state.leases import parse_entry
from gateway.state.ledger import LedgerRecord, RedisLedger

pytestmark = pytest.mark.e2e

USD = 1_000_000_000
LIMIT_USD = 100
MSG = [{"role": "user", "content": "hello there"}]
# $1,000 per M input tokens and $5,000 per M output tokens: one input token is 1,000,000 nano, one output
# 5,000,000. The mock counts the prompt as 8 tokens and answers 10, so a whole answer costs 58,000,000 nano;
# a stream cut after 5 chunks (no usage from the upstream) is charged the gateway's own count: 9 in, 5 out.
ANSWER_NANO = 8 * 1_000_000 + 10 * 5_000_000
CUT_NANO = 9 * 1_000_000 + 5 * 5_000_000
PRICE = "price: {input_per_mtok: 1000, output_per_mtok: 5000}"


@dataclass(frozen=True)
class Case:
    name: str            # the fault, also the policy model and its team
    upstream: str        # the mock's model name (its knobs)
    stream: bool
    status: int          # what the client must get
    code: str | None     # the error code, or None for an answer
    cost_nano: int       # what the ledger record (and the budget) must be charged
    timeout_s: float = 0  # the deployment's timeout, 0 for the default


CASES = [
    Case("http500", "mock-status500", False, 502, "upstream_error", 0),
    Case("http500-stream", "mock-status500", True, 502, "upstream_error", 0),
    Case("http429", "mock-status429", False, 429, "rate_limit_exceeded", 0),
    Case("http429-stream", "mock-status429", True, 429, "rate_limit_exceeded", 0),
    Case("reset", "mock-reset", False, 502, "upstream_error", 0),
    Case("reset-stream", "mock-reset", True, 502, "upstream_error", 0),
    Case("badjson", "mock-badjson", False, 502, "upstream_error", 0),
    Case("plainjson-stream", "mock-plainjson-tokens10", True, 200, None, ANSWER_NANO),
    Case("hang", "mock-hang", False, 504, "upstream_timeout", 0, 1.0),
    Case("hang-stream", "mock-hang", True, 504, "upstream_timeout", 0, 1.0),
    Case("drip", "mock-drip", False, 504, "upstream_timeout", 0, 1.0),
    Case("drip-stream", "mock-drip", True, 504, "upstream_timeout", 0, 1.0),
    Case("cut-stream", "mock-cut5-chunks10", True, 200, "upstream_error", CUT_NANO),
    Case("garbage-stream", "mock-garbage", True, 502, "upstream_error", 0),
    Case("ok", "mock-tokens10", False, 200, None, ANSWER_NANO),
    Case("ok-stream", "mock-chunks10", True, 200, None, ANSWER_NANO),
]


TRANSLATED = {"messages": ("/v1/messages", {"max_tokens": 10, "messages": MSG}),
              "responses": ("/v1/responses", {"max_output_tokens": 10, "input": "hello there"})}


def team_of(case: Case) -> str:
    return "f-" + case.name


def matrix_policy(mock: str) -> str:
    lines = ["models:"]
    for case in CASES:
        timeout = f", timeout_s: {case.timeout_s}" if case.timeout_s else ""
        lines += [f"  {case.name}:", "    deployments:",
                  f"      - {{provider: openai, name: {case.name}, model: {case.upstream}, "
                  f"api_base: '{mock}/v1', apis: [chat, completions], {PRICE}{timeout}}}"]
    lines += ["  priced:", "    deployments:",
              f"      - {{provider: openai, name: priced, model: mock-tokens10-chunks10, api_base: '{mock}/v1', "
              f"{PRICE}}}"]
    lines.append("teams:")
    for case in CASES:
        lines.append(f"  {team_of(case)}: {{budgets: [{{period: monthly, usd: {LIMIT_USD}}}]}}")
    for surface in TRANSLATED:
        lines.append(f"  tight-{surface}: {{budgets: [{{period: monthly, usd: 0.1}}]}}")
    return "\n".join(lines) + "\n"


def load_policy(mock: str, team: str) -> str:
    return (f"models:\n  priced:\n    deployments:\n      - {{provider: openai, name: priced, "
            f"model: mock-tokens10-chunks10, api_base: '{mock}/v1', {PRICE}}}\n"
            f"  slow:\n    deployments:\n      - {{provider: openai, name: slow, "
            f"model: mock-tokens10-chunks10-lat50-delay50, api_base: '{mock}/v1', {PRICE}}}\n"
            f"teams:\n  {team}: {{budgets: [{{period: monthly, usd: {LIMIT_USD}}}]}}\n")


async def new_key(port: int, team: str) -> str:
    client = Redis(host="127.0.0.1", port=port)
    try:
        _, secret = await RedisKeyStore(client).create(team, "faults")
        return secret
    finally:
        await client.aclose()


async def budget(rc: Any, team: str) -> tuple[int, int]:
    """(spent, reserved) of the team's monthly budget, in nano-USD (one Redis or a cluster)."""
    [u] = await RedisBudgetStore(rc).usage(team, [BudgetRule("team", team, "monthly", LIMIT_USD * USD)],
                                           datetime.now(UTC))
    return u.spent_nano, u.reserved_nano


async def wait_for(check: Any, timeout: float = 60.0) -> Any:
    """Poll an async condition until it holds (returns its last value either way)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value[0] or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


async def records_by_id(rc: Redis, since: float, team: str, ids: set[str],
                        timeout: float = 60.0) -> dict[str, list[LedgerRecord]]:
    """The team's ledger records grouped by request id, once every id in ``ids`` has one."""
    ledger = RedisLedger(rc)

    async def check() -> tuple[bool, dict[str, list[LedgerRecord]]]:
        grouped: dict[str, list[LedgerRecord]] = {}
        for record in await ledger.read(since, team=team):
            grouped.setdefault(record.request_id, []).append(record)
        return ids <= grouped.keys(), grouped

    return (await wait_for(check, timeout))[1]


async def settled(rc: Redis, team: str, total: int, timeout: float = 60.0) -> tuple[int, int]:
    """The team's (spent, reserved) once it equals (total, 0), or its last value at the deadline."""
    async def check() -> tuple[bool, tuple[int, int]]:
        used = await budget(rc, team)
        return used == (total, 0), used
    return (await wait_for(check, timeout))[1]


@dataclass
class Reply:
    status: int
    request_id: str | None
    code: str | None           # the error code: of the body, or of an error event inside a 200 stream
    text: str
    cost_usd: float | None     # usage.cost_usd the client was told
    complete: bool             # a stream ended with [DONE]
    retry_after: str | None = None


def error_code_in(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            try:
                event = json.loads(line[6:])
            except ValueError:
                continue
            if isinstance(event, dict) and isinstance(event.get("error"), dict):
                return str(event["error"].get("code"))
    return None


def cost_in(text: str) -> float | None:
    cost = None
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            try:
                event = json.loads(line[6:])
            except ValueError:
                continue
            if isinstance(event, dict) and isinstance(event.get("usage"), dict):
                cost = event["usage"].get("cost_usd")
    return cost


async def call(client: httpx.AsyncClient, url: str, key: str, model: str, stream: bool) -> Reply:
    body: dict[str, Any] = {"model": model, "messages": MSG, "max_tokens": 10}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    chunks: list[bytes] = []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {key}"}) as resp:
        try:
            async for chunk in resp.aiter_bytes():
                chunks.append(chunk)
        except httpx.HTTPError:
            pass                                 # a 200 stream the gateway had to cut
    text = b"".join(chunks).decode("utf-8", "replace")
    rid = resp.headers.get("x-request-id")
    if resp.status_code != 200 or not stream:
        try:
            data = json.loads(text)
        except ValueError:
            data = {}
        err = data.get("error") if isinstance(data, dict) else None
        usage = data.get("usage") if isinstance(data, dict) else None
        return Reply(resp.status_code, rid, err.get("code") if isinstance(err, dict) else None, text,
                     usage.get("cost_usd") if isinstance(usage, dict) else None, True,
                     resp.headers.get("retry-after"))
    return Reply(200, rid, error_code_in(text), text, cost_in(text), text.rstrip().endswith("data: [DONE]"))


@pytest.fixture(scope="module")
def matrix_gateway(tmp_path_factory: pytest.TempPathFactory, redis_port: int,
                   mock_upstream: str) -> Any:
    from conftest import start_gateway, stop
    policy_dir = tmp_path_factory.mktemp("matrix")
    (policy_dir / "models.yaml").write_text(matrix_policy(mock_upstream))
    server = start_gateway(policy_dir, policy_dir / "gateway.log",
                           env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}, args=("--workers", "2"))
    yield server
    stop(server.proc)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_upstream_fault(case: Case, matrix_gateway: Server, redis_port: int) -> None:
    team = team_of(case)
    key = await new_key(redis_port, team)
    rc = Redis(host="127.0.0.1", port=redis_port)
    try:
        before = await settled(rc, team, (await budget(rc, team))[0], timeout=5)
        since = time.time() - 1
        async with httpx.AsyncClient(timeout=120) as client:
            replies = [await call(client, matrix_gateway.url, key, case.name, case.stream) for _ in range(2)]
        for reply in replies:
            assert reply.status == case.status, (case, reply.text[:300])
            assert reply.status == 200 or reply.code == case.code, reply.text[:300]
            if reply.status == 429:                      # the upstream's retry-after (1 s) reaches the client
                assert reply.retry_after == "1", reply
            assert reply.request_id
            if case.status == 200 and case.code is None:
                assert reply.complete and reply.code is None, reply.text[:300]
            if case.status == 200 and case.code is not None:  # cut after the 200: never a clean end
                assert not reply.complete and reply.code == case.code, reply.text[-300:]
            assert "127.0.0.1" not in reply.text and "mock failure" not in reply.text
        ids = {r.request_id for r in replies if r.request_id}
        grouped = await records_by_id(rc, since, team, ids)
        assert all(len(grouped.get(i, [])) == 1 for i in ids), {i: len(grouped.get(i, [])) for i in ids}
        records = [grouped[r.request_id][0] for r in replies if r.request_id]
        for reply, record in zip(replies, records, strict=True):
            assert record.cost_nano == case.cost_nano, (case, record)
            if case.code is None:
                assert record.status == "ok", record
            else:
                assert record.status != "ok", record
            if reply.cost_usd is not None:             # what the client was told is what was charged
                assert round(reply.cost_usd * USD) == record.cost_nano, (reply.cost_usd, record)
        total = before[0] + sum(r.cost_nano for r in records)
        assert await settled(rc, team, total) == (total, 0)
    finally:
        await rc.aclose()


@pytest.mark.parametrize("surface", sorted(TRANSLATED))
async def test_translated_surfaces_never_settle_above_a_tight_budget(surface: str, matrix_gateway: Server,
                                                                    redis_port: int) -> None:
    """Messages and Responses sent to a chat-only deployment: the hold must cover the prompt, so the last request
    admitted with a partial hold (its output lowered to what the headroom pays for) still fits the $0.10."""
    team = f"tight-{surface}"
    key = await new_key(redis_port, team)
    path, extra = TRANSLATED[surface]
    statuses = []
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(6):                                  # $0.058 each: the budget ends at the second
            r = await client.post(f"{matrix_gateway.url}{path}", headers={"x-api-key": key},
                                  json={"model": "ok", **extra})
            statuses.append(r.status_code)
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    rc = Redis(host="127.0.0.1", port=redis_port)
    try:
        [u] = await RedisBudgetStore(rc).usage(team, [BudgetRule("team", team, "monthly", USD // 10)],
                                               datetime.now(UTC))
        assert u.reserved_nano == 0 and u.spent_nano <= USD // 10, (u.spent_nano, u.reserved_nano)
    finally:
        await rc.aclose()


# --- Redis killed and restarted mid-load; a worker killed mid-load

async def drive(url: str, key: str, loops: int, per_loop: int, replies: list[Reply],
                model: str = "priced", every: int = 3) -> None:
    """``loops`` clients sending ``per_loop`` requests each (one in ``every`` a stream), recording every reply."""
    limits = httpx.Limits(max_connections=loops, max_keepalive_connections=loops)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def loop(n: int) -> None:
            for i in range(per_loop):
                try:
                    replies.append(await call(client, url, key, model, stream=(n + i) % every == 0))
                except httpx.HTTPError:
                    replies.append(Reply(0, None, "transport", "", None, False))   # no answer at all
                await asyncio.sleep(0.01)
        await asyncio.gather(*(loop(n) for n in range(loops)))


def redis_args() -> tuple[str, ...]:
    return ("--appendonly", "yes", "--appendfsync", "always")    # keys and budgets survive the restart


@pytest.mark.parametrize("spool", [False, True], ids=["memory-queue", "spool"])
@pytest.mark.parametrize("fail_mode", ["refuse", "allow"])
async def test_redis_killed_and_restarted_mid_load(fail_mode: str, spool: bool, gateway: GatewayFactory,
                                                   mock_upstream: str, tmp_path: Path) -> None:
    port = free_port()
    rdir = tmp_path / "redis"
    redis_proc = RedisProc(port, rdir, *redis_args())
    team = f"r-{uuid.uuid4().hex[:8]}"
    env = {"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{port}/0", "GATEWAY_REDIS_FAIL_MODE": fail_mode,
           "GATEWAY_KEY_CACHE_TTL_S": "120"}                    # both workers keep the key through the outage
    if spool:
        env["GATEWAY_SPOOL_DIR"] = str(tmp_path / "spool")
    try:
        server = gateway(load_policy(mock_upstream, team), env=env, args=("--workers", "2"))
        key = await new_key(port, team)
        since = time.time() - 1
        warm: list[Reply] = []
        await drive(server.url, key, 16, 2, warm)               # 16 connections: both workers see the key
        assert {r.status for r in warm} == {200}, [r.text[:200] for r in warm if r.status != 200]
        replies: list[Reply] = []
        outage: list[int] = []                                   # replies counted when Redis stopped

        async def outage_mid_load() -> None:
            while len(replies) < 20:
                await asyncio.sleep(0.05)
            redis_proc.stop()
            outage.append(len(replies))
            deadline = time.monotonic() + 60                     # until 12 replies came back while it was down
            while len(replies) < outage[0] + 12 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            outage.append(len(replies))
            redis_proc.__init__(port, rdir, *redis_args())  # type: ignore[misc]

        await asyncio.gather(drive(server.url, key, 4, 40, replies), outage_mid_load())
        during = replies[outage[0]:outage[1]]
        statuses = {r.status for r in replies}
        if fail_mode == "allow":
            assert statuses == {200}, [r.text[:200] for r in replies if r.status != 200][:3]
        else:
            assert statuses <= {200, 503}, [r.text[:200] for r in replies if r.status not in (200, 503)][:3]
            assert any(r.status == 503 for r in during), [r.status for r in during]
            assert all(r.code == "state_unavailable" for r in replies if r.status == 503)
        answered = warm + replies
        ids = {r.request_id for r in answered}
        assert None not in ids and len(ids) == len(answered)
        rc = Redis(host="127.0.0.1", port=port)
        try:
            grouped = await records_by_id(rc, since, team, ids)   # type: ignore[arg-type]
            assert set(grouped) == ids, (len(ids - set(grouped)), "answered requests without a record")
            doubled = {i: len(v) for i, v in grouped.items() if len(v) != 1}
            assert not doubled, doubled
            for reply in answered:
                [record] = grouped[reply.request_id]             # type: ignore[index]
                assert record.cost_nano == (ANSWER_NANO if reply.status == 200 else 0), (reply, record)
            total = sum(v[0].cost_nano for v in grouped.values())
            assert await settled(rc, team, total) == (total, 0)  # queued settles replayed, no hold left
        finally:
            await rc.aclose()
    finally:
        redis_proc.stop()


def worker_pids(parent: int) -> list[int]:
    """The uvicorn worker processes of a ``gateway serve --workers N`` (children running spawn_main)."""
    pids = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"spawn_main" in cmdline or b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
                pids.append(int(child))
    return pids


@dataclass
class KillRun:
    answered: list[Reply]          # complete answers (a body, or a stream to its end)
    lost: list[Reply]              # no answer or a stream cut by the worker's death
    records: dict[str, list[LedgerRecord]]   # every ledger record of the team, by request id
    used: tuple[int, int]          # the team's (spent, reserved) once settled or at the deadline
    holds: set[int]                # the amounts the team's holds had just before the kill
    settled_after_s: float         # from the kill until nothing was reserved and spent equalled the ledger


async def settled_run(rc: Any, used_of: Any, team: str, since: float, answered: list[Reply], lost: list[Reply],
                      holds: set[int], killed_at: float, timeout: float) -> KillRun:
    """The :class:`KillRun` once every answer has its record and the team's spent equals its ledger with nothing
    reserved (or at ``timeout``): ``used_of(rc, team)`` reads (spent, reserved)."""
    ledger = RedisLedger(rc)

    async def check() -> tuple[bool, tuple[dict[str, list[LedgerRecord]], tuple[int, int]]]:
        grouped: dict[str, list[LedgerRecord]] = {}
        for record in await ledger.read(since, team=team):
            grouped.setdefault(record.request_id, []).append(record)
        used = await used_of(rc, team)
        total = sum(r.cost_nano for v in grouped.values() for r in v)
        done = used == (total, 0) and {r.request_id for r in answered} <= grouped.keys()
        return done, (grouped, used)

    grouped, used = (await wait_for(check, timeout))[1]
    return KillRun(answered, lost, grouped, used, holds, time.monotonic() - killed_at)


def check_nothing_doubled_and_holds_ended(run: KillRun, within_s: float) -> None:
    """A killed worker's run: 288 requests, most answered, none recorded twice, nothing reserved (the dead
    worker's holds swept, not waiting out the 900 s TTL) within ``within_s``, spent equal to the ledger sum."""
    assert len(run.answered) >= 150 and len(run.answered) + len(run.lost) == 288, (len(run.answered), len(run.lost))
    assert all(r.status == 200 and r.request_id for r in run.answered)
    doubled = {i: len(v) for i, v in run.records.items() if len(v) != 1}
    assert not doubled, doubled
    spent, reserved = run.used
    assert reserved == 0, run.used
    assert run.settled_after_s < within_s
    assert spent == sum(v[0].cost_nano for v in run.records.values())


def check_every_answer_recorded(run: KillRun) -> None:
    missing = [r.request_id for r in run.answered if r.request_id not in run.records]
    assert not missing, f"{len(missing)} of {len(run.answered)} answered requests have no ledger record"
    assert all(run.records[r.request_id][0].status == "ok" for r in run.answered if r.request_id)
    assert all(run.records[r.request_id][0].cost_nano == ANSWER_NANO for r in run.answered if r.request_id)


def check_interrupted_charged_their_hold(run: KillRun) -> None:
    """The streams cut by the worker's death: each has one record, ``interrupted`` and charged exactly its hold
    (all requests here are alike, so every hold had one amount, read from Redis just before the kill)."""
    interrupted = [v[0] for v in run.records.values() if v[0].status == "interrupted"]
    assert interrupted, "no request was in flight on the killed worker"
    assert len(run.holds) == 1, run.holds
    [hold] = run.holds
    assert hold > ANSWER_NANO                                      # the worst case, not what an answer costs
    assert all(r.cost_nano == hold and r.estimated and r.hold_id for r in interrupted), interrupted[:3]
    assert not {r.request_id for r in interrupted} & {r.request_id for r in run.answered}   # never a whole answer
    assert len(interrupted) <= len(run.lost)                      # a cut stream, or no reply (before its headers)
    others = [v[0] for v in run.records.values() if v[0].status != "interrupted"]
    assert all(r.status == "ok" and r.cost_nano == ANSWER_NANO for r in others)


LEASE_S = 2          # the workers' lease: a dead worker's holds end within a few seconds (the TTL stays 900 s)


@pytest.fixture(scope="module")
def worker_killed_run(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str, redis_port: int) -> KillRun:
    """288 slow streams (24 clients) on 2 workers; one worker SIGKILLed after 60 answers."""
    from conftest import start_gateway, stop
    team = f"w-{uuid.uuid4().hex[:8]}"
    policy_dir = tmp_path_factory.mktemp("killed")
    (policy_dir / "models.yaml").write_text(load_policy(mock_upstream, team))
    server = start_gateway(policy_dir, policy_dir / "gateway.log",
                           env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                                "GATEWAY_WORKER_LEASE_S": str(LEASE_S)},
                           args=("--workers", "2"))
    try:
        workers = worker_pids(server.proc.pid)
        assert len(workers) == 2, workers
        return asyncio.run(_kill_run(server, workers, team, redis_port))
    finally:
        stop(server.proc)


async def in_flight(rc: Any, open_hash: str, workers: list[int]) -> dict[int, int]:
    """Requests each worker process holds open intents for in ``open_hash`` (its worker id starts with its PID)."""
    counts = dict.fromkeys(workers, 0)
    for value in (await rc.hgetall(open_hash)).values():
        kind, owner, _, _ = parse_entry(value)
        pid = owner.split("-", 1)[0]                              # other tests' workers may be named otherwise
        if kind == "I" and pid.isdigit() and int(pid) in counts:
            counts[int(pid)] += 1
    return counts


async def kill_mid_stream(rc: Any, url: str, key: str, team: str, workers: list[int], open_hash: str,
                          timeout: float) -> KillRun:
    """Slow streams (10 chunks 50 ms apart) from 24 clients: once 60 replies are in, the worker holding the most
    open intents in ``open_hash`` is SIGKILLed (many requests in flight, many just finished); the settled run
    (see :func:`settled_run`)."""
    since = time.time() - 1
    replies: list[Reply] = []
    holds: set[int] = set()
    killed: list[float] = []
    bucket = bucket_keys(team, BudgetRule("team", team, "monthly", LIMIT_USD * USD),
                         period_id("monthly", datetime.now(UTC)))[0]

    async def kill_mid_load() -> None:
        while len(replies) < 60:
            await asyncio.sleep(0.01)
        for _ in range(2000):                                     # the worker with requests in flight dies
            counts = await in_flight(rc, open_hash, workers)
            victim = max(counts, key=lambda pid: counts[pid])
            if counts[victim]:
                break
            await asyncio.sleep(0.01)
        holds.update(int(v) for k, v in (await rc.hgetall(bucket)).items() if k.startswith(b"r:"))
        os.kill(victim, signal.SIGKILL)                           # our own gateway's worker, by PID
        killed.append(time.monotonic())

    await asyncio.gather(drive(url, key, 24, 12, replies, model="slow", every=1), kill_mid_load())
    answered = [r for r in replies if r.status and r.complete]
    lost = [r for r in replies if not (r.status and r.complete)]
    return await settled_run(rc, budget, team, since, answered, lost, holds, killed[0], timeout)


async def _kill_run(server: Server, workers: list[int], team: str, redis_port: int) -> KillRun:
    key = await new_key(redis_port, team)
    rc = Redis(host="127.0.0.1", port=redis_port)
    try:
        return await kill_mid_stream(rc, server.url, key, team, workers, OPEN_KEY, 60)
    finally:
        await rc.aclose()


def test_worker_killed_mid_load_its_holds_end_within_seconds_and_nothing_is_doubled(worker_killed_run: KillRun) -> None:
    check_nothing_doubled_and_holds_ended(worker_killed_run, 60)


def test_worker_killed_mid_load_every_answer_has_its_record(worker_killed_run: KillRun) -> None:
    check_every_answer_recorded(worker_killed_run)


def test_worker_killed_mid_load_its_requests_in_flight_are_recorded_as_interrupted(worker_killed_run: KillRun) -> None:
    check_interrupted_charged_their_hold(worker_killed_run)
