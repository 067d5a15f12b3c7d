"""OpenAICompatProvider and HttpClient in process, through the connector seam (tests/fake_transport.py).

No sockets (but one test against a real closed loopback port): canned HTTP bytes, SSE, slow drips,
cuts and garbage exercise the real parser, pool, per-call deadlines, SSE reader, the JSON-instead-of-SSE
conversion, and the redaction of upstream error text (client message clean, log redacted).
"""

from __future__ import annotations

import asyncio
import logging
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fake_transport import (
    CLOSE,
    FakeUpstream,
    Script,
    Seen,
    chunked,
    drip,
    head,
    json_response,
    sse_response,
)

from conftest import free_port
from gateway.errors import (
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnreachable,
    state_unavailable,
)
from gateway.policy import Deployment, load_policies
from gateway.providers.base import Call
from gateway.providers.httpclient import HttpClient
from gateway.providers.openai_compat import MAX_EVENT_BYTES, OpenAICompatProvider

KEY_ENV = "GATEWAY_TEST_INPROCESS_KEY"
KEY = "sk-live-Zq8X3mN4pR7tW2yB5vC9"            # what the gateway sends the upstream
OTHER_KEY = "plainsecret-0123456789abcdef"       # a key without the sk- shape
ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "up-model",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"},
                       "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}}


def make_deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str = KEY) -> Deployment:
    monkeypatch.setenv(KEY_ENV, key)
    (tmp_path / "models.yaml").write_text(textwrap.dedent(f"""\
        models:
          m:
            deployments:
              - provider: openai
                model: up-model
                api_base: http://upstream.internal:8443/v1
                api_key_env: {KEY_ENV}
                price: {{input_per_mtok: 1, output_per_mtok: 2}}
        """))
    spec = load_policies(str(tmp_path)).model("m")
    assert spec is not None
    return spec.deployments[0]


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Deployment:
    return make_deployment(tmp_path, monkeypatch)


@pytest.fixture
def upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
async def provider(upstream: FakeUpstream) -> AsyncIterator[OpenAICompatProvider]:
    client = HttpClient(connect_timeout=5.0, connector=upstream.connect)
    yield OpenAICompatProvider(client)
    await client.aclose()


def chat(deployment: Deployment, timeout: float = 5.0, endpoint: str = "chat", **body: Any) -> Call:
    if endpoint == "chat":
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
    else:
        body.setdefault("prompt", "hi")
    return Call(endpoint, {"model": deployment.upstream_model, **body}, deployment, timeout)


async def collect(provider: OpenAICompatProvider, call: Call, into: list[dict[str, Any]] | None = None
                  ) -> list[dict[str, Any]]:
    chunks = into if into is not None else []
    async for chunk in provider.stream(call):
        chunks.append(chunk)
    return chunks


def event(content: str | None = None, finish: str | None = None, **extra: Any) -> bytes:
    delta = {"content": content} if content is not None else {}
    return orjson.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})


USAGE_EVENT = orjson.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [],
                            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})


# ------------------------------------------------------------------ the seam and the plain paths


