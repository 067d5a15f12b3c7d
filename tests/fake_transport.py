"""An in-process upstream behind ``HttpClient``'s connector seam: no sockets, real HTTP bytes.

``FakeUpstream.connect`` is a connector: each connection gets a :class:`FakeTransport` that
parses the requests the client writes (httptools) and plays back a :class:`Script` for each:
raw byte pieces at given delays, then keep-alive, a close, or a cut mid-response. The client's
real parser, pool, deadlines and SSE reader run exactly as they do against a socket.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httptools
import orjson

from gateway.providers.httpclient import Origin

CLOSE = None   # a script step that closes the connection (a cut when the response is not complete)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Script:
    """What the upstream sends for one request: ``(delay_s, bytes | CLOSE)`` steps, in order."""

    steps: Sequence[tuple[float, bytes | None]]


def head(status: int, headers: dict[str, str]) -> bytes:
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"HTTP/1.1 {status} X\r\n{lines}\r\n".encode("latin-1")


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Script:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    hdrs = {"content-type": "application/json", "content-length": str(len(raw)), **(headers or {})}
    return Script([(0.0, head(status, hdrs) + raw)])


def chunked(piece: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(piece), piece) if piece else b""


def sse_response(events: list[bytes], *, delay: float = 0.0, done: bool = True,
                 content_type: str = "text/event-stream") -> Script:
    """A chunked SSE response: one chunk per event, ``delay`` seconds apart, then ``[DONE]``."""
    steps: list[tuple[float, bytes | None]] = [
        (0.0, head(200, {"content-type": content_type, "transfer-encoding": "chunked"}))]
    for event in events:
        steps.append((delay, chunked(b"data: " + event + b"\n\n")))
    if done:
        steps.append((delay, chunked(b"data: [DONE]\n\n")))
    steps.append((0.0, b"0\r\n\r\n"))
    return Script(steps)


def drip(data: bytes, every: float) -> list[tuple[float, bytes | None]]:
    """``data`` one byte at a time, ``every`` seconds apart."""
    return [(every, data[i:i + 1]) for i in range(len(data))]


class FakeTransport(asyncio.Transport):
    def __init__(self, upstream: FakeUpstream, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.upstream = upstream
        self.protocol = protocol
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.queue: list[tuple[float, bytes | None]] = []
        self.handle: asyncio.Handle | None = None
        self.paused = False
        self.held: list[bytes | None] = []
        self._reset_parser()

    def _reset_parser(self) -> None:
        self.current: dict[str, Any] = {"headers": {}, "body": b"", "url": b""}
        self.parser = httptools.HttpRequestParser(self)

    # httptools request callbacks
    def on_url(self, url: bytes) -> None:
        self.current["url"] += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current["headers"][name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.current["body"] += body

    def on_message_complete(self) -> None:
        seen = Seen(self.parser.get_method().decode(), self.current["url"].decode(),
                    self.current["headers"], self.current["body"])
        self.current = {"headers": {}, "body": b"", "url": b""}
        self.upstream.requests.append(seen)
        self._play(self.upstream.handler(seen))

    def _play(self, script: Script) -> None:
        # one step per loop turn at the earliest (each scheduled when the one before ran), as a socket
        # delivers reads: the client's reader gets to run between pieces however late the timers fire
        self.queue.extend(script.steps)
        if self.handle is None:
            self._next()

    def _next(self) -> None:
        self.handle = None
        if self.queue and not self.closed:
            delay, data = self.queue.pop(0)
            self.handle = self.loop.call_later(delay, self._step, data)

    def _step(self, data: bytes | None) -> None:
        self.handle = None
        if self.closed:
            return
        if self.paused:
            self.held = [data]          # delivered when the client reads again
            return
        if data is None:
            self.close()
            return
        self.upstream.delivered += len(data)
        self.protocol.data_received(data)
        if self.handle is None and not self.paused:
            self._next()

    def pause_reading(self) -> None:
        self.paused = True
        self.upstream.pauses += 1

    def resume_reading(self) -> None:
        if not self.paused:
            return
        self.paused = False
        held, self.held = self.held, []
        if held:
            self.handle = self.loop.call_soon(self._step, held[0])
        elif self.handle is None:
            self._next()

    def is_reading(self) -> bool:
        return not self.paused

    # asyncio.Transport
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            return
        self.parser.feed_data(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.handle is not None:
            self.handle.cancel()
        self.queue.clear()
        self.upstream.open -= 1
        self.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


@dataclass
class FakeUpstream:
    """Answers every request with ``handler(seen)``; ``refuse`` makes connects fail like a closed port."""

    handler: Callable[[Seen], Script] = field(default=lambda seen: json_response(200, {}))
    requests: list[Seen] = field(default_factory=list)
    connects: int = 0
    open: int = 0
    delivered: int = 0                  # response bytes handed to the client
    pauses: int = 0                     # times the client stopped reading (flow control)
    refuse: OSError | None = None

    async def connect(self, factory: Callable[[], asyncio.Protocol], origin: Origin,
                      ssl_context: ssl.SSLContext | None) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        if self.refuse is not None:
            raise self.refuse
        self.connects += 1
        self.open += 1
        protocol = factory()
        transport = FakeTransport(self, protocol)
        protocol.connection_made(transport)
        return transport, protocol
