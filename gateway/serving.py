"""How the gateway listens: the port check before it announces anything, and uvicorn's connection limits.

:func:`port_problem` tries to bind the address the way uvicorn will, so ``gateway serve`` and
``gateway demo`` can stop with one clear line instead of starting up and failing later.
:func:`uvicorn_options` is the one set of uvicorn options both use. It installs
:class:`GuardedHttpToolsProtocol`, uvicorn's httptools protocol with deadlines that uvicorn
lacks: a connection that sends nothing is closed after the keep-alive timeout (uvicorn arms that
timer only after a response), and a connection whose request (head and body) has not fully
arrived within the read timeout of its first byte is closed too, however slowly its bytes
trickle in. Idle and half-open connections are therefore bounded in time. Each request's responses go
through :class:`OneWriteCycle`, which writes a response's head together with its first body part (a
JSON reply is one write, not two) and checks its headers in one pass. :func:`frozen` and
:func:`worker_app` give a serving process its app with the start-up heap frozen out of the garbage
collector.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import socket
from typing import Any, TypeVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from gateway.settings import Settings

T = TypeVar("T")


def frozen(app: T) -> T:
    """``app``, with everything alive now (modules, litellm's tables, the policies, the app) moved out of the
    garbage collector's reach: it stays alive for the life of the process, and full collections would walk
    those millions of objects again and again for nothing (several percent of the CPU a request costs).
    Young objects are collected every 20,000 allocations instead of 700: a request's objects are then mostly
    freed before a collection looks at them, instead of being walked and promoted while still in flight."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    return app


def worker_app() -> Any:
    """The app of one worker when ``gateway serve`` runs several (uvicorn's factory): the settings come from
    the environment the serving process set."""
    from gateway.api.app import create_app

    return frozen(create_app())


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, or None when it can (checked by binding it for a moment)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot listen on {host}:{port}: the address does not resolve ({exc.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            hint = "another process is listening there; stop it or pick another --port" \
                if exc.errno in (98, 48) else "pick another --host or --port"
            return f"cannot listen on {host}:{port} ({reason}): {hint}"
    return None


# The bytes a head's lines may hold besides CR and LF (which may only end lines): no control character but tab
_LINE_BYTES = bytes([9, *range(0x20, 0x7F), *range(0x80, 0x100)])
_LINE = b"%s: %s\r\n"


class OneWriteCycle(RequestResponseCycle):
    """uvicorn's request/response cycle, writing a response's head with its first body part: a reply whose
    body comes in one message leaves in one write (one system call instead of two, one TCP segment), a
    stream's head goes with its first event. The header lines are made in one pass (names lower-cased, as
    uvicorn does) and checked as a whole: no control character but tab, CR and LF only ending lines; a
    head that fails the check goes uvicorn's own way (which refuses it). Framing (content-length, chunked,
    connection: close),
    flow control and the end of a response are uvicorn's, line for line."""

    head = b""    # the response's head, written with its first body part

    async def send(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if message["type"] == "http.response.start" and not self.response_started:
            if not self._hold_head(message):
                await super().send(message)
            return
        if message["type"] != "http.response.body" or not self.response_started or self.response_complete:
            await super().send(message)   # out of order: uvicorn's error
            return
        body = message.get("body", b"")
        more_body = message.get("more_body", False)
        head, self.head = self.head, b""
        if self.scope["method"] == "HEAD":
            self.expected_content_length = 0
            data = head
        elif self.chunked_encoding:
            data = head + (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + (b"" if more_body else b"0\r\n\r\n")
        else:
            if len(body) > self.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            self.expected_content_length -= len(body)
            data = head + body if head else body
        if data:
            self.transport.write(data)
        if not more_body:
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()

    def _hold_head(self, message: Any) -> bool:
        """Make the head of a start message and keep it for the first body part; False (nothing changed)
        when the headers are not plain (uvicorn then does it): names not all lower case, a name twice, a
        control character, a CR or LF inside a line, both a length and a transfer encoding."""
        headers = message.get("headers", ())
        try:
            block = b"".join(map(_LINE.__mod__, self.default_headers)) + b"".join(map(_LINE.__mod__, headers))
            names = dict(headers)
        except TypeError:     # not a list of (name, value) tuples
            return False
        n = len(self.default_headers) + len(headers)
        # what is left of the lines without their plain bytes: each line's CRLF and nothing else
        if len(names) != len(headers) or (names and not b"".join(names).islower()) \
                or block.translate(None, _LINE_BYTES) != b"\r\n" * n:
            return False
        length, encoding = names.get(b"content-length"), names.get(b"transfer-encoding")
        if length is not None and encoding is not None:
            return False
        status = message["status"]
        has_close = False
        if length is not None:   # as uvicorn reads them
            self.expected_content_length = int(length.decode())
            self.chunked_encoding = False
        elif encoding is not None and encoding.lower() == b"chunked":
            self.expected_content_length = 0
            self.chunked_encoding = True
        connection = names.get(b"connection")
        if connection is not None and b"close" in [t.lower().strip() for t in connection.split(b",")]:
            self.keep_alive = False
            has_close = True
        if not self.keep_alive and not has_close:
            block += b"connection: close\r\n"
        if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status not in (204, 304):
            self.chunked_encoding = True
            block += b"transfer-encoding: chunked\r\n"
        self.response_started = True
        self.waiting_for_100_continue = False
        self.head = STATUS_LINE[status] + block + b"\r\n"
        return True


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a keep-alive deadline from the first moment of a connection and a
    deadline for each request to arrive in full (see the module docstring)."""

    def __init__(self, *args: Any, read_timeout_s: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout_s = read_timeout_s
        self.read_deadline: asyncio.TimerHandle | None = None
        self.reading = False          # a request's first byte has arrived, not yet its last

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # A request that arrived whole in this read (the common case) never needs its timer; one still
        # arriving gets it now, counted from this first read.
        if self.reading and self.read_deadline is None and not self.transport.is_closing():
            self.read_deadline = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn arms its keep-alive timer only after a response: a connection that never sends a byte
        # would stay open for good
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        cycle.__class__ = OneWriteCycle   # made by uvicorn's on_headers_complete; only its send differs
        super()._start_asgi_task(cycle, app)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_deadline()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:   # the first byte of a request: all of it must arrive in time
        self.reading = True
        self._cancel_read_deadline()
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self.reading = False
        self._cancel_read_deadline()
        super().on_message_complete()
        # a body still arriving after its reply was sent (an early 413): uvicorn cancelled the keep-alive
        # timer on every read, so arm it again, or the connection would stay open for good
        if self.cycle is not None and self.cycle.response_complete and not self.transport.is_closing():
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

    def _cancel_read_deadline(self) -> None:
        if self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None

    def _read_timed_out(self) -> None:
        self.read_deadline = None
        if self.cycle is not None and not self.cycle.response_complete and not self.cycle.more_body:
            return   # the request arrived; the app is answering it
        if not self.transport.is_closing():
            self.transport.close()   # the app, if it is reading the body, sees http.disconnect


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn options of every gateway server (``serve``, its workers, ``demo``)."""
    protocol = functools.partial(GuardedHttpToolsProtocol, read_timeout_s=settings.request_read_timeout_s)
    return dict(host=settings.host, port=settings.port, loop="uvloop", http=protocol,
                timeout_keep_alive=settings.keepalive_timeout_s, access_log=False, lifespan="on",
                proxy_headers=False, server_header=False)
