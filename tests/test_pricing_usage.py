"""Usage normalisation for every upstream shape, the upstream's own reported cost, and the drift counter.

Also: a litellm-backed deployment (OpenRouter through litellm, against a real
loopback mock of its API) never shows litellm's or the upstream's ``usage.cost``
to clients; the number is kept under ``_upstream_cost`` for the drift counter.
"""

from __future__ import annotations

import json
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gateway.metrics import Metrics
from gateway.policy import Deployment, load_policies
from gateway.pricing import (
    PriceBook,
    Usage,
    cost_nano,
    upstream_cost_nano,
    usage_from_anthropic,
    usage_from_openai,
    usage_from_responses,
)
from gateway.providers.base import Call
from gateway.providers.litellm_provider import LiteLLMProvider

# --- Anthropic Messages ---------------------------------------------------------------------------


def test_anthropic_input_tokens_are_the_uncached_ones() -> None:
    raw = {"input_tokens": 100, "output_tokens": 50, "cache_read_input_tokens": 2_000,
           "cache_creation_input_tokens": 300,
           "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
           "service_tier": "standard", "server_tool_use": {"web_search_requests": 0}}
    expected = Usage(input_tokens=2_400, output_tokens=50, cached_input_tokens=2_000,
                     cache_write_tokens=100, cache_write_1h_tokens=200)
    assert usage_from_anthropic(raw) == expected
    assert usage_from_openai(raw) == expected            # the generic reader recognises the shape
    # a breakdown without the total, and a total without the breakdown (all 5-minute)
    assert usage_from_anthropic({"input_tokens": 1, "output_tokens": 2, "cache_creation": {
        "ephemeral_5m_input_tokens": 3, "ephemeral_1h_input_tokens": 4}}) == Usage(
        input_tokens=8, output_tokens=2, cache_write_tokens=3, cache_write_1h_tokens=4)
    assert usage_from_anthropic({"input_tokens": 1, "cache_creation_input_tokens": 9}) == Usage(
        input_tokens=10, cache_write_tokens=9)
    # a 1-hour count larger than the total is capped at it
    assert usage_from_anthropic({"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 5,
                                 "cache_creation": {"ephemeral_1h_input_tokens": 50}}) == Usage(
        input_tokens=5, cache_write_1h_tokens=5)


@pytest.mark.parametrize("raw", [None, {}, {"cache_read_input_tokens": 5}, "usage", [1],
                                 {"input_tokens": "10", "output_tokens": None}])
def test_anthropic_junk_is_none(raw: Any) -> None:
    assert usage_from_anthropic(raw) is None


# --- OpenAI Responses -----------------------------------------------------------------------------


