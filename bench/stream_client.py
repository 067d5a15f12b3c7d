#!/usr/bin/env python3
"""Closed-loop SSE load client for loopback benchmarks (bounded in count and time).

Each of --concurrency workers keeps one keep-alive HTTP/1.1 connection and sends
a streaming request, reads the whole event stream, and sends the next one. It
measures, per request, from the moment the request bytes are written:

    ttfb   first byte of the response (status line)
    ttft   first event that carries generated output (delta.content,
           delta.tool_calls, or text for legacy completions; an Anthropic
           content_block_delta; a Responses *.delta event)
    total  the end of the response (terminating chunk, after data: [DONE],
           or after message_stop / response.completed, which end the
           Messages and Responses streams)

Chat completions, legacy completions, Anthropic Messages and OpenAI Responses
streams are understood; stream_options.include_usage is added only to a URL
ending in /completions (the other two APIs report usage on their own).

The client is a raw asyncio Protocol + httptools response parser (uvloop when
available): no HTTP library between the socket and the clock. Timestamps are
taken when the bytes arrive (data_received), before any parsing.

    python bench/stream_client.py --url http://127.0.0.1:18080/v1/chat/completions \\
        --model mock-lat0-chunks20-delay5 -c 32 -n 5000 -d 10 --warmup 2
    python bench/stream_client.py --url ... --body body.json -H 'Authorization: Bearer k'

Prints one JSON object: counts, errors (with a few samples), requests/s and
p50/p90/p99/mean/max in milliseconds for ttfb, ttft and total. Exit status 0
when at least one request succeeded and there were no errors, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

perf = time.perf_counter

DEFAULT_PROMPT = ("You are a careful assistant for a platform team. Keep replies brief and mention the settings "
                  "that matter.")
DEFAULT_QUESTION = ("Our service sits in front of several language model providers. In a few sentences, describe "
                    "how it should react when a provider answers 429 with a Retry-After header, and how per-key "
                    "spending limits interact with retries and with streamed answers.")


class StreamError(Exception):
    pass


class Conn(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.fut: asyncio.Future[None] | None = None
        self._new_message()

    def _new_message(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.t_recv = 0.0
        self.t_first_byte: float | None = None
        self.t_first_token: float | None = None
        self.t_end: float | None = None
        self.status = 0
        self.buf = b""
        self.body_err: list[bytes] = []
        self.events = 0
        self.outputs = 0
        self.done_seen = False
        self.usage_seen = False
        self.keep_alive = True

    # --- protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(StreamError("connection closed before the response ended"))

    def data_received(self, data: bytes) -> None:
        now = perf()
        self.t_recv = now
        if self.t_first_byte is None:
            self.t_first_byte = now
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.fut is not None and not self.fut.done():
                self.fut.set_exception(StreamError(f"bad HTTP response: {exc}"))
            if self.transport is not None:
                self.transport.close()

    # --- parser callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self.status != 200:
            self.body_err.append(body)
            return
        buf = self.buf + body if self.buf else body
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        while True:
            i = buf.find(b"\n\n")
            if i < 0:
                break
            self._event(buf[:i])
            buf = buf[i + 2:]
        self.buf = buf

    def _event(self, raw: bytes) -> None:
        data = []
        for line in raw.split(b"\n"):
            if line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" "))
        if not data:
            return
        payload = b"\n".join(data)
        self.events += 1
        if payload == b"[DONE]":
            self.done_seen = True
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        if obj.get("usage"):
            self.usage_seen = True
        kind = obj.get("type")
        if obj.get("error") or kind in ("error", "response.failed"):
            if self.fut is not None and not self.fut.done():
                self.fut.set_exception(StreamError(f"error event: {payload[:200]!r}"))
            return
        if isinstance(kind, str):   # Anthropic Messages or OpenAI Responses events
            self._typed_event(kind, obj)
            return
        choices = obj.get("choices")
        if not choices or not isinstance(choices, list):
            return
        c0 = choices[0] if isinstance(choices[0], dict) else {}
        delta = c0.get("delta")
        has_output = bool(c0.get("text")) or (isinstance(delta, dict) and bool(
            delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content")))
        if has_output:
            self.outputs += 1
            if self.t_first_token is None:
                self.t_first_token = self.t_recv

    def _typed_event(self, kind: str, obj: dict[str, Any]) -> None:
        if kind in ("message_stop", "response.completed", "response.incomplete"):
            self.done_seen = True
            response = obj.get("response")
            if isinstance(response, dict) and response.get("usage"):
                self.usage_seen = True
            return
        if kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict) and message.get("usage"):
                self.usage_seen = True
            return
        delta = obj.get("delta")
        if kind == "content_block_delta":
            has_output = isinstance(delta, dict) and bool(
                delta.get("text") or delta.get("partial_json") or delta.get("thinking"))
        else:
            has_output = kind.startswith("response.") and kind.endswith(".delta") and bool(delta)
        if has_output:
            self.outputs += 1
            if self.t_first_token is None:
                self.t_first_token = self.t_recv

    def on_message_complete(self) -> None:
        self.t_end = self.t_recv
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(None)

    # --- one request
    async def request(self, payload: bytes, timeout: float) -> dict[str, Any]:
        assert self.transport is not None
        self._new_message()
        self.fut = self.loop.create_future()
        t0 = perf()
        self.transport.write(payload)
        await asyncio.wait_for(self.fut, timeout)
        self.fut = None
        if not self.keep_alive and self.transport is not None:
            self.transport.close()
            self.closed = True
        if self.status != 200:
            body = b"".join(self.body_err)[:300]
            raise StreamError(f"HTTP {self.status}: {body.decode('utf-8', 'replace')}")
        if not self.done_seen:
            raise StreamError("stream ended without data: [DONE] (or message_stop / response.completed)")
        if self.t_first_token is None:
            raise StreamError("stream carried no output")
        assert self.t_first_byte is not None and self.t_end is not None
        return {"ttfb": self.t_first_byte - t0, "ttft": self.t_first_token - t0, "total": self.t_end - t0,
                "outputs": self.outputs, "usage": self.usage_seen}


def percentiles(values: list[float]) -> dict[str, float]:
    """Milliseconds: nearest-rank p50/p90/p99, mean, max (values in seconds)."""
    if not values:
        return {}
    v = sorted(values)
    n = len(v)

    def rank(p: float) -> float:
        return v[min(n - 1, max(0, int(-(-p * n // 100)) - 1))]

    return {"p50": round(rank(50) * 1000, 3), "p90": round(rank(90) * 1000, 3), "p99": round(rank(99) * 1000, 3),
            "mean": round(sum(v) / n * 1000, 3), "max": round(v[-1] * 1000, 3)}


async def run(args: argparse.Namespace, request_bytes: bytes, host: str, port: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    start = perf()
    measure_from = start + args.warmup
    deadline = measure_from + args.duration
    samples: list[dict[str, Any]] = []
    errors: dict[str, int] = {}
    state = {"issued": 0, "warm": 0}

    def budget_left() -> bool:
        return perf() < deadline and state["issued"] < args.requests

    async def worker() -> None:
        conn: Conn | None = None
        while budget_left():
            measured = perf() >= measure_from
            if measured:
                state["issued"] += 1
            else:
                state["warm"] += 1
            try:
                if conn is None or conn.closed:
                    _, conn = await asyncio.wait_for(
                        loop.create_connection(lambda: Conn(loop), host, port), args.timeout)
                result = await conn.request(request_bytes, args.timeout)
            except (TimeoutError, StreamError, OSError) as exc:
                if measured:
                    key = f"{type(exc).__name__}: {exc}"[:240]
                    errors[key] = errors.get(key, 0) + 1
                if conn is not None and conn.transport is not None:
                    conn.transport.close()
                conn = None
                if not measured:
                    await asyncio.sleep(0.01)
                continue
            if measured:
                samples.append(result)
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    tasks = [loop.create_task(worker()) for _ in range(args.concurrency)]
    # hard bound: warm-up + duration + one request timeout
    done, pending = await asyncio.wait(tasks, timeout=args.warmup + args.duration + args.timeout + 5)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
        errors["cancelled at the hard time limit"] = len(pending)
    for t in done:
        if t.exception() is not None:
            key = f"worker crashed: {t.exception()!r}"[:240]
            errors[key] = errors.get(key, 0) + 1
    elapsed = max(1e-9, min(perf(), deadline + args.timeout) - max(measure_from, start))
    n_err = sum(errors.values())
    return {
        "url": args.url,
        "concurrency": args.concurrency,
        "requests": len(samples),
        "errors": n_err,
        "error_samples": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        "warmup_requests": state["warm"],
        "duration_s": round(elapsed, 3),
        "rps": round(len(samples) / elapsed, 2),
        "outputs_per_stream": round(sum(s["outputs"] for s in samples) / len(samples), 2) if samples else 0,
        "usage_chunks": sum(1 for s in samples if s["usage"]),
        "ttfb_ms": percentiles([s["ttfb"] for s in samples]),
        "ttft_ms": percentiles([s["ttft"] for s in samples]),
        "total_ms": percentiles([s["total"] for s in samples]),
    }


def build_request(args: argparse.Namespace) -> tuple[bytes, str, int]:
    u = urlsplit(args.url)
    if u.scheme != "http" or not u.hostname:
        sys.exit("stream_client: --url must be http://host:port/path")
    if not (u.hostname.startswith("127.") or u.hostname in ("localhost", "::1")):
        sys.exit(f"stream_client: refusing non-loopback host {u.hostname}")
    port = u.port or 80
    if args.body:
        with open(args.body, "rb") as fh:
            body_obj = orjson.loads(fh.read())
    else:
        body_obj = {"model": args.model, "messages": [{"role": "system", "content": DEFAULT_PROMPT},
                                                       {"role": "user", "content": DEFAULT_QUESTION}],
                    "temperature": 0.2, "max_tokens": 256, "user": "bench-user"}
    body_obj["stream"] = True
    if args.model and args.body:
        body_obj["model"] = args.model
    if args.include_usage and u.path.endswith("/completions"):
        body_obj["stream_options"] = {"include_usage": True}
    body = orjson.dumps(body_obj)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    lines = [f"POST {path} HTTP/1.1", f"Host: {u.hostname}:{port}", "Content-Type: application/json",
             "Accept: text/event-stream", f"Content-Length: {len(body)}"]
    for h in args.header:
        if ":" not in h:
            sys.exit(f"stream_client: bad header {h!r} (want 'Name: value')")
        name, value = h.split(":", 1)
        lines.append(f"{name.strip()}: {value.strip()}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body, u.hostname, port


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Closed-loop SSE benchmark client (loopback only).")
    p.add_argument("--url", required=True, help="e.g. http://127.0.0.1:18080/v1/chat/completions")
    p.add_argument("--model", help="model name (overrides the body's)")
    p.add_argument("--body", help="JSON body file (stream: true is forced)")
    p.add_argument("--no-usage", dest="include_usage", action="store_false",
                   help="do not ask for stream_options.include_usage (asked by default of a URL ending in "
                        "/completions)")
    p.add_argument("-H", "--header", action="append", default=[], help="extra header 'Name: value' (repeatable)")
    p.add_argument("-c", "--concurrency", type=int, default=32)
    p.add_argument("-n", "--requests", type=int, default=100000, help="max measured requests")
    p.add_argument("-d", "--duration", type=float, default=10.0, help="max measured seconds")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds of unmeasured requests first")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (s)")
    args = p.parse_args(argv)
    if not args.body and not args.model:
        p.error("give --model or --body")
    if args.concurrency < 1 or args.requests < 1 or args.duration <= 0:
        p.error("concurrency, requests and duration must be positive")
    request_bytes, host, port = build_request(args)
    if uvloop is not None:
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        result = loop.run_until_complete(run(args, request_bytes, host, port))
    finally:
        loop.close()
    print(orjson.dumps(result).decode(), flush=True)
    return 0 if result["requests"] > 0 and result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
