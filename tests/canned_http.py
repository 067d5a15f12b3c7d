"""A loopback HTTP server that answers every POST with a canned response, for driving official SDKs.

Tests put the bytes the gateway's codec produced (a JSON reply, an SSE stream, an error envelope)
into :attr:`Canned.status`, :attr:`Canned.content_type` and :attr:`Canned.body`; the SDK under test
then parses them off a real socket. Requests are recorded (path, lower-cased headers, raw body).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass
class Canned:
    url: str = ""
    status: int = 200
    content_type: str = "application/json"
    body: bytes = b"{}"
    headers: list[tuple[str, str]] = field(default_factory=list)
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)

    def answer(self, body: bytes, status: int = 200, content_type: str = "application/json",
               headers: list[tuple[str, str]] | None = None) -> None:
        self.body, self.status, self.content_type, self.headers = body, status, content_type, headers or []


def _handler(canned: Canned) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            canned.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, raw))
            self.send_response(canned.status)
            self.send_header("content-type", canned.content_type)
            self.send_header("content-length", str(len(canned.body)))
            for name, value in canned.headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(canned.body)

    return Handler


@pytest.fixture(scope="module")
def canned_server() -> Iterator[Canned]:
    canned = Canned()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(canned))
    server.daemon_threads = True
    canned.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="canned-http", daemon=True)
    thread.start()
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5):
        pass
    try:
        yield canned
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def canned(canned_server: Canned) -> Canned:
    canned_server.requests.clear()
    canned_server.answer(b"{}")
    return canned_server