async def test_complete_sends_one_request_and_reuses_the_connection(
        provider: OpenAICompatProvider, upstream: FakeUpstream, deployment: Deployment) -> None:
    upstream.handler = lambda seen: json_response(200, ANSWER)
    assert await provider.complete(chat(deployment)) == ANSWER
    assert await provider.complete(chat(deployment, max_tokens=3)) == ANSWER
    assert upstream.connects == 1 and len(upstream.requests) == 2
    sent = upstream.requests[1]
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.headers["authorization"] == f"Bearer {KEY}" and sent.headers["host"] == "upstream.internal:8443"
    assert sent.json() == {"model": "up-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


async def test_a_stale_keep_alive_connection_is_replaced_once(provider: OpenAICompatProvider,
                                                               upstream: FakeUpstream, deployment: Deployment) -> None:
    replies = iter([json_response(200, ANSWER), Script([(0.0, CLOSE)]), json_response(200, ANSWER)])
    upstream.handler = lambda seen: next(replies)
    await provider.complete(chat(deployment))
    assert await provider.complete(chat(deployment)) == ANSWER      # the idle one died unanswered: a fresh one
    assert upstream.connects == 2 and len(upstream.requests) == 3


async def test_a_huge_error_body_is_read_only_in_part(provider: OpenAICompatProvider, upstream: FakeUpstream,
                                                      deployment: Deployment, caplog: pytest.LogCaptureFixture) -> None:
    size = 64 << 20                                                  # announced, never all sent
    piece = b"E" * (1 << 20)
    upstream.handler = lambda seen: Script(
        [(0.0, head(500, {"content-type": "text/plain", "content-length": str(size)}))]
        + [(0.01, piece) for _ in range(size // len(piece))])
    with caplog.at_level(logging.WARNING, "gateway"), pytest.raises(UpstreamError) as info:
        await provider.complete(chat(deployment))
    assert "HTTP 500" in info.value.message and "EEEE" in caplog.text
    await asyncio.sleep(0)
    assert upstream.open == 0                                        # dropped after the first 64 KiB


async def test_stream_yields_events_until_done(provider: OpenAICompatProvider, upstream: FakeUpstream,
                                               deployment: Deployment) -> None:
    upstream.handler = lambda seen: sse_response([event("Hel"), event("lo", "stop"), USAGE_EVENT])
    chunks = await collect(provider, chat(deployment, stream=True))
    assert [c["choices"][0]["delta"].get("content") for c in chunks[:2]] == ["Hel", "lo"]
    assert chunks[2]["usage"]["completion_tokens"] == 3 and len(chunks) == 3


async def test_sse_framing_crlf_multiline_data_and_comments(provider: OpenAICompatProvider,
                                                            upstream: FakeUpstream, deployment: Deployment) -> None:
    split = event("abc")
    # an event's data lines join with a newline: split at a comma, where JSON takes it as whitespace
    comma = split.index(b",") + 1
    body = (b": keep-alive\r\n\r\nevent: message\r\ndata: " + split[:comma] + b"\r\ndata: " + split[comma:] +
            b"\r\n\r\ndata: [DONE]\r\n\r\n")
    pieces = [body[i:i + 7] for i in range(0, len(body), 7)]      # arbitrary network chunking
    steps: list[tuple[float, bytes | None]] = [
        (0.0, head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"}))]
    steps += [(0.0, chunked(p)) for p in pieces] + [(0.0, b"0\r\n\r\n")]
    upstream.handler = lambda seen: Script(steps)
    chunks = await collect(provider, chat(deployment, stream=True))
    assert len(chunks) == 1 and chunks[0]["choices"][0]["delta"]["content"] == "abc"


async def test_cut_stream_is_an_upstream_error_after_the_chunks_already_read(
        provider: OpenAICompatProvider, upstream: FakeUpstream, deployment: Deployment) -> None:
    script = sse_response([event("one"), event("two")], done=False)
    script.steps = [*script.steps[:-1], (0.0, CLOSE)]                # no terminating chunk: cut
    upstream.handler = lambda seen: script
    seen: list[dict[str, Any]] = []
    with pytest.raises(UpstreamError) as info:
        await collect(provider, chat(deployment, stream=True), seen)
    assert [c["choices"][0]["delta"]["content"] for c in seen] == ["one", "two"]
    assert type(info.value) is UpstreamError and "closed mid-response" in info.value.message


@pytest.mark.parametrize(("reply", "words"), [
    (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n\xff\xfe\x00{[", "invalid JSON"),
    (b"\x00\x01garbage that is not HTTP\r\n\r\n", "unparseable response"),
    (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 3\r\n\r\n[1]", "non-object"),
])
async def test_invalid_bytes_are_upstream_errors(provider: OpenAICompatProvider, upstream: FakeUpstream,
                                                 deployment: Deployment, reply: bytes, words: str) -> None:
    upstream.handler = lambda seen: Script([(0.0, reply), (0.0, CLOSE)])
    with pytest.raises(UpstreamError) as info:
        await provider.complete(chat(deployment))
    assert words in info.value.message, info.value.message
    assert type(info.value) is UpstreamError and info.value.retryable


async def test_invalid_stream_event_is_an_upstream_error(provider: OpenAICompatProvider, upstream: FakeUpstream,
                                                         deployment: Deployment) -> None:
    upstream.handler = lambda seen: sse_response([event("ok"), b"{not json\xff"])
    seen: list[dict[str, Any]] = []
    with pytest.raises(UpstreamError) as info:
        await collect(provider, chat(deployment, stream=True), seen)
    assert len(seen) == 1 and "invalid stream event" in info.value.message


# ------------------------------------------------------------------ timeouts are per call (issue 11 item 7)


async def test_a_body_dripping_a_byte_at_a_time_times_out_at_the_call_deadline(
        provider: OpenAICompatProvider, upstream: FakeUpstream, deployment: Deployment) -> None:
    body = orjson.dumps(ANSWER)        # ~250 bytes at 0.1 s each would take ~25 s
    upstream.handler = lambda seen: Script(
        [(0.0, head(200, {"content-type": "application/json", "content-length": str(len(body))}))]
        + drip(body, 0.1))
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await provider.complete(chat(deployment, timeout=0.5))
    assert time.monotonic() - started < 10


async def test_headers_dripping_time_out_at_the_call_deadline(provider: OpenAICompatProvider,
                                                              upstream: FakeUpstream,
                                                              deployment: Deployment) -> None:
    raw = json_response(200, ANSWER).steps[0][1]
    assert raw is not None
    upstream.handler = lambda seen: Script(drip(raw, 0.1))
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await provider.complete(chat(deployment, timeout=0.5))
    with pytest.raises(UpstreamTimeout):
        await collect(provider, chat(deployment, timeout=0.5, stream=True))
    assert time.monotonic() - started < 20


async def test_stream_first_event_is_bound_by_the_call_deadline(provider: OpenAICompatProvider,
                                                                upstream: FakeUpstream,
                                                                deployment: Deployment) -> None:
    first = b"data: " + event("x") + b"\n\n"
    upstream.handler = lambda seen: Script(
        [(0.0, head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"}))]
        + [(0.1, chunked(first[i:i + 1])) for i in range(len(first))])
    seen: list[dict[str, Any]] = []
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await collect(provider, chat(deployment, timeout=0.5, stream=True), seen)
    assert seen == [] and time.monotonic() - started < 10


async def test_stream_after_the_first_event_has_an_idle_limit_between_events(
        provider: OpenAICompatProvider, upstream: FakeUpstream, deployment: Deployment) -> None:
    # 8 events 0.15 s apart: longer in total than the 0.5 s timeout, yet never idle that long
    upstream.handler = lambda seen: sse_response([event(str(i)) for i in range(8)], delay=0.15)
    chunks = await collect(provider, chat(deployment, timeout=0.5, stream=True))
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == [str(i) for i in range(8)]
    # then an event that drips in slower than the idle limit allows
    slow = b"data: " + event("late") + b"\n\n"
    upstream.handler = lambda seen: Script(
        [*sse_response([event("early")], done=False).steps[:-1]] + [(0.1, chunked(slow[i:i + 1]))
                                                                 for i in range(len(slow))])
    seen: list[dict[str, Any]] = []
    with pytest.raises(UpstreamTimeout):
        await collect(provider, chat(deployment, timeout=0.5, stream=True), seen)
    assert [c["choices"][0]["delta"]["content"] for c in seen] == ["early"]


async def test_an_sse_line_over_the_limit_fails_the_stream_and_drops_the_connection(
        provider: OpenAICompatProvider, upstream: FakeUpstream, deployment: Deployment) -> None:
    piece = b"x" * (256 << 10)
    steps: list[tuple[float, bytes | None]] = [
        (0.0, head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})),
        (0.0, chunked(b"data: " + event("fine") + b"\n\n")), (0.0, chunked(b"data: {\"a\": \""))]
    steps += [(0.001, chunked(piece)) for _ in range((MAX_EVENT_BYTES * 50) // len(piece))]   # 50 MiB, no newline
    upstream.handler = lambda seen: Script(steps)
    seen: list[dict[str, Any]] = []
    with pytest.raises(UpstreamError) as info:
        await collect(provider, chat(deployment, stream=True), seen)
    assert "stream event too large" in info.value.message and len(seen) == 1
    await asyncio.sleep(0)
    assert upstream.open == 0 and upstream.delivered < 3 * MAX_EVENT_BYTES   # aborted: the rest never read


async def test_many_data_lines_over_the_limit_fail_the_stream(provider: OpenAICompatProvider,
                                                              upstream: FakeUpstream,
                                                              deployment: Deployment) -> None:
    line = b"data: " + b"y" * (100 << 10) + b"\n"          # each line is fine, the event is not
    steps: list[tuple[float, bytes | None]] = [
        (0.0, head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"}))]
    steps += [(0.0, chunked(line)) for _ in range(20)]
    upstream.handler = lambda seen: Script(steps)
    with pytest.raises(UpstreamError) as info:
        await collect(provider, chat(deployment, stream=True))
    assert "stream event too large" in info.value.message


# ------------------------------------------------------------------ JSON answer to a stream request (item 3)


async def test_a_json_answer_to_a_stream_request_becomes_chunks_with_its_usage(
        provider: OpenAICompatProvider, upstream: FakeUpstream, deployment: Deployment) -> None:
    upstream.handler = lambda seen: json_response(200, ANSWER)
    chunks = await collect(provider, chat(deployment, stream=True))
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-1" for c in chunks)
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": "Hello there"},
                                     "finish_reason": None}]
    assert chunks[1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert chunks[2]["choices"] == [] and chunks[2]["usage"] == ANSWER["usage"] and len(chunks) == 3


async def test_a_json_tool_call_answer_becomes_indexed_tool_call_deltas(
        provider: OpenAICompatProvider, upstream: FakeUpstream, deployment: Deployment) -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"q\": 1}"}},
             {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]
    answer = {**ANSWER, "choices": [{"index": 0, "finish_reason": "tool_calls",
                                     "message": {"role": "assistant", "content": None, "tool_calls": calls}}]}
    upstream.handler = lambda seen: json_response(200, answer, {"content-type": "application/json; charset=utf-8"})
    chunks = await collect(provider, chat(deployment, stream=True))
    delta = chunks[0]["choices"][0]["delta"]
    assert delta["tool_calls"] == [{"index": 0, **calls[0]}, {"index": 1, **calls[1]}] and "content" not in delta
    assert chunks[1]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["total_tokens"] == 13


async def test_a_json_text_completion_to_a_stream_request(provider: OpenAICompatProvider,
                                                          upstream: FakeUpstream, deployment: Deployment) -> None:
    answer = {"id": "cmpl-1", "object": "text_completion", "created": 3, "model": "up-model",
              "choices": [{"index": 0, "text": "four", "finish_reason": "length", "logprobs": None}],
              "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}
    upstream.handler = lambda seen: json_response(200, answer)
    chunks = await collect(provider, chat(deployment, endpoint="completions", stream=True))
    assert upstream.requests[0].path == "/v1/completions"
    assert [c["choices"][0]["text"] for c in chunks[:2]] == ["four", ""]
    assert chunks[1]["choices"][0]["finish_reason"] == "length" and chunks[0]["object"] == "text_completion"
    assert chunks[2]["usage"] == answer["usage"]


@pytest.mark.parametrize("body", [{"error": {"message": f"boom {KEY}", "type": "server_error"}}, {"data": []}])
async def test_a_json_answer_that_is_no_completion_is_an_upstream_error(
        provider: OpenAICompatProvider, upstream: FakeUpstream, deployment: Deployment, body: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    upstream.handler = lambda seen: json_response(200, body)
    with caplog.at_level(logging.WARNING, "gateway"), pytest.raises(UpstreamError) as info:
        await collect(provider, chat(deployment, stream=True))
    assert type(info.value) is UpstreamError and info.value.failure == "server_error"
    assert KEY not in info.value.message and KEY not in caplog.text


async def test_a_stream_request_answered_with_neither_sse_nor_json_falls_back(
        provider: OpenAICompatProvider, upstream: FakeUpstream, deployment: Deployment) -> None:
    page = b"<html>maintenance</html>"
    upstream.handler = lambda seen: Script(
        [(0.0, head(200, {"content-type": "text/html", "content-length": str(len(page))}) + page)])
    with pytest.raises(UpstreamError) as info:
        await collect(provider, chat(deployment, stream=True))
    assert type(info.value) is UpstreamError and info.value.failure == "server_error" and info.value.retryable
    assert "maintenance" not in info.value.message


# ------------------------------------------------------------------ upstream text never reaches the client (item 5)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_401_echoing_the_credential_shows_it_neither_to_the_client_nor_in_the_log(
        upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, stream: bool) -> None:
    for key in (KEY, OTHER_KEY):
        deployment = make_deployment(tmp_path, monkeypatch, key)

        def echo(seen: Seen) -> Script:
            got = seen.headers["authorization"]
            return json_response(401, {"error": {
                "message": f"Incorrect API key provided: {got.split()[1]}. Header was '{got}'.",
                "type": "invalid_request_error", "code": got.split()[1], "param": got}})

        upstream.handler = echo
        client = HttpClient(connector=upstream.connect)
        provider = OpenAICompatProvider(client)
        caplog.clear()
        with caplog.at_level(logging.DEBUG), pytest.raises(UpstreamError) as info:
            if stream:
                await collect(provider, chat(deployment, stream=True))
            else:
                await provider.complete(chat(deployment))
        await client.aclose()
        exc = info.value
        shown = orjson.dumps(exc.body()).decode() + repr(exc.headers)
        assert key not in shown and key not in caplog.text
        assert exc.failure == "auth" and exc.status_code == 502 and "HTTP 401" in exc.message
        assert deployment.id in exc.message and "invalid_request_error" in exc.message
        assert "Incorrect API key provided: [redacted]" in caplog.text      # the log keeps the story


async def test_arbitrary_upstream_text_goes_to_the_log_not_the_client(
        provider: OpenAICompatProvider, upstream: FakeUpstream, deployment: Deployment,
        caplog: pytest.LogCaptureFixture) -> None:
    text = b"Traceback: db at postgres://admin:hunter2@10.0.0.5:5432 died; token sk-other-ABCDEF123456"
    upstream.handler = lambda seen: Script(
        [(0.0, head(500, {"content-type": "text/plain", "content-length": str(len(text))}) + text)])
    with caplog.at_level(logging.WARNING, "gateway"), pytest.raises(UpstreamError) as info:
        await provider.complete(chat(deployment))
    assert info.value.message == f"deployment {deployment.id} failed with a server error (HTTP 500)"
    assert "10.0.0.5" in caplog.text and "Traceback" in caplog.text
    assert "sk-other-ABCDEF123456" not in caplog.text


async def test_rejections_keep_only_identifier_codes_and_well_formed_retry_after(
        provider: OpenAICompatProvider, upstream: FakeUpstream, deployment: Deployment) -> None:
    upstream.handler = lambda seen: json_response(400, {"error": {
        "message": "This model's maximum context length is 8192 tokens, you sent 9000", "type": "invalid_request_error",
        "code": "context_length_exceeded", "param": "messages"}})
    with pytest.raises(UpstreamRejected) as rejected:
        await provider.complete(chat(deployment))
    assert rejected.value.code == "context_length_exceeded" and rejected.value.param == "messages"
    assert rejected.value.retryable and "8192" not in rejected.value.message
    upstream.handler = lambda seen: json_response(400, {"error": {"message": "no", "code": "has spaces <b>",
                                                                  "param": "x' OR 1=1"}})
    with pytest.raises(UpstreamRejected) as odd:
        await provider.complete(chat(deployment))
    assert odd.value.code == "upstream_rejected" and odd.value.param is None and "<b>" not in odd.value.message
    upstream.handler = lambda seen: json_response(429, {"error": {"message": "slow down"}}, {"retry-after": "7"})
    with pytest.raises(UpstreamRateLimited) as limited:
        await provider.complete(chat(deployment))
    assert limited.value.headers == {"retry-after": "7"} and "slow down" not in limited.value.message
    upstream.handler = lambda seen: json_response(429, {}, {"retry-after": f"7; key={KEY}"})
    with pytest.raises(UpstreamRateLimited) as bad:
        await provider.complete(chat(deployment))
    assert bad.value.headers == {}


async def test_a_mid_stream_error_event_is_redacted(provider: OpenAICompatProvider, upstream: FakeUpstream,
                                                    deployment: Deployment,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    error = orjson.dumps({"error": {"message": f"overloaded, your key {KEY} is fine", "type": "overloaded_error"}})
    upstream.handler = lambda seen: sse_response([event("a"), error])
    with caplog.at_level(logging.WARNING, "gateway"), pytest.raises(UpstreamError) as info:
        await collect(provider, chat(deployment, stream=True))
    assert info.value.message == f"deployment {deployment.id} failed mid-stream (overloaded_error)"
    assert KEY not in caplog.text and "overloaded, your key [redacted] is fine" in caplog.text


async def test_connection_refused_hides_host_and_port(upstream: FakeUpstream, deployment: Deployment,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    upstream.refuse = ConnectionRefusedError(111, "Connect call failed ('10.9.8.7', 4321)")
    client = HttpClient(connector=upstream.connect)
    provider = OpenAICompatProvider(client)
    with caplog.at_level(logging.WARNING, "gateway"), pytest.raises(UpstreamUnreachable) as info:
        await provider.complete(chat(deployment))
    await client.aclose()
    assert info.value.message == f"deployment {deployment.id} is unreachable (connection refused)"
    assert "upstream.internal:8443" in caplog.text        # the operator still learns where


async def test_a_real_closed_port_is_unreachable_without_naming_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    (tmp_path / "models.yaml").write_text(textwrap.dedent(f"""\
        models:
          m:
            deployments:
              - {{provider: openai, model: x, api_base: "http://127.0.0.1:{port}/v1"}}
        """))
    spec = load_policies(str(tmp_path)).model("m")
    assert spec is not None
    client = HttpClient()
    with pytest.raises(UpstreamUnreachable) as info:
        await OpenAICompatProvider(client).complete(chat(spec.deployments[0]))
    await client.aclose()
    assert str(port) not in info.value.message and "127.0.0.1" not in info.value.message
    assert info.value.failure == "connection"


def test_state_unavailable_does_not_name_redis(caplog: pytest.LogCaptureFixture) -> None:
    cause = ConnectionError("Error 111 connecting to 10.1.2.3:6379. Connection refused.")
    with caplog.at_level(logging.DEBUG, "gateway"):
        refused, admin = state_unavailable(cause), state_unavailable(cause, "Key, budget and ledger state")
    for exc in (refused, admin):
        assert exc.status_code == 503 and exc.code == "state_unavailable"
        assert "6379" not in exc.message and "10.1.2.3" not in exc.message
    assert "unreachable" in admin.message and "refuse" in refused.message
    assert "10.1.2.3:6379" in caplog.text


async def test_health_check_needs_a_2xx_in_time(provider: OpenAICompatProvider, upstream: FakeUpstream,
                                                deployment: Deployment) -> None:
    upstream.handler = lambda seen: json_response(200, {"data": []})
    await provider.check(deployment, 1.0)
    assert (upstream.requests[-1].method, upstream.requests[-1].path) == ("GET", "/v1/models")
    upstream.handler = lambda seen: json_response(503, {"error": {"message": "down"}})
    with pytest.raises(UpstreamError, match="health check answered HTTP 503"):
        await provider.check(deployment, 1.0)
    upstream.handler = lambda seen: Script([(5.0, b"HTTP/1.1 200 OK\r\n")])
    with pytest.raises(UpstreamTimeout):
        await provider.check(deployment, 0.2)


async def test_a_slow_reader_stops_the_socket_being_read_instead_of_buffering(
        provider: OpenAICompatProvider, upstream: FakeUpstream, deployment: Deployment) -> None:
    one = b"data: " + event("w") + b"\n\n"
    piece = one * ((64 << 10) // len(one))                    # ~64 KiB of whole events per network read
    pieces = 128                                               # ~8 MiB in all, sent as fast as it is read
    steps: list[tuple[float, bytes | None]] = [
        (0.0, head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"}))]
    steps += [(0.0, chunked(piece)) for _ in range(pieces)] + [(0.0, b"0\r\n\r\n")]
    upstream.handler = lambda seen: Script(steps)
    stream = provider.stream(chat(deployment, stream=True))
    count = 0
    async for _ in stream:
        count += 1
        if count == 1:
            await asyncio.sleep(0.3)                           # a slow client: the upstream keeps sending
            assert upstream.pauses >= 1 and upstream.delivered < 4 * (1 << 20)   # of 8 MiB
    assert count == pieces * (len(piece) // len(one))         # everything arrives once the reader reads on
