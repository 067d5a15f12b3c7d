"""A mock Anthropic Messages API on loopback, for testing the litellm provider without a network.

``POST /v1/messages`` answers in Anthropic's shapes, non-streaming and as
server-sent events (message_start with cache usage and the 5m/1h
``cache_creation`` breakdown, content blocks, message_delta, message_stop).
With ``tools`` in the request (and no tool result to answer) it calls the
first or the forced tool; the ``tool`` knob names another offered tool to call instead, or is
``off`` to always answer in text (a coding agent such as Claude Code, handed a valid call of its
first tool, spawns agents without end), and ``tool-input`` (a JSON object) replaces the sample
input. Knobs come from request headers (``x-mock-*``, sent
by a deployment's ``headers``) or from :meth:`MockAnthropic.set`; headers win.
A ``thinking`` knob puts a thinking block (``thinking_delta`` and
``signature_delta`` when streamed) before the answer; ``stream-cut`` ends a
stream after the first delta without ``message_stop``.
``POST /v1/messages/count_tokens`` answers ``{"input_tokens": <input knob>}``;
``GET /v1/models`` a one-model list (with the ``status`` knob's status).
Every request is recorded (path, lower-cased headers, JSON body).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               500: "api_error", 529: "overloaded_error"}

DEFAULTS: dict[str, str] = {
    "input": "25",            # uncached input tokens (Anthropic's input_tokens)
    "output": "",             # output tokens; default: one per word of the answer
    "cache-read": "0",        # cache_read_input_tokens
    "cache-write-5m": "0",    # cache_creation.ephemeral_5m_input_tokens
    "cache-write-1h": "0",    # cache_creation.ephemeral_1h_input_tokens
    "status": "200",          # an error status answers with Anthropic's error JSON
    "error-message": "",      # message of that error
    "retry-after": "",        # retry-after header on errors
    "text": "Hello from the mock Anthropic API.",
    "delay-ms": "0",          # wait before answering
    "stream-error": "",       # streaming: send an `error` event after the first delta
    "stream-cut": "",         # streaming: end the stream after the first delta, no message_stop
    "end-delay-ms": "0",      # streaming: wait between message_stop and the end of the body
    "thinking": "",           # a thinking block with this text (and a signature) before the answer
    "tool": "",               # the tool to call: "" the first or forced one, "off" none, else the one of that name
    "tool-input": "",         # a JSON object: the input of that call (default: a sample from its schema)
}
SIGNATURE = "c2lnbmF0dXJlLW1vY2s="


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: Any
    peer: int = 0   # the client's port: equal across requests on one kept-alive connection


@dataclass
class MockAnthropic:
    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    knobs: dict[str, str] = field(default_factory=dict)

    def set(self, **knobs: Any) -> None:
        """Set knobs for the following requests, e.g. ``set(status=429, cache_read=40)``."""
        for key, value in knobs.items():
            name = key.replace("_", "-")
            if name not in DEFAULTS:
                raise KeyError(f"unknown mock knob {key!r}")
            self.knobs[name] = str(value)

    def reset(self) -> None:
        self.requests.clear()
        self.knobs.clear()

    @property
    def last(self) -> Recorded:
        return self.requests[-1]

    def knob(self, headers: dict[str, str], name: str) -> str:
        return headers.get(f"x-mock-{name}", self.knobs.get(name, DEFAULTS[name]))


def _tool_input(tool: dict[str, Any]) -> dict[str, Any]:
    schema = tool.get("input_schema") or {}
    props = schema.get("properties") or {}
    samples = {"string": "mock", "integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}
    return {name: samples.get(spec.get("type"), "mock") for name, spec in props.items()
            if name in (schema.get("required") or list(props))}


def _pick_tool(body: dict[str, Any], wanted: str = "") -> dict[str, Any] | None:
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and "input_schema" in t]   # not server tools
    choice = body.get("tool_choice") or {}
    if wanted:
        tools = [t for t in tools if t.get("name") == wanted]
    if not tools or choice.get("type") == "none":
        return None
    messages = body.get("messages") or []
    last = messages[-1] if messages else {}
    content = last.get("content")
    if isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content):
        return None
    if choice.get("type") == "tool":
        return next((t for t in tools if t.get("name") == choice.get("name")), tools[0])
    return tools[0]


def _handler(mock: MockAnthropic) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def handle(self) -> None:
            try:
                super().handle()
            except (BrokenPipeError, ConnectionResetError):   # the client gave up (timeout tests)
                pass

        def _json(self, status: int, payload: Any, extra: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.send_header("request-id", f"req_mock_{len(mock.requests)}")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _event(self, name: str, payload: dict[str, Any]) -> None:
            data = f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                mock.requests.append(Recorded(self.path, {k.lower(): v for k, v in self.headers.items()}, None,
                                              self.client_address[1]))
                status = int(mock.knob({}, "status"))
                self._json(status, {"data": [{"type": "model", "id": "claude-sonnet-4-5"}], "has_more": False})
                return
            self._json(200 if self.path == "/health" else 404, {"ok": self.path == "/health"})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode("utf-8", "replace")
            mock.requests.append(Recorded(self.path, headers, body, self.client_address[1]))

            def knob(name: str) -> str:
                return mock.knob(headers, name)

            delay = int(knob("delay-ms"))
            if delay:
                time.sleep(delay / 1000)
            if self.path.split("?")[0] == "/v1/messages/count_tokens" and int(knob("status")) < 400:
                self._json(200, {"input_tokens": int(knob("input"))})
                return
            if self.path.split("?")[0] not in ("/v1/messages", "/v1/messages/count_tokens"):
                self._json(404, {"type": "error", "error": {"type": "not_found_error",
                                                             "message": f"no route {self.path}"}})
                return
            status = int(knob("status"))
            if status >= 400:
                kind = ERROR_TYPES.get(status, "api_error")
                message = knob("error-message") or f"mock {kind} (HTTP {status})"
                retry = knob("retry-after")
                self._json(status, {"type": "error", "error": {"type": kind, "message": message}},
                           {"retry-after": retry} if retry else None)
                return
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                self._json(400, {"type": "error", "error": {"type": "invalid_request_error",
                                                             "message": "messages: field required"}})
                return
            self._answer(body, knob)

        def _answer(self, body: dict[str, Any], knob: Any) -> None:
            wanted = knob("tool")
            tool = _pick_tool(body, wanted) if wanted != "off" else None
            text = knob("text")
            words = len(text.split())
            if tool is not None:
                tool_input = json.loads(knob("tool-input")) if knob("tool-input") else _tool_input(tool)
                block: dict[str, Any] = {"type": "tool_use", "id": "toolu_mock_01", "name": tool["name"],
                                         "input": tool_input}
                stop_reason, output = "tool_use", int(knob("output") or 12)
            else:
                block = {"type": "text", "text": text}
                stop_reason, output = "end_turn", int(knob("output") or words)
            w5, w1 = int(knob("cache-write-5m")), int(knob("cache-write-1h"))
            usage = {"input_tokens": int(knob("input")), "cache_creation_input_tokens": w5 + w1,
                     "cache_read_input_tokens": int(knob("cache-read")),
                     "cache_creation": {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1},
                     "output_tokens": output, "service_tier": "standard"}
            thinking = knob("thinking")
            blocks = [{"type": "thinking", "thinking": thinking, "signature": SIGNATURE}] if thinking else []
            blocks.append(block)
            message = {"id": f"msg_mock_{len(mock.requests):04d}", "type": "message", "role": "assistant",
                       "model": body.get("model"), "content": blocks, "stop_reason": stop_reason,
                       "stop_sequence": None, "usage": usage}
            if not body.get("stream"):
                self._json(200, message)
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            start = dict(message, content=[], stop_reason=None, usage=dict(usage, output_tokens=1))
            self._event("message_start", {"type": "message_start", "message": start})
            index = 0
            if thinking:
                self._event("content_block_start", {"type": "content_block_start", "index": 0,
                                                    "content_block": {"type": "thinking", "thinking": "",
                                                                      "signature": ""}})
                for piece in (thinking[: len(thinking) // 2], thinking[len(thinking) // 2:]):
                    self._event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                        "delta": {"type": "thinking_delta", "thinking": piece}})
                self._event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "signature_delta", "signature": SIGNATURE}})
                self._event("content_block_stop", {"type": "content_block_stop", "index": 0})
                index = 1
            if tool is not None:
                self._event("content_block_start", {"type": "content_block_start", "index": index,
                                                    "content_block": dict(block, input={})})
                args = json.dumps(block["input"])
                pieces = [args[: len(args) // 2], args[len(args) // 2:]]
                deltas = [{"type": "input_json_delta", "partial_json": p} for p in pieces]
            else:
                self._event("content_block_start", {"type": "content_block_start", "index": index,
                                                    "content_block": {"type": "text", "text": ""}})
                parts = text.split(" ")
                deltas = [{"type": "text_delta", "text": p if i == 0 else " " + p} for i, p in enumerate(parts)]
            self._event("ping", {"type": "ping"})
            for i, delta in enumerate(deltas):
                self._event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                    "delta": delta})
                if i == 0 and knob("stream-cut"):
                    self.wfile.write(b"0\r\n\r\n")
                    return
                if i == 0 and knob("stream-error"):
                    self._event("error", {"type": "error", "error": {"type": knob("stream-error"),
                                                                      "message": "mock mid-stream failure"}})
                    self.wfile.write(b"0\r\n\r\n")
                    return
            self._event("content_block_stop", {"type": "content_block_stop", "index": index})
            self._event("message_delta", {"type": "message_delta",
                                          "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                          "usage": {"output_tokens": output}})
            self._event("message_stop", {"type": "message_stop"})
            if int(knob("end-delay-ms")):
                time.sleep(int(knob("end-delay-ms")) / 1000)
            self.wfile.write(b"0\r\n\r\n")

    return Handler


def start(port: int = 0) -> tuple[MockAnthropic, ThreadingHTTPServer, threading.Thread]:
    mock = MockAnthropic()
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(mock))
    server.daemon_threads = True
    mock.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="mock-anthropic", daemon=True)
    thread.start()
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5):
        pass
    return mock, server, thread


@pytest.fixture(scope="session")
def mock_anthropic_server() -> Iterator[MockAnthropic]:
    """One mock Anthropic server per session, on a free loopback port."""
    mock, server, thread = start()
    try:
        yield mock
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def mock_anthropic(mock_anthropic_server: MockAnthropic) -> MockAnthropic:
    """The session's mock with knobs and recorded requests cleared for this test."""
    mock_anthropic_server.reset()
    return mock_anthropic_server
