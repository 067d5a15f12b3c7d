"""A small pipelining Redis client for the budget script's hot path.

Every admitted request runs the budget script twice (reserve, settle). Through
``redis.asyncio`` each call costs the gateway ~0.15 ms of CPU in connection-pool,
retry and timeout machinery; here a call is one packed command written to a shared
connection and one future resolved by hiredis's C parser, in order (Redis answers a
connection's commands in the order sent, so many coroutines can share it without
waiting for each other). A call not answered within the timeout fails the connection (its
replies would be out of step) and every call in flight on it; one timer per connection checks
the oldest call, instead of a timeout context per call. It speaks plain ``redis://`` to a single server only (no TLS,
no cluster, no unix sockets: :func:`fast_client` says when it cannot serve a URL) and
raises redis-py's exception types, so :class:`RedisBudgetStore` works with either
client unchanged. A lost connection fails the calls in flight and the next call
reconnects.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


class _Protocol(asyncio.Protocol):
    def __init__(self, timeout_s: float = 1.0, name: str = "Redis") -> None:
        self.reader = hiredis.Reader()
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.deadlines: deque[float] = deque()   # loop time by which each pending call must be answered
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.outgoing: list[bytes] = []   # commands of this loop iteration, written together
        self.timeout_s = timeout_s
        self.name = name
        self.watchdog: asyncio.TimerHandle | None = None

    def call(self, command: bytes) -> asyncio.Future[Any]:
        """Send ``command``; the future of its reply (failed with the connection, or when the timeout passes)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self.closed:
            future.set_exception(RedisConnectionError(f"connection to {self.name} lost"))
            return future
        self.pending.append(future)
        self.deadlines.append(loop.time() + self.timeout_s)
        self.queue(command)
        if self.watchdog is None:
            self.watchdog = loop.call_later(self.timeout_s, self.check)
        return future

    def check(self) -> None:
        """The watchdog: fail the connection when its oldest call is overdue, else look again when it is due."""
        self.watchdog = None
        if not self.deadlines or self.closed:
            return
        loop = asyncio.get_running_loop()
        left = self.deadlines[0] - loop.time()
        if left <= 0:
            self.fail(RedisTimeoutError(f"{self.name} did not answer within {self.timeout_s}s"))
        else:
            self.watchdog = loop.call_later(left, self.check)

    def queue(self, command: bytes) -> None:
        if not self.outgoing:
            asyncio.get_running_loop().call_soon(self.flush)
        self.outgoing.append(command)

    def flush(self) -> None:
        if self.outgoing and self.transport is not None and not self.closed:
            self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.pending
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not pending:   # an answer nobody asked for: the stream is out of step
                self.fail(RedisConnectionError("unexpected reply from Redis"))
                return
            future = pending.popleft()
            self.deadlines.popleft()
            if future.done():     # its caller was cancelled
                continue
            if isinstance(reply, hiredis.ReplyError):
                text = str(reply)
                future.set_exception(NoScriptError(text) if text.startswith("NOSCRIPT") else ResponseError(text))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def fail(self, exc: Exception) -> None:
        self.closed = True
        self.deadlines.clear()
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class FastRedis:
    """``evalsha``, ``eval``, ``script_load``, ``ping`` and ``aclose`` over one pipelined connection."""

    def __init__(self, host: str, port: int, db: int = 0, username: str | None = None,
                 password: str | None = None, timeout_s: float = 1.0) -> None:
        self.host, self.port, self.db = host, port, db
        self.username, self.password = username, password
        self.timeout_s = timeout_s
        self._conn: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connection(self) -> _Protocol:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._conn is not None and not self._conn.closed:
                return self._conn
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self.timeout_s):
                    transport, proto = await loop.create_connection(
                        lambda: _Protocol(self.timeout_s, f"Redis at {self.host}:{self.port}"), self.host, self.port)
                    proto.transport = transport   # uvloop calls connection_made a little later
                    self._conn = proto
                    if self.password is not None:
                        auth = (self.username, self.password) if self.username else (self.password,)
                        await self._send(proto, ("AUTH", *auth))
                    if self.db:
                        await self._send(proto, ("SELECT", self.db))
            except TimeoutError:
                raise RedisTimeoutError(f"connecting to Redis at {self.host}:{self.port} timed out") from None
            except OSError as exc:
                raise RedisConnectionError(f"cannot connect to Redis at {self.host}:{self.port}: {exc}") from None
            return proto

    async def _send(self, conn: _Protocol, args: tuple[Any, ...]) -> Any:
        return await conn.call(hiredis.pack_command(args))

    async def execute_command(self, *args: Any) -> Any:
        return await self._send(await self._connection(), args)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.execute_command("EVAL", script, numkeys, *keys_and_args)

    async def script_load(self, script: str) -> Any:
        return await self.execute_command("SCRIPT", "LOAD", script)

    async def ping(self) -> bool:
        return await self.execute_command("PING") in (b"PONG", "PONG")

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.fail(RedisConnectionError("client closed"))
            self._conn = None


def fast_client(url: str, timeout_s: float) -> FastRedis | None:
    """A :class:`FastRedis` for a plain ``redis://host[:port][/db]`` URL, or None when it cannot serve it."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname or parts.query:
        return None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        return None
    return FastRedis(parts.hostname, parts.port or 6379, int(path or 0),
                     unquote(parts.username) if parts.username else None,
                     unquote(parts.password) if parts.password else None, timeout_s)
