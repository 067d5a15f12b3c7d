"""Anthropic's Messages API through the gateway, with the official ``anthropic`` SDK.

The app runs in process (httpx's ASGI transport); upstreams are (a) the loopback mock Messages
API (``tests/mock_anthropic.py``) behind a deployment that speaks Messages natively, and (b)
the simulated model behind translation to chat. Checked: the body and headers the upstream
gets, every event passing through, the cost to the nano-dollar (JSON header, ``usage.cost_usd``
in the reply and in the final ``message_delta``, the ledger), errors raising the SDK's own
exception classes, ``count_tokens`` both ways, and the dropped-features header.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

try:     # the SDK's own HTTP package: httpx2 from anthropic 2.x, httpx before
    import httpx2 as sdk_http  # type: ignore[import-not-found]
except ImportError:
    import httpx as sdk_http

from mock_anthropic import MockAnthropic, mock_anthropic, mock_anthropic_server  # noqa: F401

from inprocess import Gateway, in_process

# pico-USD per token: $3 in, $15 out, $0.30 cache read, $3.75 5-minute write, $6 1-hour write per Mtok
IN, OUT, READ, WRITE, WRITE_1H = 3_000_000, 15_000_000, 300_000, 3_750_000, 6_000_000
POLICY = """\
models:
  claude-sonnet:
    deployments:
      - provider: anthropic
        name: anthropic-mock
        model: claude-sonnet-4-5
        api_base: {mock}
        api_key_env: TEST_ANTHROPIC_UPSTREAM_KEY
        price: {{input_per_mtok: 3, output_per_mtok: 15, cache_read_per_mtok: 0.3, cache_write_per_mtok: 3.75,
                cache_write_1h_per_mtok: 6}}
  local:
    deployments:
      - provider: simulated
        name: local-sim
        price: {{input_per_mtok: 1, output_per_mtok: 2}}
        simulated: {{output_tokens: 6}}
teams:
  paying:
    budgets: [{{period: daily, usd: 10}}]
  broke:
    budgets: [{{period: daily, usd: 0.0000001}}]
  strict:
    strict_translation: true
