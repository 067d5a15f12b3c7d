"""The serving protocol's response writer (:class:`gateway.serving.OneWriteCycle`), on a real uvicorn server
on loopback with a small ASGI app and a raw socket client: a reply's head leaves with its body in one write,
and what it sends is what uvicorn's own writer sends (framing, keep-alive, HEAD, 204, pipelined requests),
while a head it cannot vouch for (upper-case names, a control character in a value) goes uvicorn's way."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import uvicorn
from harness import free_port

from gateway.serving import GuardedHttpToolsProtocol, OneWriteCycle

Scope = dict[str, Any]


async def app(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    await receive()
    if path == "/json":
        body = b'{"ok":true}'
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"x-gateway-cost-usd", b"0.05"),
            (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for part in (b"data: 1\n\n", b"data: 2\n\n"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    elif path == "/upper":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"X-Upper", b"A"), (b"Content-Length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
    elif path in BAD_VALUES:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-bad", BAD_VALUES[path]), (b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
    elif path == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/close":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="asyncio", http=GuardedHttpToolsProtocol,
                            lifespan="off", access_log=False, server_header=False, log_level="critical")
    srv = uvicorn.Server(config)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(srv.serve(),), daemon=True)
    thread.start()
    for _ in range(500):
        if srv.started:
            break
        thread.join(0.02)
    assert srv.started
    yield port
    srv.should_exit = True
    thread.join(30)


@contextlib.asynccontextmanager
async def connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()


def request(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nhost: test\r\n\r\n".encode()


async def response(reader: asyncio.StreamReader, head_only: bool = False
                   ) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """(status line, headers, body) of one response (content-length or chunked framing)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    status, *lines = head[:-4].split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines)
    if head_only:
        return status, headers, b""
    if headers.get(b"transfer-encoding") == b"chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, headers, body
            body += chunk[:-2]
    return status, headers, await reader.readexactly(int(headers.get(b"content-length", b"0")))


async def test_a_json_reply_is_one_write_and_the_connection_is_kept(server: int) -> None:
    writes: list[bytes] = []
    original = OneWriteCycle.send

    async def counting(self: OneWriteCycle, message: Any) -> None:
        real = self.transport.write

        def record(data: bytes) -> None:
            writes.append(bytes(data))
            real(data)
        self.transport.write = record   # type: ignore[method-assign]
        try:
            await original(self, message)
        finally:
            self.transport.write = real   # type: ignore[method-assign]

    OneWriteCycle.send = counting   # type: ignore[method-assign]
    try:
        async with connection(server) as (reader, writer):
            for _ in range(2):
                writer.write(request("/json", "POST"))
                status, headers, body = await response(reader)
                assert status == b"HTTP/1.1 200 OK" and body == b'{"ok":true}'
                assert headers[b"content-type"] == b"application/json" and headers[b"x-gateway-cost-usd"] == b"0.05"
                assert b"date" in headers and b"transfer-encoding" not in headers
    finally:
        OneWriteCycle.send = original   # type: ignore[method-assign]
    assert len(writes) == 2 and all(w.startswith(b"HTTP/1.1 200 OK\r\n") and w.endswith(b'{"ok":true}')
                                    for w in writes), writes


async def test_a_stream_is_chunked_with_its_head_sent_with_the_first_part(server: int) -> None:
    async with connection(server) as (reader, writer):
        writer.write(request("/stream"))
        status, headers, body = await response(reader)
        assert status == b"HTTP/1.1 200 OK" and headers[b"transfer-encoding"] == b"chunked"
        assert body == b"data: 1\n\ndata: 2\n\n"
        writer.write(request("/json"))   # still open after the last chunk
        assert (await response(reader))[2] == b'{"ok":true}'


async def test_upper_case_names_go_uvicorns_way_and_come_out_lower_case(server: int) -> None:
    async with connection(server) as (reader, writer):
        writer.write(request("/upper"))
        status, headers, body = await response(reader)
        assert status == b"HTTP/1.1 200 OK" and headers[b"x-upper"] == b"A" and body == b"ok"


BAD_VALUES = {"/bad": b"a\r\nx-injected: 1", "/bad-lf": b"a\nx-injected: 1", "/bad-cr": b"a\rb",
              "/bad-nul": b"a\x00b", "/bad-crlf-end": b"a\r\n"}


@pytest.mark.parametrize("path", sorted(BAD_VALUES))
async def test_a_header_with_a_line_break_is_refused_never_sent(server: int, path: str) -> None:
    async with connection(server) as (reader, writer):
        writer.write(request(path))   # uvicorn refuses the head (the app sees the error) and drops the connection
        assert await asyncio.wait_for(reader.read(), 30) == b""


async def test_head_204_close_and_pipelined_requests_frame_as_uvicorn_does(server: int) -> None:
    async with connection(server) as (reader, writer):
        writer.write(request("/json", "HEAD"))
        status, headers, _ = await response(reader, head_only=True)   # HEAD: the length announced, no body
        assert status == b"HTTP/1.1 200 OK" and headers[b"content-length"] == b"11"
        writer.write(request("/empty"))
        status, headers, body = await response(reader)
        assert status == b"HTTP/1.1 204 No Content" and b"transfer-encoding" not in headers and body == b""
        writer.write(request("/json") + request("/stream") + request("/json"))   # pipelined
        bodies = [(await response(reader))[2] for _ in range(3)]
        assert bodies == [b'{"ok":true}', b"data: 1\n\ndata: 2\n\n", b'{"ok":true}']
        writer.write(request("/close"))
        status, headers, body = await response(reader)
        assert headers[b"connection"] == b"close" and body == b"ok"
        assert await asyncio.wait_for(reader.read(), 30) == b""   # the server closed it
