"""Byte-level fuzz of the HTTP edge (issue 11, "make it a suite"): one ``gateway serve`` on Redis, fed raw bytes on
loopback sockets: random bytes, truncated and oversized heads, bad and conflicting content-lengths, chunked bodies
cut short or malformed, slowloris-style partial requests, and valid requests whose JSON body is mutated byte by
byte. The body-level property fuzz of every endpoint lives in test_hostile_input.py (in process, hypothesis).

Checked for every connection: no 5xx status line ever, and the server ends every connection on its own (no
hang). Afterwards: the team's budget holds nothing and was charged exactly what the answered requests were told
they cost, the server still answers, and its resident memory stayed bounded. Inputs come from a seeded
generator, so a failure replays.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_fault_matrix_e2e import LIMIT_USD, USD, budget, new_key

from conftest import Server, start_gateway, stop

pytestmark = pytest.mark.e2e

SEED = 11
DEADLINE_S = 60.0           # generous: the server drops a stalled request after GATEWAY_REQUEST_READ_TIMEOUT_S (2)
TEAM = "fuzz"
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str, redis_port: int) -> Iterator[Server]:
    policy_dir = tmp_path_factory.mktemp("edge")
    (policy_dir / "models.yaml").write_text(
        f"models:\n  mock:\n    deployments:\n      - {{provider: openai, model: mock-tokens10, "
        f"api_base: '{mock_upstream}/v1', price: {{input_per_mtok: 1000, output_per_mtok: 5000}}}}\n"
        f"teams:\n  {TEAM}: {{budgets: [{{period: monthly, usd: {LIMIT_USD}}}]}}\n")
    server = start_gateway(policy_dir, policy_dir / "gateway.log",
                           env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                                "GATEWAY_KEEPALIVE_TIMEOUT_S": "2", "GATEWAY_REQUEST_READ_TIMEOUT_S": "2",
                                "GATEWAY_MAX_BODY_BYTES": "65536"})
    yield server
    stop(server.proc)


def valid_body(rng: random.Random) -> bytes:
    return json.dumps({"model": "mock", "max_tokens": 10,
                       "messages": [{"role": "user", "content": "hello " * rng.randint(1, 20)}]}).encode()


def head(key: str, extra: str = "", length: int | None = None, path: str = "/v1/chat/completions") -> bytes:
    cl = "" if length is None else f"Content-Length: {length}\r\n"
    return (f"POST {path} HTTP/1.1\r\nHost: fuzz\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\n{cl}{extra}\r\n").encode()


def cases(key: str) -> list[tuple[str, list[bytes]]]:
    """(kind, the pieces sent): the connection then stays open until the server ends it (a truncated request
    also closes its writing side)."""
    rng = random.Random(SEED)
    out: list[tuple[str, list[bytes]]] = []
    for _ in range(60):
        out.append(("random bytes", [rng.randbytes(rng.randint(1, 4096))]))
    for _ in range(20):                                   # a plausible start, then noise
        out.append(("request line then noise", [b"POST /v1/chat/completions HTTP/1.1\r\n" +
                                                rng.randbytes(rng.randint(1, 2048))]))
    for _ in range(20):                                   # a valid request cut anywhere, connection then closed
        whole = head(key, length=len(body := valid_body(rng))) + body
        out.append(("truncated request", [whole[:rng.randint(1, len(whole) - 1)]]))
    for _ in range(10):                                   # the same, but the connection held open (slowloris)
        whole = head(key, length=len(body := valid_body(rng))) + body
        out.append(("stalled request", [whole[:rng.randint(1, len(whole) - 1)]]))
    out.append(("one huge header", [head(key, "X-Big: " + "a" * 200_000 + "\r\n", 2) + b"{}"]))
    out.append(("many headers", [head(key, "".join(f"X-H{i}: v\r\n" for i in range(5000)), 2) + b"{}"]))
    out.append(("huge request line", [b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"]))
    body = valid_body(rng)
    for bad in ("abc", "-1", "1e3", "99999999999999999999", " 5", "0x10", f"{len(body)}, {len(body) + 1}"):
        out.append((f"content-length {bad!r}", [head(key, f"Content-Length: {bad}\r\n") + body]))
    out.append(("two content-lengths", [head(key, f"Content-Length: {len(body)}\r\nContent-Length: 3\r\n") + body]))
    out.append(("content-length and chunked",
                [head(key, f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n") + body]))
    out.append(("content-length over the limit", [head(key, length=10_000_000) + body]))
    out.append(("content-length shorter than the body", [head(key, length=5) + body]))
    chunked = head(key, "Transfer-Encoding: chunked\r\n")
    out.append(("chunk cut short", [chunked + b"%x\r\n" % (len(body) + 50) + body]))
    out.append(("bad chunk size", [chunked + b"zz\r\n" + body + b"\r\n0\r\n\r\n"]))
    out.append(("chunk size overflow", [chunked + b"ffffffffffffffffffff\r\n" + body + b"\r\n0\r\n\r\n"]))
    out.append(("no final chunk", [chunked + b"%x\r\n" % len(body) + body + b"\r\n"]))
    out.append(("chunked body over the limit", [chunked + (b"8000\r\n" + b"a" * 0x8000 + b"\r\n") * 2]))
    for _ in range(40):                                   # valid framing, the JSON mutated
        raw = bytearray(valid_body(rng))
        for _ in range(rng.randint(1, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        out.append(("mutated body", [head(key, length=len(raw)) + bytes(raw)]))
    for _ in range(10):                                   # well-formed requests: these are answered and billed
        body = valid_body(rng)
        out.append(("valid", [head(key, length=len(body)) + body]))
    slow = head(key, length=len(body)) + body             # slowloris: a few bytes at a time, never finished
    out.append(("slowloris", [slow[i:i + 3] for i in range(0, 60, 3)]))
    return out


async def exchange(port: int, pieces: list[bytes], hold: bool, wait_s: float = DEADLINE_S) -> tuple[bytes, bool]:
    """Send the pieces; return what the server sent and whether it ended the connection before the deadline."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    deadline = time.monotonic() + wait_s
    try:
        for piece in pieces:
            if piece:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.05 if len(pieces) > 3 else 0)
        if not hold:
            writer.write_eof()
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(reader.read(65536), timeout=deadline - time.monotonic())
            except TimeoutError:
                return bytes(received), False
            if not data:
                return bytes(received), True
            received += data
        return bytes(received), False
    except (ConnectionResetError, BrokenPipeError):
        return bytes(received), True
    finally:
        writer.close()


