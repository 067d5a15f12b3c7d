"""The access log: one line per request from its ledger record, text or JSON, with no secret and no prompt
text, client-chosen values quoted so that a line cannot be split or forged; and the JSON log format."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import re
import time

import httpx

from conftest import GatewayFactory, mock_policy
from gateway.access_log import (
    BUFFER_CHARS,
    JsonFormatter,
    LineParts,
    StderrLines,
    TextFormatter,
    access_fields,
    access_line,
    log_request,
    logging_config,
)
from gateway.state.ledger import LedgerRecord


def record(**changes: object) -> LedgerRecord:
    base = dict(request_id="req-1", ts=1.0, team="research", key_id="key_0123456789ab", requested_model="gpt-4o",
                model="gpt-4o", deployment="openai/gpt-4o", provider="openai", route="default", input_tokens=120,
                output_tokens=30, cached_input_tokens=64, cost_nano=1_234_500, latency_ms=812.5, ttft_ms=None,
                status="ok", cache="miss", stream=False)
    return LedgerRecord(**(base | changes))  # type: ignore[arg-type]


def test_text_line_has_every_field_in_order() -> None:
    line = access_line(record(), json_format=False)
    assert line == ("request_id=req-1 team=research key_id=key_0123456789ab model=gpt-4o deployment=openai/gpt-4o "
                    "provider=openai route=default status=ok input_tokens=120 output_tokens=30 cached_tokens=64 "
                    "cost_usd=0.0012345 latency_ms=812.5 ttft_ms=- stream=false cache=miss estimated=false")


def test_text_line_numbers_of_a_stream_and_a_whole_dollar() -> None:
    """Latency and time to first token with six significant digits, a cost past one dollar exact, a head
    before the line."""
    line = access_line(record(latency_ms=1234.5678, ttft_ms=3.0, stream=True, cost_nano=12_000_000_007), False,
                       head="HEAD ")
    assert line.startswith("HEAD request_id=req-1 ")
    assert "cost_usd=12.000000007 latency_ms=1234.57 ttft_ms=3 stream=true" in line


def test_json_line_carries_exact_cost_and_nulls() -> None:
    fields = json.loads(access_line(record(key_id=None, deployment="", cost_nano=7, stream=True, ttft_ms=12.0),
                                    json_format=True))
    assert fields["cost_usd"] == "0.000000007" and fields["key_id"] is None and fields["deployment"] is None
    assert fields["stream"] is True and fields["ttft_ms"] == 12.0 and fields["input_tokens"] == 120
    assert list(fields)[:4] == ["request_id", "team", "key_id", "model"]


def test_client_chosen_values_are_quoted_so_a_line_cannot_be_split() -> None:
    line = access_line(record(requested_model="x\nrequest_id=forged status=ok", request_id="abc def"), False)
    assert "\n" not in line and line.count("request_id=") == 2
    assert 'model="x\\nrequest_id=forged status=ok"' in line and 'request_id="abc def"' in line


def test_remembered_line_parts_give_the_same_line_and_stay_bounded() -> None:
    parts = LineParts(limit=3)
    hostile = record(requested_model="x\nrequest_id=forged status=ok", team="a b", request_id="abc def")
    assert access_line(hostile, False, parts) == access_line(hostile, False)
    assert access_line(hostile, False, parts) == access_line(hostile, False)     # from what it remembered
    assert access_line(record(status="budget_exceeded"), False, parts) == access_line(record(status="budget_exceeded"),
                                                                                      False)
    for i in range(50):
        assert access_line(record(team=f"team-{i}"), False, parts) == access_line(record(team=f"team-{i}"), False)
    assert len(parts.seen) <= 3


def test_no_secret_or_prompt_field_exists() -> None:
    fields = json.loads(access_line(record(), True))
    assert not {"secret", "api_key", "prompt", "messages", "content", "authorization"} & set(fields)


def test_log_request_in_text_and_in_json() -> None:
    for log_format in ("text", "json"):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter("%(message)s"))
        logger = logging.getLogger(f"gateway.access.test.{log_format}")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        log_request(record(), logger)
        logger.setLevel(logging.WARNING)            # off: nothing is rendered or written
        log_request(record(request_id="req-2"), logger)
        out = stream.getvalue().splitlines()
        assert len(out) == 1
        if log_format == "json":
            fields = json.loads(out[0])
            assert fields["request_id"] == "req-1" and fields["logger"] == logger.name and fields["level"] == "info"
            assert "message" not in fields
        else:
            assert out[0] == access_line(record(), False)


def test_stderr_lines_batches_access_lines_and_keeps_the_order_with_other_lines() -> None:
    for log_format in ("text", "json"):
        stream = io.StringIO()
        handler = StderrLines(stream, flush_s=3600)                # only a full buffer or another line writes
        handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
        base = logging.getLogger(f"batch.{log_format}")
        base.handlers[:] = [handler]
        base.propagate = False
        base.setLevel(logging.INFO)
        access = logging.getLogger(f"batch.{log_format}.access")
        log_request(record(request_id="req-a"), access)             # the direct path: no log record
        log_request(record(request_id="req-b"), access)
        assert stream.getvalue() == ""                              # waiting for the batch
        base.warning("a warning")                                   # writes what waits, then itself
        log_request(record(request_id="req-c"), access)
        handler.flush()                                             # what logging.shutdown does at exit
        out = stream.getvalue().splitlines()
        if log_format == "json":
            parsed = [json.loads(line) for line in out]
            assert [p.get("request_id", p.get("message")) for p in parsed] == ["req-a", "req-b", "a warning", "req-c"]
            assert parsed[0]["logger"] == "gateway.access" and parsed[0]["level"] == "info"
            assert parsed[0]["cost_usd"] == access_fields(record())["cost_usd"]
        else:
            assert [line.split(": ", 1)[1] for line in out] == [
                access_line(record(request_id="req-a"), False), access_line(record(request_id="req-b"), False),
                "a warning", access_line(record(request_id="req-c"), False)]
            assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line.split()[0]) for line in out)
            assert out[0].split()[1:3] == ["INFO", "gateway.access:"]


def test_stderr_lines_writes_a_full_buffer_at_once() -> None:
    stream = io.StringIO()
    handler = StderrLines(stream, flush_s=3600)
    handler.setFormatter(TextFormatter())
    rec = record(request_id="r" * 200)
    per_line = len(TextFormatter().format_access(rec, time.time()))
    fit = BUFFER_CHARS // per_line + (BUFFER_CHARS % per_line > 0)   # lines that reach BUFFER_CHARS
    for _ in range(fit - 1):
        handler.access(rec)
    assert stream.getvalue() == ""
    handler.access(rec)
    assert len(stream.getvalue().splitlines()) == fit


def test_stderr_lines_thread_writes_what_waits() -> None:
    stream = io.StringIO()
    handler = StderrLines(stream, flush_s=0.01)
    handler.setFormatter(TextFormatter())
    handler.access(record())
    deadline = time.monotonic() + 15            # the flusher thread writes it, not the caller
    while not stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.getvalue().split(": ", 1)[1] == access_line(record(), False) + "\n"


def test_an_access_line_through_another_handler_is_a_log_record() -> None:
    stream, seen = io.StringIO(), []
    handler = StderrLines(stream, flush_s=3600)
    handler.setFormatter(TextFormatter())
    base = logging.getLogger("batch.shared")
    base.handlers[:] = [handler]
    base.propagate = False
    base.setLevel(logging.INFO)
    other = logging.Handler()
    other.emit = seen.append  # type: ignore[method-assign]
    base.addHandler(other)                      # a second handler (pytest's caplog is one) sees the record too
    log_request(record(), logging.getLogger("batch.shared.access"))
    handler.flush()
    assert len(seen) == 1 and str(seen[0].msg) == access_line(record(), False)
    assert stream.getvalue().split(": ", 1)[1].strip() == access_line(record(), False)


def test_logging_config_puts_one_handler_of_the_chosen_format_on_the_root() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for log_format in ("text", "json"):
            logging.config.dictConfig(logging_config("warning", log_format))
            [handler] = root.handlers
            assert isinstance(handler.formatter, JsonFormatter) == (log_format == "json")
            assert root.level == logging.WARNING and logging.getLogger("uvicorn.error").propagate
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_a_running_gateway_logs_one_access_line_per_request(gateway: GatewayFactory) -> None:
    server = gateway(mock_policy("http://127.0.0.1:9"), env={"GATEWAY_LOG_FORMAT": "json"})
    ids = []
    for stream in (False, True):
        reply = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": "Bearer sk-secret-x"},
                           json={"model": "demo", "stream": stream,
                                 "messages": [{"role": "user", "content": "a private prompt"}]}, timeout=30)
        ids.append(reply.headers["x-request-id"])
    refused = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": "Bearer sk-secret-x"},
                         json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    ids.append(refused.headers["x-request-id"])
    deadline = time.monotonic() + 15           # access lines are written in batches, within FLUSH_S
    while True:
        lines = [json.loads(line) for line in server.output().splitlines() if line.strip()]
        access = [line for line in lines if line["logger"] == "gateway.access"]
        if len(access) >= len(ids) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [line["request_id"] for line in access] == ids
    assert [line["status"] for line in access][:2] == ["ok", "ok"] and access[0]["team"] == "default"
    assert "sk-secret-x" not in server.output() and "a private prompt" not in server.output()
