"""A small pooled HTTP/1.1 client for upstream calls, on asyncio and httptools.

The request path's one network primitive: keep-alive connections per origin,
requests written in one syscall, responses parsed by httptools (content-length
and chunked), bodies read whole or streamed chunk by chunk for SSE. It is a
fraction of the CPU cost of general clients, which matters at thousands of
requests per second on one core. Errors surface as :class:`HttpClientError`
subclasses; the providers translate them into the gateway's error tree.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools


class HttpClientError(Exception):
    pass


class ConnectFailed(HttpClientError):
    pass


class ConnectionClosed(HttpClientError):
    """The peer closed the connection or sent something unparseable mid-response."""


class Timeout(HttpClientError):
    pass


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int
    base_path: str

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


class Response:
    """One upstream response; its body arrives as the connection reads it."""

    __slots__ = ("status", "headers", "_chunks", "_done", "_exc", "_waiter", "_conn", "_loop")

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._done = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._conn: _Connection | None = conn
        self._loop = loop

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._wake()

    def _finish(self, exc: BaseException | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._exc = exc
        self._conn = None
        self._wake()

    async def _wait(self, timeout: float) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        handle = self._loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            handle.cancel()
            self._waiter = None

    async def read(self, timeout: float) -> bytes:
        while not self._done:
            await self._wait(timeout)
        if self._exc is not None:
            raise self._exc
        return b"".join(self._chunks)

    async def iter_chunks(self, timeout: float) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; ``timeout`` bounds each wait for more."""
        while True:
            while self._chunks:
                yield self._chunks.popleft()
            if self._done:
                if self._exc is not None:
                    raise self._exc
                return
            await self._wait(timeout)

    def close(self) -> None:
        """Abandon the response; a connection still mid-body cannot be reused."""
        conn = self._conn
        if conn is not None and not self._done:
            conn.abort()
        self._finish(ConnectionClosed("response closed by the gateway"))


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(Timeout("upstream did not answer in time"))


class _Connection(asyncio.Protocol):
    def __init__(self, pool: HttpClient, key: Origin) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.received_any = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionClosed(f"unparseable upstream response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self.response
        if resp is not None:
            self.response = None
            if resp.status and resp.header(b"content-length") is None and \
                    resp.header(b"transfer-encoding") is None:
                resp._finish()  # body delimited by connection close
            else:
                resp._finish(ConnectionClosed("upstream closed the connection mid-response"))
        self.pool._forget(self)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        resp = self.response
        if resp is not None:
            resp.status = self.parser.get_status_code()
            resp._wake()

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        resp = self.response
        self.response = None
        keep = self.parser.should_keep_alive()
        if resp is not None:
            resp._finish()
        if keep and not self.closed:
            self.pool._release(self)
        else:
            self.abort()

    def _fail(self, exc: BaseException) -> None:
        resp = self.response
        self.response = None
        if resp is not None:
            resp._finish(exc)
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class HttpClient:
    """Keep-alive connection pool keyed by origin."""

    def __init__(self, connect_timeout: float = 10.0, max_idle_per_origin: int = 512) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle_per_origin
        self._idle: dict[Origin, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._ssl: ssl.SSLContext | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self, origin), origin.host, origin.port,
                    ssl=self._ssl_context() if origin.scheme == "https" else None,
                ),
                self.connect_timeout,
            )
        except TimeoutError:
            raise ConnectFailed(f"connect to {origin.host}:{origin.port} timed out") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}") from None
        self._all.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) < self.max_idle:
            idle.append(conn)
        else:
            conn.abort()

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def request(self, method: str, origin: Origin, path: str, headers: bytes, body: bytes,
                      timeout: float) -> Response:
        """Send a request; returns once the status line and headers arrived.

        ``headers`` is a pre-rendered block of ``Name: value\\r\\n`` lines (no Host, no
        Content-Length). A reused connection that turns out dead before answering is
        replaced once.
        """
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {origin.host_header}\r\n"
            f"Content-Length: {len(body)}\r\n"
        ).encode("latin-1") + headers + b"\r\n"
        payload = head + body
        loop = asyncio.get_running_loop()
        for attempt in (0, 1):
            idle = self._idle.get(origin)
            conn = None
            while idle:
                candidate = idle.pop()
                if not candidate.closed:
                    conn = candidate
                    break
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin)
            resp = Response(conn, loop)
            conn.response = resp
            conn.received_any = False
            assert conn.transport is not None
            conn.transport.write(payload)
            try:
                while not resp.status and not resp._done:
                    await resp._wait(timeout)
            except Timeout:
                conn.abort()
                raise
            if resp.status:
                return resp
            if reused and attempt == 0 and not conn.received_any:
                continue  # stale keep-alive connection: try once on a fresh one
            if resp._exc is not None:
                raise resp._exc
            raise ConnectionClosed("upstream closed the connection without answering")
        raise ConnectionClosed("upstream closed the connection without answering")

    async def aclose(self) -> None:
        for conn in list(self._all):
            conn.abort()
        self._all.clear()
        self._idle.clear()