def test_responses_input_tokens_include_the_cached_ones() -> None:
    raw = {"input_tokens": 1_000, "input_tokens_details": {"cached_tokens": 400}, "output_tokens": 200,
           "output_tokens_details": {"reasoning_tokens": 150}, "total_tokens": 1_200}
    expected = Usage(input_tokens=1_000, output_tokens=200, cached_input_tokens=400, reasoning_tokens=150)
    assert usage_from_responses(raw) == expected
    assert usage_from_openai(raw) == expected
    # inconsistent counts never make a part larger than its whole
    odd = usage_from_responses({"input_tokens": 10, "input_tokens_details": {"cached_tokens": 40},
                                "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 9}})
    assert odd == Usage(input_tokens=40, output_tokens=5, cached_input_tokens=40, reasoning_tokens=5)
    assert usage_from_responses({"total_tokens": 3}) is None
    assert usage_from_responses(None) is None


# --- OpenAI chat and its relatives ----------------------------------------------------------------


def test_deepseek_hit_and_miss_without_prompt_tokens() -> None:
    assert usage_from_openai({"prompt_cache_hit_tokens": 30, "prompt_cache_miss_tokens": 70,
                              "completion_tokens": 5}) == Usage(input_tokens=100, output_tokens=5,
                                                                cached_input_tokens=30)


def test_reasoning_inside_or_beside_completion_tokens() -> None:
    inside = {"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110,
              "completion_tokens_details": {"reasoning_tokens": 60}}
    assert usage_from_openai(inside) == Usage(input_tokens=10, output_tokens=100, reasoning_tokens=60)
    beside = {"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 170,
              "completion_tokens_details": {"reasoning_tokens": 60}}
    assert usage_from_openai(beside) == Usage(input_tokens=10, output_tokens=160, reasoning_tokens=60)
    # more reasoning than completion tokens cannot be a part of them, whatever the total says
    more = {"prompt_tokens": 10, "completion_tokens": 20, "completion_tokens_details": {"reasoning_tokens": 60}}
    assert usage_from_openai(more) == Usage(input_tokens=10, output_tokens=80, reasoning_tokens=60)


def test_openrouter_usage_shape() -> None:
    raw = {"prompt_tokens": 1_000, "completion_tokens": 100, "total_tokens": 1_100, "cost": 0.00123,
           "is_byok": False, "prompt_tokens_details": {"cached_tokens": 600, "cache_write_tokens": 200,
                                                       "audio_tokens": 0},
           "completion_tokens_details": {"reasoning_tokens": 40, "image_tokens": 0},
           "cost_details": {"upstream_inference_cost": None}}
    assert usage_from_openai(raw) == Usage(input_tokens=1_000, output_tokens=100, cached_input_tokens=600,
                                           cache_write_tokens=200, reasoning_tokens=40)
    assert upstream_cost_nano(raw) == 1_230_000


def test_audio_and_image_parts_are_capped_by_their_wholes() -> None:
    raw = {"prompt_tokens": 100, "completion_tokens": 10,
           "prompt_tokens_details": {"audio_tokens": 500, "image_tokens": 40, "video_tokens": 7,
                                     "cached_tokens": 20, "cached_tokens_details": {"audio_tokens": 90}},
           "completion_tokens_details": {"audio_tokens": 8, "image_tokens": 8, "reasoning_tokens": 1}}
    assert usage_from_openai(raw) == Usage(
        input_tokens=100, output_tokens=10, cached_input_tokens=20, reasoning_tokens=1, audio_input_tokens=100,
        cached_audio_tokens=20, image_input_tokens=40, video_input_tokens=7, audio_output_tokens=8,
        image_output_tokens=1)


@pytest.mark.parametrize("raw", [
    {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    {"prompt_tokens": 12, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 5, "audio_tokens": 0}},
    {"prompt_tokens": 12, "completion_tokens": 9, "completion_tokens_details": {
        "reasoning_tokens": 4, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
    {"prompt_tokens": 8, "total_tokens": 8},
])
def test_the_fast_path_agrees_with_the_full_reader(raw: dict[str, Any]) -> None:
    # an unrelated extra key sends the same usage through the full reader
    assert usage_from_openai(raw) == usage_from_openai({**raw, "x_unrelated": None}) is not None


# --- the upstream's own cost and the drift counter ---------------------------------------------


@pytest.mark.parametrize(("raw", "nano"), [
    ({"cost": 0.000123}, 123_000),                                 # OpenRouter credits / litellm float, USD
    ({"cost": 1e-10}, 0), ({"cost": 5e-10}, 1),                    # rounded half-up to whole nano-USD
    ({"_upstream_cost": 0.5, "cost": 0.1}, 500_000_000),           # what the litellm provider parked first
    ({"cost": {"total_cost": 0.0042, "input_tokens_cost": 0.001}}, 4_200_000),   # Perplexity's breakdown
    ({"cost_in_usd_ticks": 12_345}, 1_235),                        # xAI: 1e-10 USD per tick, half-up
    ({"cost": 0.002, "is_byok": True, "cost_details": {"upstream_inference_cost": 0.04}}, 40_000_000),
    ({"cost": 0.002, "is_byok": True, "cost_details": {}}, 2_000_000),
    ({"cost": -1}, None), ({"cost": "free"}, None), ({"cost": True}, None), ({"cost": float("nan")}, None),
    ({"cost_in_usd_ticks": -3}, None), ({"prompt_tokens": 3}, None), (None, None), ("cost", None),
])
def test_upstream_cost_nano(raw: Any, nano: int | None) -> None:
    assert upstream_cost_nano(raw) == nano


def test_cost_drift_counter() -> None:
    m = Metrics()
    m.set_known_models(["gpt-5.4"])
    assert m.cost_drift("openrouter", "gpt-5.4", 1_000, None) == 0
    assert m.cost_drift("openrouter", "gpt-5.4", 1_000, 1_000) == 0
    assert b"gateway_cost_drift_usd_total{" not in m.render()      # no series until a drift happens
    assert m.cost_drift("openrouter", "gpt-5.4", 1_000, 16_000) == 15_000
    assert m.cost_drift("openrouter", "gpt-5.4", 26_000, 1_000) == 25_000
    assert m.cost_drift("openrouter", "unknown-model", 0, 7) == 7
    text = m.render().decode()
    assert 'gateway_cost_drift_usd_total{model="gpt-5.4",provider="openrouter"} 4e-05' in text
    assert 'gateway_cost_drift_usd_total{model="other",provider="openrouter"} 7e-09' in text


def test_gateway_cost_and_upstream_cost_agree_on_a_plain_openrouter_answer() -> None:
    # The map has no openrouter/ entries; OpenRouter bills the vendor's own price, so openai/gpt-4o-mini
    # on openrouter is priced as gpt-4o-mini: input 1.5e-07, output 6e-07 USD/token;
    # 1_000 × 150_000 + 100 × 600_000 = 150_000_000 + 60_000_000 = 210_000_000 pico = 210_000 nano,
    # which is what OpenRouter reports as cost 0.00021.
    price = PriceBook.bundled().lookup("openrouter", "openai/gpt-4o-mini")
    raw = {"prompt_tokens": 1_000, "completion_tokens": 100, "total_tokens": 1_100, "cost": 0.00021}
    usage = usage_from_openai(raw)
    assert price is not None and usage is not None
    assert cost_nano(usage, price) == upstream_cost_nano(raw) == 210_000


# --- litellm's usage.cost never reaches clients ----------------------------------------------------

OPENROUTER_COST = 0.000321


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        usage = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13, "cost": OPENROUTER_COST}
        base = {"id": "gen-1", "created": 1, "model": "openai/gpt-4o-mini", "provider": "OpenAI"}
        if not body.get("stream"):
            payload = {**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi there"}}]}
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [
            {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"},
                                   "finish_reason": None}]},
            {**chunk, "choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"}]},
            {**chunk, "choices": [], "usage": usage},
        ]
        for event in events:
            self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


