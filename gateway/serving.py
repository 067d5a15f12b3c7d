"""How the gateway listens: the port check before it announces anything, and uvicorn's connection limits.

:func:`port_problem` tries to bind the address the way uvicorn will, so ``gateway serve`` and
``gateway demo`` can stop with one clear line instead of starting up and failing later.
:func:`uvicorn_options` is the one set of uvicorn options both use. It installs
:class:`GuardedHttpToolsProtocol`, uvicorn's httptools protocol with deadlines that uvicorn
lacks: a connection that sends nothing is closed after the keep-alive timeout (uvicorn arms that
timer only after a response), and a connection whose request (head and body) has not fully
arrived within the read timeout of its first byte is closed too, however slowly its bytes
trickle in. Idle and half-open connections are therefore bounded in time. :func:`frozen` and
:func:`worker_app` give a serving process its app with the start-up heap frozen out of the garbage
collector.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import socket
from typing import Any, TypeVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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
