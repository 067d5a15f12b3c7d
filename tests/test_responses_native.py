"""The native Responses path's parts against a loopback mock Responses upstream: the mock speaks what
the official SDK expects, OpenAICompatProvider with endpoint "responses" passes bodies and events
through unchanged, and ResponsesStreamTap reads the final response, usage and cut streams."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from mock_responses import MockResponses, mock_responses, mock_responses_server  # noqa: F401  (fixtures)
from openai import OpenAI

from gateway.api.responses import ResponsesStreamTap
from gateway.errors import UpstreamError, UpstreamRejected
from gateway.policy.models import Deployment
from gateway.pricing import Price
from gateway.providers.base import Call
from gateway.providers.httpclient import HttpClient
from gateway.providers.openai_compat import OpenAICompatProvider

CODEX_BODY: dict[str, Any] = {
    "model": "gpt-5-codex",
    "instructions": "You are a coding agent.",
    "input": [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<permissions/>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list the files"}]},
    ],
    "tools": [
        {"type": "function", "name": "shell", "description": "Run a command", "strict": False,
         "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}},
        {"type": "web_search"},
        {"type": "namespace", "name": "crm", "description": "CRM tools", "tools": []},
    ],
    "tool_choice": "auto", "parallel_tool_calls": False,
    "reasoning": {"effort": "medium", "summary": "auto"}, "store": False, "stream": True,
    "include": ["reasoning.encrypted_content"], "prompt_cache_key": "thread-1",
    "text": {"verbosity": "medium"}, "client_metadata": {"originator": "codex_exec"},
    "some_future_field": {"nested": [1, 2, 3]},
}


def deployment(base: str) -> Deployment:
    return Deployment(id="native-1", model="m", provider="openai", upstream_model="gpt-5-codex",
                      api_base=f"{base}/v1", api_key="sk-upstream", api_key_env=None, weight=1.0,
                      context_window=None, max_output_tokens=None, capabilities=frozenset({"chat"}),
                      price=Price(0, 0, 0, 0, 0), price_source="policy", timeout_s=None, headers=(),
                      simulated=None, self_hosted=False, apis=frozenset({"chat", "responses"}))


async def _provider_stream(provider: OpenAICompatProvider, call: Call) -> list[dict[str, Any]]:
    return [event async for event in provider.stream(call)]


def _raw_events(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The data dicts of the mock's stream, read directly (no gateway code)."""
    events = []
    with httpx.stream("POST", f"{url}/v1/responses", json=body, timeout=10) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def test_mock_speaks_what_the_official_sdk_expects(mock_responses: MockResponses) -> None:  # noqa: F811
    client = OpenAI(base_url=f"{mock_responses.url}/v1", api_key="sk-test", max_retries=0)
    reply = client.responses.create(model="gpt-5", input="Hi")
    assert reply.output_text == "Hello from the mock Responses API."
    assert reply.usage is not None and reply.usage.input_tokens == 21
    with client.responses.stream(model="gpt-5", input="Hi", reasoning={"summary": "auto"}) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.reasoning_summary_text.delta" in kinds
    assert final.output_text == "Hello from the mock Responses API."
    follow = client.responses.create(model="gpt-5", input="And?", previous_response_id=final.id)
    assert follow.previous_response_id == final.id


async def test_provider_passes_a_codex_body_and_reply_through_unchanged(mock_responses: MockResponses) -> None:  # noqa: F811
    mock_responses.set(response_id="resp_fixed", cached=5, reasoning=3)
    body = dict(CODEX_BODY, stream=False)
    provider = OpenAICompatProvider(HttpClient())
    try:
        got = await provider.complete(Call("responses", body, deployment(mock_responses.url), 10.0))
    finally:
        await provider.aclose()
    assert mock_responses.last.path == "/v1/responses"
    assert mock_responses.last.body == body                      # every field, unknown ones included
    assert mock_responses.last.headers["authorization"] == "Bearer sk-upstream"
    direct = httpx.post(f"{mock_responses.url}/v1/responses", json=body, timeout=10).json()
    for reply in (got, direct):
        reply.pop("created_at")
    assert got == direct
    assert got["usage"]["input_tokens_details"] == {"cached_tokens": 5, "cache_write_tokens": 0}
    assert [i["type"] for i in got["output"]] == ["reasoning", "function_call"] and got["output"][1]["name"] == "shell"


async def test_provider_streams_every_event_unchanged_and_the_tap_reads_the_final_one(
        mock_responses: MockResponses) -> None:  # noqa: F811
    mock_responses.set(response_id="resp_stream", cached=4, reasoning=2)
    body = dict(CODEX_BODY, tools=[])     # a text answer
    provider = OpenAICompatProvider(HttpClient())
    try:
        events = await _provider_stream(provider, Call("responses", body, deployment(mock_responses.url), 10.0))
    finally:
        await provider.aclose()
    direct = _raw_events(mock_responses.url, body)
    for stream in (events, direct):
        for event in stream:
            if isinstance(event.get("response"), dict):
                event["response"].pop("created_at")
    assert events == direct
    assert all(isinstance(e.get("type"), str) for e in events)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert "response.reasoning_summary_text.delta" in [e["type"] for e in events]
    tap = ResponsesStreamTap()
    for event in events:
        tap.observe(event)
    assert tap.status == "completed" and tap.response_id == "resp_stream"
    assert tap.usage == {"input_tokens": 21, "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
                         "output_tokens": 8,
                         "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 29}
    assert tap.response is not None and tap.response["output"] == tap.output_items
    assert tap.delivered_text == "Thinking it over.Hello from the mock Responses API."


async def test_tap_on_a_cut_stream_and_a_failed_one(mock_responses: MockResponses) -> None:  # noqa: F811
    provider = OpenAICompatProvider(HttpClient())
    call = Call("responses", {"model": "gpt-5", "input": "Hi", "stream": True}, deployment(mock_responses.url), 10.0)
    try:
        mock_responses.set(cut_after=3)
        cut = await _provider_stream(provider, call)
        mock_responses.set(cut_after="", fail_after=2)
        failed = await _provider_stream(provider, call)
    finally:
        await provider.aclose()
    tap = ResponsesStreamTap()
    for event in cut:
        tap.observe(event)
    assert tap.response is None and tap.status is None and tap.usage is None
    assert tap.response_id is not None and tap.response_id.startswith("resp_mock_")
    assert tap.delivered_text == "Hello from the"
    tap = ResponsesStreamTap()
    for event in failed:
        tap.observe(event)
    assert failed[-1]["type"] == "response.failed"
    assert tap.status == "failed" and tap.usage is not None and tap.usage["output_tokens"] == 2


async def test_provider_maps_upstream_errors(mock_responses: MockResponses) -> None:  # noqa: F811
    provider = OpenAICompatProvider(HttpClient())
    dep = deployment(mock_responses.url)
    try:
        with pytest.raises(UpstreamRejected) as rejected:
            await provider.complete(Call("responses", {"model": "gpt-5", "input": "Hi",
                                                       "previous_response_id": "resp_unknown"}, dep, 10.0))
        assert rejected.value.code == "previous_response_not_found"
        assert rejected.value.param == "previous_response_id"
        mock_responses.set(status=500)
        with pytest.raises(UpstreamError) as failed:
            await _provider_stream(provider, Call("responses", {"model": "gpt-5", "input": "Hi", "stream": True},
                                                  dep, 10.0))
        assert failed.value.status_code == 502
    finally:
        await provider.aclose()
