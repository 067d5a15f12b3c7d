"""A small pooled HTTP/1.1 client for upstream calls, on asyncio and httptools.

The request path's one network primitive: keep-alive connections per origin,
requests written in one syscall, responses parsed by httptools (content-length
and chunked), bodies read whole or streamed chunk by chunk for SSE. It is a
fraction of the CPU cost of general clients, which matters at thousands of
requests per second on one core. Timeouts are deadlines, not per-read limits:
:meth:`HttpClient.request` sets :attr:`Response.deadline` to the call's start plus
its timeout, and every wait (connect, headers, body) ends by then however slowly
the bytes trickle in; a stream reader may rearm it after each event (an idle limit).
Connections are opened through a *connector* (``loop.create_connection`` by
default), the seam through which tests run the client against an in-process
transport. Errors surface as :class:`HttpClientError` subclasses, each with a
short client-safe ``reason``; :class:`upstream_errors` is the one translator
into the gateway's error tree (the full text, host and port included, goes to
the log only).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlsplit

import httptools

from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable

log = logging.getLogger("gateway")


class HttpClientError(Exception):
    """A transport failure. ``str()`` is the full story for the log (it may name the host and
    port); ``reason`` is a short fixed phrase a client may see."""

    reason = "transport error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConnectFailed(HttpClientError):
    reason = "cannot connect"


class ConnectionClosed(HttpClientError):
    """The peer closed the connection mid-response (or before answering)."""

    reason = "connection closed mid-response"


class Timeout(HttpClientError):
    reason = "timed out"


class ProtocolViolation(HttpClientError):
    """The response arrived but breaks its framing (an SSE line over the limit, ...)."""

    reason = "malformed response"


class upstream_errors:  # noqa: N801  (a context manager used like a function: ``with upstream_errors(...)``)
    """The one translator of this client's errors into the gateway's: ``Timeout`` becomes
    ``UpstreamTimeout``, ``ConnectFailed`` ``UpstreamUnreachable``, anything else ``UpstreamError``.
    The client-facing message names ``label`` (``deployment X``) and the error's fixed ``reason``
    only; the full text (with host and port) is logged."""

    __slots__ = ("label",)

    def __init__(self, label: str) -> None:
        self.label = label

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if isinstance(exc, HttpClientError):
            raise translate(exc, self.label) from None


def translate(exc: HttpClientError, label: str) -> UpstreamError:
    log.warning("%s: %s", label, exc)
    if isinstance(exc, Timeout):
        return UpstreamTimeout(f"{label} timed out")
    if isinstance(exc, ConnectFailed):
        return UpstreamUnreachable(f"{label} is unreachable ({exc.reason})")
    return UpstreamError(f"{label} failed ({exc.reason})")


def _connect_reason(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "host name not resolved"
    if isinstance(exc, ssl.SSLError):
        return "TLS handshake failed"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    return "cannot connect"


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int
    base_path: str
    key: int = field(init=False, repr=False, compare=False)   # the hash, made once (the pool looks it up per call)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", hash((self.scheme, self.host, self.port, self.base_path)))

    def __hash__(self) -> int:
        return self.key

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


Connector = Callable[[Callable[[], asyncio.Protocol], Origin, ssl.SSLContext | None],
                     Awaitable[tuple[asyncio.BaseTransport, asyncio.Protocol]]]


async def tcp_connector(factory: Callable[[], asyncio.Protocol], origin: Origin,
                        ssl_context: ssl.SSLContext | None) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
    """The default connector: a TCP (or TLS) connection to the origin."""
    loop = asyncio.get_running_loop()
    return await loop.create_connection(factory, origin.host, origin.port, ssl=ssl_context)


# Network reads of a streamed body held unread before the socket is no longer read (a count, not bytes,
# so the hot path does no arithmetic per chunk: at most 32 x the transport's read size, 256 KiB, are held).
MAX_UNREAD = 32
_UNBOUNDED = 1 << 62        # a body read whole (read()) is not flow-controlled


class Response:
    """One upstream response; its body arrives as the connection reads it."""

    __slots__ = ("status", "headers", "deadline", "idle", "rearm", "_chunks", "_high", "_paused",
                 "_done", "_exc", "_waiter", "_conn", "_loop")

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self.status = 0
        self.deadline = deadline        # loop time by which every wait for more must end
        # A reader that sets ``rearm`` (cheap, e.g. once per SSE event) moves the deadline to ``idle``
        # seconds after the next wait begins, instead of reading the clock itself each time.
        self.idle = 0.0
        self.rearm = False
        self.headers: list[tuple[bytes, bytes]] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._high = _UNBOUNDED         # more reads unread than this: stop reading the socket for now
        self._paused = False
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
        if len(self._chunks) > self._high and not self._paused:
            self._pause()
        self._wake()

    def _pause(self) -> None:
        conn = self._conn
        if conn is not None and conn.transport is not None and not conn.closed:
            self._paused = True
            conn.transport.pause_reading()

    def _resume(self) -> None:
        self._paused = False
        conn = self._conn
        if conn is not None and conn.transport is not None and not conn.closed:
            conn.transport.resume_reading()

    def _finish(self, exc: BaseException | None = None) -> None:
        if self._done:
            return
        if self._paused:
            self._resume()              # the connection may go back to the pool
        self._done = True
        self._exc = exc
        self._conn = None
        self._wake()

    async def _wait(self) -> None:
        if self.rearm:
            self.rearm = False
            self.deadline = self._loop.time() + self.idle
        waiter = self._loop.create_future()
        self._waiter = waiter
        handle = self._loop.call_at(self.deadline, _expire, waiter)
        try:
            await waiter
        finally:
            handle.cancel()
            self._waiter = None

    async def read(self) -> bytes:
        """The whole body, by :attr:`deadline`."""
        while not self._done:
            await self._wait()
        if self._exc is not None:
            raise self._exc
        return b"".join(self._chunks)

    async def read_prefix(self, limit: int) -> bytes:
        """At most ``limit`` bytes of the body, by :attr:`deadline`; the connection is dropped if more
        was coming (for bodies only worth a look, such as an error's)."""
        while not self._done and sum(map(len, self._chunks)) < limit:
            await self._wait()
        if self._exc is not None:
            raise self._exc
        data = b"".join(self._chunks)
        self.close()
        return data[:limit]

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; each wait for more ends by :attr:`deadline` (read anew every wait,
        so a consumer may move it on). A slow consumer is flow control: with more than
        :data:`MAX_UNREAD` network reads unread the socket is not read until they are consumed."""
        chunks = self._chunks
        self._high = MAX_UNREAD
        if len(chunks) > MAX_UNREAD and not self._done:
            self._pause()
        while True:
            while chunks:
                yield chunks.popleft()
            if self._paused:
                self._resume()
            if self._done:
                if self._exc is not None:
                    raise self._exc
                return
            await self._wait()

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
            self._fail(ProtocolViolation(f"unparseable upstream response: {exc}", "unparseable response"))

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

    def __init__(self, connect_timeout: float = 10.0, max_idle_per_origin: int = 512,
                 connector: Connector = tcp_connector) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle_per_origin
        self.connector = connector
        self._idle: dict[Origin, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._ssl: ssl.SSLContext | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _connect(self, origin: Origin, deadline: float) -> _Connection:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise Timeout("upstream did not answer in time (before connecting)")
        try:
            _, proto = await asyncio.wait_for(
                self.connector(lambda: _Connection(self, origin), origin,
                               self._ssl_context() if origin.scheme == "https" else None),
                min(self.connect_timeout, left),
            )
        except TimeoutError:
            if left < self.connect_timeout:
                raise Timeout(f"connect to {origin.host}:{origin.port} did not finish by the call's deadline") \
                    from None
            raise ConnectFailed(f"connect to {origin.host}:{origin.port} timed out", "connect timed out") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}",
                                _connect_reason(exc)) from None
        conn = proto
        assert isinstance(conn, _Connection)
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
        Content-Length). ``timeout`` is the call's whole budget: connecting, the headers
        and (through the returned response's :attr:`Response.deadline`) the body must all
        be done within it. A reused connection that turns out dead before answering is
        replaced once.
        """
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {origin.host_header}\r\n"
            f"Content-Length: {len(body)}\r\n"
        ).encode("latin-1") + headers + b"\r\n"
        payload = head + body
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
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
                conn = await self._connect(origin, deadline)
            resp = Response(conn, loop, deadline)
            conn.response = resp
            conn.received_any = False
            assert conn.transport is not None
            conn.transport.write(payload)
            try:
                while not resp.status and not resp._done:
                    await resp._wait()
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
