"""The benchmark's Messages and Responses paths: the mock upstream's ``/v1/messages`` and
``/v1/responses`` (read by the official Anthropic and OpenAI SDKs), ``stream_client.py`` on their
streams, and the bench policy's native and translated deployments through a real gateway process,
checked with ``run.py``'s own request bodies and smoke test."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from conftest import ROOT, GatewayFactory

sys.path.insert(0, str(ROOT / "bench"))
import run as bench_run  # noqa: E402  (bench/run.py)

SYSTEM = "be brief please"          # 3 words
QUESTION = "what is the answer"     # 4 words
# the mock's rule: 3 + per message (3 + words); the system prompt / instructions count as one message
PROMPT_TOKENS = 3 + (3 + 3) + (3 + 4)
WORDS = ["Mock", " answer", " from", " the", " benchmark", " upstream", " with"]


@pytest.fixture
def claude(mock_reset: str) -> Iterator[anthropic.Anthropic]:
    client = anthropic.Anthropic(base_url=mock_reset, api_key="unused", max_retries=0)
    yield client
    client.close()


@pytest.fixture
def oai(mock_reset: str) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=mock_reset + "/v1", api_key="unused", max_retries=0)
    yield client
    client.close()


def stats(mock: str) -> dict[str, Any]:
    return httpx.get(f"{mock}/_stats").json()


def test_messages_json_text_cap_and_usage(claude: anthropic.Anthropic, mock_reset: str) -> None:
    msg = claude.messages.create(model="claude-mock-tokens5-cached4", max_tokens=100, system=SYSTEM,
                                 messages=[{"role": "user", "content": QUESTION}])
    assert msg.type == "message" and msg.model == "claude-mock-tokens5-cached4"
    assert msg.content[0].type == "text" and msg.content[0].text == "".join(WORDS[:5])
    assert msg.stop_reason == "end_turn"
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == \
        (PROMPT_TOKENS - 4, 4, 5)
    capped = claude.messages.create(model="claude-mock", max_tokens=3,
                                    messages=[{"role": "user", "content": QUESTION}])
    assert capped.stop_reason == "max_tokens" and capped.usage.output_tokens == 3
    assert capped.content[0].text == "".join(WORDS[:3])
    assert msg.id != capped.id
    assert stats(mock_reset)["endpoints"]["messages"] == 2


def test_messages_stream_read_by_the_sdk(claude: anthropic.Anthropic, mock_reset: str) -> None:
    with claude.messages.stream(model="claude-mock-chunks7-delay1", max_tokens=100, system=SYSTEM,
                                messages=[{"role": "user", "content": QUESTION}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert final.content[0].text == "".join(WORDS)
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (PROMPT_TOKENS, 7)
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("content_block_delta") == 7
    assert stats(mock_reset)["streams_completed"] == 1


def test_messages_tool_call_and_tool_result(claude: anthropic.Anthropic) -> None:
    tools: Any = [{"name": "lookup", "description": "d", "input_schema": {"type": "object"}},
                  {"name": "other", "description": "d", "input_schema": {"type": "object"}}]
    msg = claude.messages.create(model="claude-mock", max_tokens=50, tools=tools,
                                 tool_choice={"type": "tool", "name": "other"},
                                 messages=[{"role": "user", "content": QUESTION}])
    assert msg.stop_reason == "tool_use"
    block = msg.content[0]
    assert block.type == "tool_use" and block.name == "other" and block.input == {"q": "mock"}
    with claude.messages.stream(model="claude-mock", max_tokens=50, tools=tools,
                                messages=[{"role": "user", "content": QUESTION}]) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].type == "tool_use" and streamed.content[0].name == "lookup"
    assert streamed.content[0].input == {"q": "mock"} and streamed.stop_reason == "tool_use"
    answered = claude.messages.create(model="claude-mock", max_tokens=50, tools=tools, messages=[
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": [{"type": "tool_use", "id": block.id, "name": "other", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "42"}]}])
    assert answered.content[0].type == "text" and answered.stop_reason == "end_turn"


def test_messages_error_status_in_anthropic_envelope(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.RateLimitError) as info:
        claude.messages.create(model="claude-status429", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.body == {"type": "error", "error": {"type": "rate_limit_error", "message": "mock failure"}}
    with pytest.raises(anthropic.InternalServerError):
        claude.messages.create(model="claude-status529", max_tokens=5, messages=[{"role": "user", "content": "x"}])


def test_messages_stream_cut_aborts_without_message_stop(mock_reset: str) -> None:
    body = {"model": "claude-mock-cut2", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": QUESTION}]}
    seen = b""
    with pytest.raises(httpx.HTTPError), httpx.stream("POST", f"{mock_reset}/v1/messages", json=body) as resp:
        for chunk in resp.iter_raw():
            seen += chunk
    assert seen.count(b"event: content_block_delta") == 2 and b"message_stop" not in seen
    assert stats(mock_reset)["streams_cut"] == 1


def test_responses_json_text_cap_and_usage(oai: openai.OpenAI) -> None:
    resp = oai.responses.create(model="mock-tokens5-cached3-reasoning2", instructions=SYSTEM, input=QUESTION)
    assert resp.status == "completed" and resp.output_text == "".join(WORDS[:5])
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.input_tokens_details.cached_tokens) == (PROMPT_TOKENS, 3)
    assert (resp.usage.output_tokens, resp.usage.output_tokens_details.reasoning_tokens) == (7, 2)
    capped = oai.responses.create(model="mock", input=[{"role": "user", "content": QUESTION}],
                                  max_output_tokens=3)
    assert capped.status == "incomplete" and capped.incomplete_details is not None
    assert capped.incomplete_details.reason == "max_output_tokens" and capped.output_text == "".join(WORDS[:3])
    bare = oai.responses.create(model="mock-nousage", input=QUESTION)
    assert bare.usage is None and bare.output_text


def test_responses_stream_read_by_the_sdk(oai: openai.OpenAI, mock_reset: str) -> None:
    events = list(oai.responses.create(model="mock-chunks7-delay1", instructions=SYSTEM, input=QUESTION,
                                       stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds.count("response.output_text.delta") == 7 and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response   # type: ignore[union-attr]
    assert final.output_text == "".join(WORDS) and final.usage.input_tokens == PROMPT_TOKENS
    assert final.usage.output_tokens == 7
    assert stats(mock_reset)["endpoints"]["responses"] == 1


def test_responses_function_call(oai: openai.OpenAI) -> None:
    tools: Any = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
    resp = oai.responses.create(model="mock", input=QUESTION, tools=tools)
    call = resp.output[0]
    assert call.type == "function_call" and call.name == "lookup" and json.loads(call.arguments) == {"q": "mock"}
    events = list(oai.responses.create(model="mock", input=QUESTION, tools=tools, stream=True))
    assert "response.function_call_arguments.delta" in [e.type for e in events]
    assert events[-1].response.output[0].arguments == '{"q": "mock"}'   # type: ignore[union-attr]
    answered = oai.responses.create(model="mock", tools=tools, input=[
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": call.call_id, "name": "lookup", "arguments": "{}"},   # type: ignore
        {"type": "function_call_output", "call_id": call.call_id, "output": "42"}])
    assert answered.output[0].type == "message" and answered.output_text


def test_chat_answers_unchanged_by_the_new_endpoints(mock_reset: str) -> None:
    body = {"model": "mock-chunks2", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}]}
    text = httpx.post(f"{mock_reset}/v1/chat/completions", json=body).text
    frames = [line for line in text.split("\n") if line.startswith("data: ")]
    assert "event:" not in text and frames[-1] == "data: [DONE]" and len(frames) == 5


def stream_client(url: str, body: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "body.json"
    path.write_text(json.dumps(body))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "stream_client.py"), "--url", url, "--body",
                           str(path), "-c", "1", "-n", "3", "-d", "20"], capture_output=True, text=True, timeout=60)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path, body", [
    ("/v1/messages", {"model": "claude-mock-chunks6", "max_tokens": 50,
                      "messages": [{"role": "user", "content": "q"}]}),
    ("/v1/responses", {"model": "mock-chunks6", "input": "q"}),
    ("/v1/chat/completions", {"model": "mock-chunks6", "messages": [{"role": "user", "content": "q"}]}),
])
def test_stream_client_reads_each_api(path: str, body: dict[str, Any], mock_reset: str, tmp_path: Path) -> None:
    r = stream_client(mock_reset + path, body, tmp_path)
    assert (r["requests"], r["errors"], r["outputs_per_stream"], r["usage_chunks"]) == (3, 0, 6.0, 3)
    assert r["ttft_ms"]["p50"] <= r["total_ms"]["p50"]
    logged = httpx.get(f"{mock_reset}/_requests").json()
    assert all(("stream_options" in e["body"]) == path.endswith("/completions") for e in logged)


def test_stream_client_counts_a_cut_messages_stream_as_an_error(mock_reset: str, tmp_path: Path) -> None:
    r = stream_client(mock_reset + "/v1/messages", {"model": "claude-mock-cut3", "max_tokens": 50,
                                                    "messages": [{"role": "user", "content": "q"}]}, tmp_path)
    assert r["requests"] == 0 and r["errors"] == 3


def test_bench_policy_native_and_translated_paths(gateway: GatewayFactory, mock_reset: str) -> None:
    """run.py's own bodies through a gateway on bench/policies: every Messages / Responses scenario answers,
    natively (the mock's /messages or /responses) or translated (its /chat/completions) as it claims."""
    text = (ROOT / "bench" / "policies" / "models.yaml").read_text()
    port = mock_reset.rsplit(":", 1)[1]
    server = gateway(text.replace("127.0.0.1:18080", f"127.0.0.1:{port}"),
                     env={"BENCH_ANTHROPIC_KEY": "sk-bench-anthropic"})
    keys = bench_run.API_SCENARIOS.split(",")
    assert len(keys) == 12
    assert bench_run.smoke_api(server.url + "/v1", ["Authorization: Bearer sk-bench"], keys, mock_reset) is None
    native = [e for e in httpx.get(f"{mock_reset}/_requests").json() if e["path"] == "/v1/messages"]
    assert native and all(e["headers"]["x-api-key"] == "sk-bench-anthropic" for e in native)
    # a scenario claiming the wrong upstream endpoint is caught
    bench_run.SCENARIOS["bogus"] = {**bench_run.SCENARIOS["mt1"], "upstream": "messages"}
    try:
        err = bench_run.smoke_api(server.url + "/v1", ["Authorization: Bearer sk-bench"], ["bogus"], mock_reset)
    finally:
        del bench_run.SCENARIOS["bogus"]
    assert err is not None and "did not reach the mock's messages endpoint" in err


def test_api_report_added_values() -> None:
    def wrk(rps: float, p50: float) -> dict[str, Any]:
        return {"rps": rps, "p50_ms": p50, "p99_ms": p50 * 2, "cpu_ms_per_req": 0.5}

    def streamed(ttft: float, total: float) -> dict[str, Any]:
        return {"ttft_ms": {"p50": ttft, "p99": ttft}, "total_ms": {"p50": total, "p99": total}}

    direct = {"m": wrk(20000.0, 0.5), "m1": wrk(30000.0, 0.02), "ms1": streamed(0.25, 95.5)}
    res = {"meta": {"scenarios": ["m", "m1", "ms1"]}, "direct_mean": direct,
           "targets": {"gateway": {"m": wrk(4000.0, 8.0), "m1": wrk(2000.0, 0.52), "ms1": streamed(1.0, 96.25)}}}
    table, derived = bench_run.api_report(res)
    assert derived["m_rps_ratio"] == pytest.approx(0.2)
    assert derived["m1_added_p50_ms"] == pytest.approx(0.5)
    assert derived["ms1_ttft_p50_added_ms"] == pytest.approx(0.75)
    assert derived["ms1_total_p50_added_ms"] == pytest.approx(0.75)
    assert "| Messages native (m, m1, ms1) | 20,000 | 4,000 | 0.200 | 0.5000 | 7.500 | 0.020 | 0.500 | 0.25 | " \
        "0.750 | 0.750 |" in table
    assert "| Responses" not in table and "| Messages translated" not in table
    assert bench_run.api_report({**res, "meta": {"scenarios": ["a"]}}) == ("", {})
