"""The access log: one line per request from its ledger record, text or JSON, with no secret and no prompt
text, client-chosen values quoted so that a line cannot be split or forged; and the JSON log format."""

from __future__ import annotations

import io
import json
import logging
import logging.config

import httpx

from conftest import GatewayFactory, mock_policy
from gateway.access_log import JsonFormatter, access_line, log_request, logging_config
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
    lines = [json.loads(line) for line in server.output().splitlines() if line.strip()]
    access = [line for line in lines if line["logger"] == "gateway.access"]
    assert [line["request_id"] for line in access] == ids
    assert [line["status"] for line in access][:2] == ["ok", "ok"] and access[0]["team"] == "default"
    assert "sk-secret-x" not in server.output() and "a private prompt" not in server.output()
