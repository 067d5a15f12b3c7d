"""A mock OpenAI Responses API on loopback, for tests of the native Responses path.

``POST /v1/responses`` answers with a Response object, or (``stream: true``) with the
server-sent event sequence OpenAI sends: ``response.created``, ``response.in_progress``,
per output item ``response.output_item.added``, its content part, deltas and ``.done``
events, then ``response.completed`` with the whole response and its usage. With a
``reasoning.summary`` in the request a reasoning item with summary events comes first;
with function tools (and no ``function_call_output`` as the last input item) it calls
the first function tool. It remembers the ids it issued (unless ``store: false``) and
answers ``previous_response_id`` it did not issue with 400 ``previous_response_not_found``,
as OpenAI does, so tests can see which deployment a follow-up reached. Knobs come from
request headers (``x-mock-*``) or :meth:`MockResponses.set`; headers win. Every request is
recorded (path, lower-cased headers, JSON body). With :attr:`MockResponses.canned` set it
replays those bytes instead (to hand the SDK a stream the gateway translated).
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

DEFAULTS: dict[str, str] = {
    "text": "Hello from the mock Responses API.",
    "input": "21",            # usage.input_tokens
    "cached": "0",            # usage.input_tokens_details.cached_tokens
    "output": "",             # usage.output_tokens (default: words of the answer, 12 for a call)
    "reasoning": "0",         # usage.output_tokens_details.reasoning_tokens (counted in output_tokens)
    "status": "200",          # an error status answers with OpenAI's error JSON
    "cut-after": "",          # streaming: stop after N text deltas, no final event
    "fail-after": "",         # streaming: after N text deltas send response.failed
    "delay-ms": "0",
    "response-id": "",        # the id of the response (default: a fresh resp_mock_...)
}


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class MockResponses:
    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    knobs: dict[str, str] = field(default_factory=dict)
    issued: set[str] = field(default_factory=set)
    canned: bytes | None = None    # when set, every POST /v1/responses answers these SSE bytes as they are

    def set(self, **knobs: Any) -> None:
        for key, value in knobs.items():
            name = key.replace("_", "-")
            if name not in DEFAULTS:
                raise KeyError(f"unknown mock knob {key!r}")
            self.knobs[name] = str(value)

    def reset(self) -> None:
        self.requests.clear()
        self.knobs.clear()
        self.issued.clear()
        self.canned = None

    @property
    def last(self) -> Recorded:
        return self.requests[-1]

    def knob(self, headers: dict[str, str], name: str) -> str:
        return headers.get(f"x-mock-{name}", self.knobs.get(name, DEFAULTS[name]))


def _function_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]
    items = body.get("input")
    last = items[-1] if isinstance(items, list) and items else {}
    if not tools or body.get("tool_choice") == "none" or \
            (isinstance(last, dict) and last.get("type") == "function_call_output"):
        return None
    return tools[0]


def _arguments(tool: dict[str, Any]) -> str:
    props = (tool.get("parameters") or {}).get("properties") or {}
    samples = {"string": "mock", "integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}
    return json.dumps({name: samples.get(spec.get("type"), "mock") for name, spec in props.items()})


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def _handler(mock: MockResponses) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def handle(self) -> None:
            try:
                super().handle()
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _json(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            ok = self.path in ("/health", "/v1/models")
            self._json(200 if ok else 404, {"object": "list", "data": []} if ok else _error(404, "no route"))

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            mock.requests.append(Recorded(self.path, headers, body))

            def knob(name: str) -> str:
                return mock.knob(headers, name)

            if int(knob("delay-ms")):
                time.sleep(int(knob("delay-ms")) / 1000)
            if self.path.split("?")[0] != "/v1/responses":
                self._json(404, _error(404, f"no route {self.path}"))
                return
            if mock.canned is not None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("content-length", str(len(mock.canned)))
                self.end_headers()
                self.wfile.write(mock.canned)
                return
            status = int(knob("status"))
            if status >= 400:
                self._json(status, _error(status, f"mock error (HTTP {status})"))
                return
            if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                self._json(400, _error(400, "model: field required", "missing_required_parameter", "model"))
                return
            previous = body.get("previous_response_id")
            if previous is not None and previous not in mock.issued:
                self._json(400, _error(400, f"Previous response with id '{previous}' not found.",
                                       "previous_response_not_found", "previous_response_id"))
                return
            self._answer(body, knob)

        def _answer(self, body: dict[str, Any], knob: Any) -> None:
            response_id = knob("response-id") or "resp_mock_" + secrets.token_hex(8)
            if body.get("store", True) is not False:
                mock.issued.add(response_id)
            tool = _function_tool(body)
            text = knob("text")
            summary = isinstance(body.get("reasoning"), dict) and body["reasoning"].get("summary") is not None
            items: list[dict[str, Any]] = []
            if summary:
                items.append({"id": "rs_mock_1", "type": "reasoning", "status": "completed",
                              "summary": [{"type": "summary_text", "text": "Thinking it over."}]})
            if tool is not None:
                items.append({"id": "fc_mock_1", "type": "function_call", "status": "completed",
                              "call_id": "call_mock_1", "name": tool["name"], "arguments": _arguments(tool)})
                output = int(knob("output") or 12)
            else:
                items.append({"id": "msg_mock_1", "type": "message", "status": "completed", "role": "assistant",
                              "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
                output = int(knob("output") or len(text.split()))
            reasoning, cached, input_tokens = int(knob("reasoning")), int(knob("cached")), int(knob("input"))
            usage = {"input_tokens": input_tokens,
                     "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                     "output_tokens": output + reasoning,
                     "output_tokens_details": {"reasoning_tokens": reasoning},
                     "total_tokens": input_tokens + output + reasoning}
            response = {"id": response_id, "object": "response", "created_at": int(time.time()),
                        "status": "completed", "error": None, "incomplete_details": None,
                        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                        "model": body["model"], "output": items,
                        "parallel_tool_calls": body.get("parallel_tool_calls", True),
                        "previous_response_id": body.get("previous_response_id"),
                        "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
                        "store": body.get("store", True), "temperature": 1.0,
                        "text": body.get("text") or {"format": {"type": "text"}},
                        "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
                        "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": None,
                        "metadata": body.get("metadata") or {}}
            if not body.get("stream"):
                self._json(200, response)
                return
            self._stream(response, knob)

        def _stream(self, response: dict[str, Any], knob: Any) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            seq = iter(range(10_000))

            def send(kind: str, **fields: Any) -> None:
                event = {"type": kind, "sequence_number": next(seq), **fields}
                data = f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def end() -> None:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            opening = dict(response, status="in_progress", output=[], usage=None)
            send("response.created", response=opening)
            send("response.in_progress", response=opening)
            cut, fail = knob("cut-after"), knob("fail-after")
            for index, item in enumerate(response["output"]):
                where = {"item_id": item["id"], "output_index": index}
                if item["type"] == "reasoning":
                    send("response.output_item.added", output_index=index, item=dict(item, summary=[]))
                    part = item["summary"][0]
                    send("response.reasoning_summary_part.added", **where, summary_index=0,
                         part={"type": "summary_text", "text": ""})
                    send("response.reasoning_summary_text.delta", **where, summary_index=0, delta=part["text"])
                    send("response.reasoning_summary_text.done", **where, summary_index=0, text=part["text"])
                    send("response.reasoning_summary_part.done", **where, summary_index=0, part=part)
                elif item["type"] == "function_call":
                    send("response.output_item.added", output_index=index,
                         item=dict(item, status="in_progress", arguments=""))
                    args = item["arguments"]
                    for piece in (args[: len(args) // 2], args[len(args) // 2:]):
                        send("response.function_call_arguments.delta", **where, delta=piece)
                    send("response.function_call_arguments.done", **where, name=item["name"], arguments=args)
                else:
                    part = item["content"][0]
                    send("response.output_item.added", output_index=index,
                         item=dict(item, status="in_progress", content=[]))
                    send("response.content_part.added", **where, content_index=0, part=dict(part, text=""))
                    words = part["text"].split(" ")
                    for n, word in enumerate(words):
                        send("response.output_text.delta", **where, content_index=0,
                             delta=word if n == 0 else " " + word, logprobs=[])
                        if cut and n + 1 >= int(cut):
                            end()
                            return
                        if fail and n + 1 >= int(fail):
                            failed = dict(opening, status="failed",
                                          error={"code": "server_error", "message": "mock failure mid-stream"},
                                          usage=dict(response["usage"], output_tokens=n + 1,
                                                     total_tokens=response["usage"]["input_tokens"] + n + 1))
                            send("response.failed", response=failed)
                            end()
                            return
                    send("response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[])
                    send("response.content_part.done", **where, content_index=0, part=part)
                send("response.output_item.done", output_index=index, item=item)
            send("response.completed", response=response)
            end()

    return Handler


def start(port: int = 0) -> tuple[MockResponses, ThreadingHTTPServer, threading.Thread]:
    mock = MockResponses()
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(mock))
    server.daemon_threads = True
    mock.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="mock-responses", daemon=True)
    thread.start()
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5):
        pass
    return mock, server, thread


@pytest.fixture(scope="session")
def mock_responses_server() -> Iterator[MockResponses]:
    """One mock Responses server per session, on a free loopback port."""
    mock, server, thread = start()
    try:
        yield mock
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def mock_responses(mock_responses_server: MockResponses) -> MockResponses:
    """The session's mock with knobs, recorded requests and issued ids cleared for this test."""
    mock_responses_server.reset()
    return mock_responses_server
