"""The pipelining Redis client (gateway/state/resp.py) against a private redis-server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.exceptions as rexc
from redis_fixtures import RedisProc, free_port

from gateway.state.resp import FastRedis, fast_client


async def test_pipelined_replies_arrive_in_order(redis_port: int) -> None:
    r = FastRedis("127.0.0.1", redis_port, db=3)
    try:
        await r.execute_command("DEL", "resp:n")
        replies = await asyncio.gather(*(r.execute_command("INCR", "resp:n") for _ in range(500)))
        assert replies == list(range(1, 501))
        assert await r.execute_command("GET", "resp:n") == b"500"
        assert await r.ping() is True
        assert await r.eval("return {KEYS[1], ARGV[1], 7}", 1, "k", "v") == [b"k", b"v", 7]
    finally:
        await r.execute_command("DEL", "resp:n")
        await r.aclose()


async def test_errors_map_to_redis_py_exceptions(redis_port: int) -> None:
    r = FastRedis("127.0.0.1", redis_port)
    try:
        with pytest.raises(rexc.NoScriptError):
            await r.evalsha("0" * 40, 0)
        with pytest.raises(rexc.ResponseError, match="wrong number of arguments"):
            await r.execute_command("GET")
        assert await r.ping() is True          # an error reply leaves the connection usable
    finally:
        await r.aclose()


@pytest.mark.e2e
async def test_reconnects_after_a_restart_and_fails_fast_while_down(tmp_path: Path) -> None:
    port = free_port()
    server = RedisProc(port, tmp_path / "r")
    r = FastRedis("127.0.0.1", port, timeout_s=0.5)
    try:
        assert await r.ping() is True
        server.stop()
        with pytest.raises(rexc.ConnectionError):
            await r.ping()
        with pytest.raises(rexc.ConnectionError):
            await r.ping()                        # refused: no hang
        server = RedisProc(port, tmp_path / "r")
        assert await r.ping() is True
    finally:
        await r.aclose()
        server.stop()


async def test_a_silent_server_times_out() -> None:
    release, handled = asyncio.Event(), asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(1024)
            await release.wait()   # never answers; let go (and closed) when the test ends
        finally:
            writer.close()
            handled.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r = FastRedis("127.0.0.1", port, timeout_s=0.3)
    try:
        with pytest.raises(rexc.TimeoutError):
            await r.ping()
    finally:
        await r.aclose()
        release.set()
        await asyncio.wait_for(handled.wait(), 30)   # the connection is closed on this test's loop
        server.close()
        await server.wait_closed()


def test_only_plain_single_server_urls_are_served() -> None:
    client = fast_client("redis://:s3cret@127.0.0.1:7000/2", 1.0)
    assert client is not None and (client.host, client.port, client.db, client.password) == ("127.0.0.1", 7000, 2,
                                                                                            "s3cret")
    assert fast_client("rediss://127.0.0.1:7000", 1.0) is None
    assert fast_client("unix:///tmp/redis.sock", 1.0) is None
    assert fast_client("redis://127.0.0.1:7000/0?protocol=3", 1.0) is None