async def test_byte_level_fuzz_never_gets_a_5xx_hangs_or_leaves_a_hold(edge: Server, redis_port: int) -> None:
    from redis.asyncio import Redis
    key = await new_key(redis_port, TEAM)
    async with httpx.AsyncClient() as client:                 # warm up: the first requests load what they need
        for _ in range(3):
            r = await client.post(f"{edge.url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                  json={"model": "mock", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
    rc = Redis(host="127.0.0.1", port=redis_port)
    spent_before = (await budget(rc, TEAM))[0]
    rss_before = rss_kb(edge.proc.pid)
    all_cases = cases(key)
    sem = asyncio.Semaphore(16)

    async def one(kind: str, pieces: list[bytes]) -> tuple[str, bytes, bool]:
        async with sem:
            hold = kind != "truncated request"       # only these half-close; the rest wait for the server
            received, ended = await exchange(edge.port, pieces, hold)
            return kind, received, ended

    results = await asyncio.gather(*(one(kind, pieces) for kind, pieces in all_cases))
    statuses: dict[str, list[int]] = {}
    for kind, received, ended in results:
        codes = [int(m) for m in STATUS.findall(received)]
        statuses.setdefault(kind, []).extend(codes)
        assert all(code < 500 for code in codes), (kind, received[:300])
        assert ended, f"a {kind} connection was left open by the server"
    assert statuses["valid"] == [200] * 10, statuses["valid"]     # the fuzz reached the API, not only the parser
    assert all(c in (400, 413, 431) for c in statuses["content-length over the limit"] +
               statuses["chunked body over the limit"] + statuses["one huge header"]), statuses
    # the answered requests were billed what they were told; nothing is left reserved
    told = 0
    for _, received, _ in results:
        for cost in re.findall(rb'"cost_usd":([0-9.e-]+)', received):
            told += round(float(cost) * USD)
    deadline = time.monotonic() + 60
    while (used := await budget(rc, TEAM)) != (spent_before + told, 0) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert used == (spent_before + told, 0)
    await rc.aclose()
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{edge.url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                              json={"model": "mock", "messages": [{"role": "user", "content": "still there?"}]})
        assert r.status_code == 200
    rss_after = rss_kb(edge.proc.pid)
    assert rss_after < rss_before + 100_000, (rss_before, rss_after)   # kB: a generous 100 MB


def over_the_limit_then_the_rest(key: str) -> list[bytes]:
    chunked = head(key, "Transfer-Encoding: chunked\r\n")
    return [chunked + (b"8000\r\n" + b"a" * 0x8000 + b"\r\n") * 4 + b"0\r\n\r\n"]


async def test_a_body_still_arriving_after_its_413_does_not_keep_the_connection_open(
        edge: Server, redis_port: int) -> None:
    key = await new_key(redis_port, TEAM)
    # 20 s: ten times the keep-alive timeout (2 s) that should end it
    received, ended = await exchange(edge.port, over_the_limit_then_the_rest(key), hold=True, wait_s=20)
    assert STATUS.findall(received) == [b"413"]
    assert ended, "the connection was left open after the 413 and the rest of the body"