@pytest.fixture
def openrouter_mock() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api/v1"
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def openrouter(tmp_path: Path, openrouter_mock: str, monkeypatch: pytest.MonkeyPatch) -> Deployment:
    monkeypatch.setenv("GATEWAY_TEST_OPENROUTER_KEY", "sk-or-test")
    (tmp_path / "models.yaml").write_text(textwrap.dedent(f"""\
        models:
          mini:
            deployments:
              - provider: openrouter
                model: openai/gpt-4o-mini
                api_base: {openrouter_mock}
                api_key_env: GATEWAY_TEST_OPENROUTER_KEY
        """))
    spec = load_policies(str(tmp_path)).model("mini")
    assert spec is not None
    return spec.deployments[0]


@pytest.mark.e2e
async def test_litellm_cost_is_moved_out_of_the_clients_usage(openrouter: Deployment) -> None:
    provider = LiteLLMProvider()
    body = {"messages": [{"role": "user", "content": "hi"}]}
    try:
        answer = await provider.complete(Call("chat", dict(body), openrouter, 10.0))
        chunks = [c async for c in provider.stream(Call("chat", {**body, "stream": True}, openrouter, 10.0))]
    finally:
        await provider.aclose()
    expected_nano = 321_000          # 0.000321 USD
    assert answer["usage"]["prompt_tokens"] == 11
    assert "cost" not in answer["usage"] and upstream_cost_nano(answer["usage"]) == expected_nano
    usage_chunks = [c for c in chunks if c.get("usage")]
    assert usage_chunks, chunks
    final = usage_chunks[-1]["usage"]
    assert final["completion_tokens"] == 2
    assert "cost" not in final and upstream_cost_nano(final) == expected_nano
    assert all("cost" not in (c.get("usage") or {}) for c in chunks)


def test_uncached_keeps_every_kind_of_token() -> None:
    usage = Usage(input_tokens=1_000, output_tokens=50, cached_input_tokens=600, cache_write_tokens=100,
                  cache_write_1h_tokens=50, reasoning_tokens=20, audio_input_tokens=400, cached_audio_tokens=300,
                  image_input_tokens=100, cached_image_tokens=80, audio_output_tokens=10, citation_tokens=7)
    plain = Usage(input_tokens=1_000, output_tokens=50, reasoning_tokens=20, audio_input_tokens=400,
                  image_input_tokens=100, audio_output_tokens=10, citation_tokens=7)
    assert usage.uncached() == plain
    assert usage.uncached(1_200).input_tokens == 1_200 and usage.uncached(1_200).uncached_input_tokens == 1_200