"""


class Gw(Gateway):
    def client(self, key: str) -> anthropic.AsyncAnthropic:
        return self.sdk_client(anthropic.AsyncAnthropic, sdk_http, key)


@pytest.fixture
async def gw(tmp_path: Path, mock_anthropic: MockAnthropic,  # noqa: F811
             monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gw]:
    monkeypatch.setenv("TEST_ANTHROPIC_UPSTREAM_KEY", "sk-ant-upstream-secret")
    async with in_process(tmp_path, POLICY.format(mock=mock_anthropic.url)) as gateway:
        yield Gw(gateway.app, gateway)


def nano_of(pico: int) -> int:
    return (pico + 500) // 1000


async def test_native_json_keeps_every_field_and_prices_cache_tiers(gw: Gw, mock_anthropic: MockAnthropic  # noqa: F811
                                                                    ) -> None:
    mock_anthropic.set(input=25, cache_read=1000, cache_write_5m=200, cache_write_1h=100, output=7)
    client = gw.client(await gw.key("paying"))
    raw = await client.messages.with_raw_response.create(
        model="claude-sonnet", max_tokens=300, messages=[{"role": "user", "content": "hi"}],
        system=[{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        thinking={"type": "enabled", "budget_tokens": 100}, metadata={"user_id": "u-1"},
        extra_body={"context_management": {"edits": []}, "future_field": {"x": 1}},
        extra_headers={"anthropic-beta": "context-management-2025-06-27"})
    message = await raw.parse()
    sent = mock_anthropic.last
    assert sent.body["model"] == "claude-sonnet-4-5" and sent.body["future_field"] == {"x": 1}
    assert sent.body["thinking"] == {"type": "enabled", "budget_tokens": 100}
    assert sent.body["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert sent.body["context_management"] == {"edits": []} and sent.body["metadata"] == {"user_id": "u-1"}
    assert sent.headers["x-api-key"] == "sk-ant-upstream-secret"
    assert "context-management-2025-06-27" in sent.headers["anthropic-beta"]
    cost = nano_of(25 * IN + 1000 * READ + 200 * WRITE + 100 * WRITE_1H + 7 * OUT)
    assert raw.headers["x-gateway-cost-usd"] == f"{cost / 1e9:.9f}".rstrip("0")
    assert message.usage.cache_read_input_tokens == 1000 and message.usage.model_extra["cost_usd"] == cost / 1e9
    [record] = await gw.records()
    assert record.cost_nano == cost and record.input_tokens == 1325 and record.cached_input_tokens == 1000
    assert record.cache_write_tokens == 300 and record.output_tokens == 7 and record.status == "ok"


async def test_native_stream_passes_events_and_ends_with_the_cost(gw: Gw, mock_anthropic: MockAnthropic  # noqa: F811
                                                                  ) -> None:
    mock_anthropic.set(input=40, output=5, thinking="let me think")
    client = gw.client(await gw.key("paying"))
    kinds: list[str] = []
    delta_usage: dict[str, Any] = {}
    async with client.messages.stream(model="claude-sonnet", max_tokens=64,
                                      messages=[{"role": "user", "content": "hi"}]) as stream:
        async for event in stream:
            kinds.append(event.type)
            if event.type == "message_delta":
                delta_usage = event.usage.model_dump()
        final = await stream.get_final_message()
    assert final.content[0].type == "thinking" and final.content[0].signature
    assert final.content[-1].text == "Hello from the mock Anthropic API."
    assert "message_start" in kinds and "message_stop" in kinds and "content_block_delta" in kinds
    cost = nano_of(40 * IN + 5 * OUT)
    assert delta_usage["cost_usd"] == cost / 1e9 and kinds[-1] == "message_stop"
    [record] = await gw.records()
    assert record.cost_nano == cost and record.stream and record.status == "ok"


async def test_translated_to_a_chat_deployment(gw: Gw) -> None:
    client = gw.client(await gw.key("paying"))
    raw = await client.messages.with_raw_response.create(
        model="local", max_tokens=50, messages=[{"role": "user", "content": "hello"}],
        thinking={"type": "adaptive"}, extra_body={"context_management": {"edits": []}})
    message = await raw.parse()
    assert message.type == "message" and message.content[0].type == "text" and message.stop_reason
    assert "thinking" in raw.headers["x-gateway-dropped"]
    [record] = await gw.records()
    assert record.output_tokens == 6 and record.cost_nano == nano_of(record.input_tokens * 1_000_000 + 6 * 2_000_000)
    assert message.usage.model_extra["cost_usd"] == record.cost_nano / 1e9
    delta_usage: dict[str, Any] = {}
    async with client.messages.stream(model="local", max_tokens=50,
                                      messages=[{"role": "user", "content": "hello"}]) as stream:
        async for event in stream:
            if event.type == "message_delta":
                delta_usage = event.usage.model_dump()
        final = await stream.get_final_message()
    assert final.content[0].text.strip() and final.usage.output_tokens == 6
    records = await gw.records()
    assert len(records) == 2 and delta_usage["cost_usd"] == records[1].cost_nano / 1e9


async def test_errors_raise_the_sdks_own_exceptions(gw: Gw) -> None:
    client = gw.client(await gw.key("paying"))      # a key exists: no first-run mode
    with pytest.raises(anthropic.AuthenticationError):
        await gw.client("sk-wrong").messages.create(model="local", max_tokens=5,
                                                   messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError) as bad:
        await client.messages.create(model="local", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert bad.value.body["type"] == "error"     # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    broke = gw.client(await gw.key("broke"))
    with pytest.raises(anthropic.RateLimitError) as refused:
        await broke.messages.create(model="local", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert "budget" in str(refused.value)


async def test_count_tokens_upstream_and_estimated(gw: Gw, mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    mock_anthropic.set(input=4321)
    client = gw.client(await gw.key("paying"))
    counted = await client.messages.count_tokens(model="claude-sonnet",
                                                 messages=[{"role": "user", "content": "hi"}])
    assert counted.input_tokens == 4321 and mock_anthropic.last.path.endswith("/count_tokens")
    estimated = await client.messages.count_tokens(model="local",
                                                   messages=[{"role": "user", "content": "hello there"}])
    assert 0 < estimated.input_tokens < 50
    assert await gw.records() == []          # never charged


async def test_a_bill_beyond_the_hold_is_charged_in_full_and_counted(
        gw: Gw, mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    """The upstream reports far more prompt tokens than the gateway estimated (issue 11, item 6)."""
    mock_anthropic.set(input=200_000, output=5)
    client = gw.client(await gw.key("paying"))
    await client.messages.create(model="claude-sonnet", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    cost = nano_of(200_000 * IN + 5 * OUT)
    [record] = await gw.records()
    assert record.cost_nano == cost
    metrics = gw.app.state.metrics.render().decode()
    [line] = [m for m in metrics.splitlines() if m.startswith('gateway_budget_overrun_usd_total{team="paying"}')]
    overrun = round(float(line.rsplit(" ", 1)[1]) * 1e9)
    assert 0 < overrun < cost          # the part of the cost the hold did not cover


async def test_an_absurd_upstream_usage_never_locks_the_budget(gw: Gw, mock_anthropic: MockAnthropic  # noqa: F811
                                                                ) -> None:
    """An upstream reporting 10^18 prompt tokens (issue 11, item 1): the settle cannot raise, the hold is gone."""
    mock_anthropic.set(input=10**18, output=5)
    client = gw.client(await gw.key("paying"))
    await client.messages.create(model="claude-sonnet", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    [record] = await gw.records()
    assert record.status == "ok" and record.cost_nano > 0
    assert await gw.reserved("paying") == 0
    mock_anthropic.set(input=10, output=5)
    with pytest.raises(anthropic.RateLimitError):       # the team's budget is spent (the bill was charged)
        await client.messages.create(model="claude-sonnet", max_tokens=10,
                                     messages=[{"role": "user", "content": "hi"}])


async def test_strict_translation_refuses_what_translation_would_drop(gw: Gw) -> None:
    client = gw.client(await gw.key("strict"))
    with pytest.raises(anthropic.BadRequestError) as refused:
        await client.messages.create(model="local", max_tokens=50, messages=[{"role": "user", "content": "hi"}],
                                     thinking={"type": "adaptive"})
    assert "thinking" in str(refused.value) and "strict_translation" in str(refused.value)
    plain = await client.messages.create(model="local", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    assert plain.content[0].text                     # nothing to drop: translated as usual
    [refusal, ok] = await gw.records()
    assert refusal.status == "unsupported_feature" and refusal.cost_nano == 0 and ok.status == "ok"
