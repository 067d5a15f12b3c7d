"""OpenAI's Responses API through the gateway, with the official ``openai`` SDK.

The app runs in process (httpx's ASGI transport); upstreams are (a) the loopback mock Responses
API (``tests/mock_responses.py``) behind a deployment that speaks Responses natively and (b) the
simulated model behind translation to chat. Checked: pass-through of fields and events, cost to the
nano-dollar (header, ``usage.cost_usd`` in the Response and in the final ``response.completed``,
the ledger), a three-turn ``previous_response_id`` chain on both paths, ``store: false``,
retrieve / input_items / delete, another team's id refused, dropped features named.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from mock_responses import MockResponses, mock_responses, mock_responses_server  # noqa: F401

from gateway.state.responses_store import MemoryResponsesStore
from inprocess import Gateway, in_process

# pico-USD per token: $2 in, $8 out, $0.5 cached in
IN, OUT, CACHED = 2_000_000, 8_000_000, 500_000
POLICY = """\
models:
  gpt-native:
    deployments:
      - provider: openai
        name: responses-mock
        model: gpt-mock
        api_base: {mock}/v1
        api_key_env: TEST_OPENAI_UPSTREAM_KEY
        price: {{input_per_mtok: 2, output_per_mtok: 8, cache_read_per_mtok: 0.5}}
  local:
    deployments:
      - provider: simulated
        name: local-sim
        price: {{input_per_mtok: 1, output_per_mtok: 2}}
        simulated: {{output_tokens: 6}}
teams:
  alpha:
    budgets: [{{period: daily, usd: 10}}]
  beta: {{}}
"""


class Gw(Gateway):
    def client(self, key: str) -> openai.AsyncOpenAI:
        return self.sdk_client(openai.AsyncOpenAI, httpx, key, "http://gateway/v1")


@pytest.fixture
async def gw(tmp_path: Path, mock_responses: MockResponses,  # noqa: F811
             monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gw]:
    monkeypatch.setenv("TEST_OPENAI_UPSTREAM_KEY", "sk-upstream-secret")
    async with in_process(tmp_path, POLICY.format(mock=mock_responses.url)) as gateway:
        yield Gw(gateway.app, gateway)


def nano_of(pico: int) -> int:
    return (pico + 500) // 1000


async def test_native_json_passes_fields_and_prices_cached_and_reasoning(
        gw: Gw, mock_responses: MockResponses) -> None:  # noqa: F811
    mock_responses.set(input=1000, cached=600, output=50, reasoning=20)
    client = gw.client(await gw.key("alpha"))
    raw = await client.responses.with_raw_response.create(
        model="gpt-native", input="hi", instructions="be brief", reasoning={"effort": "low", "summary": "auto"},
        include=["reasoning.encrypted_content"], store=True, metadata={"k": "v"},
        extra_body={"future_field": 7, "prompt_cache_key": "abc"})
    response = raw.parse()
    sent = mock_responses.last
    assert sent.body["model"] == "gpt-mock" and sent.body["future_field"] == 7
    assert sent.body["include"] == ["reasoning.encrypted_content"] and sent.body["instructions"] == "be brief"
    assert sent.headers["authorization"] == "Bearer sk-upstream-secret"
    cost = nano_of(400 * IN + 600 * CACHED + 70 * OUT)   # the mock counts reasoning inside output_tokens: 50 + 20
    assert response.usage is not None and response.usage.model_extra["cost_usd"] == cost / 1e9
    assert raw.headers["x-gateway-cost-usd"] == f"{cost / 1e9:.9f}".rstrip("0")
    [record] = await gw.records()
    assert record.cost_nano == cost and record.cached_input_tokens == 600 and record.reasoning_tokens == 20


async def test_native_stream_events_pass_and_end_with_the_cost(gw: Gw, mock_responses: MockResponses  # noqa: F811
                                                               ) -> None:
    mock_responses.set(input=30, output=8)
    client = gw.client(await gw.key("alpha"))
    kinds: list[str] = []
    final: Any = None
    async with client.responses.stream(model="gpt-native", input="hi") as stream:
        async for event in stream:
            kinds.append(event.type)
            if event.type == "response.completed":
                final = event.response
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    cost = nano_of(30 * IN + 8 * OUT)
    assert final.usage.model_extra["cost_usd"] == cost / 1e9
    [record] = await gw.records()
    assert record.cost_nano == cost and record.stream


@pytest.mark.parametrize("model", ["gpt-native", "local"])
async def test_three_turn_chain_store_and_retrieve(gw: Gw, model: str) -> None:
    client = gw.client(await gw.key("alpha"))
    first = await client.responses.create(model=model, input="turn one")
    second = await client.responses.create(model=model, input="turn two", previous_response_id=first.id)
    third = await client.responses.create(model=model, input="turn three", previous_response_id=second.id)
    assert third.output_text
    got = await client.responses.retrieve(third.id)
    assert got.id == third.id
    items = await client.responses.input_items.list(third.id, order="asc")
    texts = [part.text for item in items.data if getattr(item, "content", None) for part in item.content
             if hasattr(part, "text")]
    assert texts[0] == "turn one" and texts[-1] == "turn three"
    other = gw.client(await gw.key("beta"))
    with pytest.raises(openai.NotFoundError):
        await other.responses.retrieve(third.id)
    with pytest.raises(openai.BadRequestError):
        await other.responses.create(model=model, input="hijack", previous_response_id=third.id)
    await client.responses.delete(third.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(third.id)
    records = await gw.records()
    assert [r.team for r in records].count("alpha") == 3 and all(r.cost_nano > 0 for r in records)


async def test_store_false_keeps_nothing(gw: Gw) -> None:
    client = gw.client(await gw.key("alpha"))
    response = await client.responses.create(model="local", input="secret", store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)


async def test_translated_stream_and_dropped_features(gw: Gw) -> None:
    client = gw.client(await gw.key("alpha"))
    raw = await client.responses.with_raw_response.create(
        model="local", input="hello", tools=[{"type": "web_search"}], reasoning={"summary": "auto"})
    assert "web_search" in raw.headers["x-gateway-dropped"]
    final: Any = None
    async with client.responses.stream(model="local", input="hello") as stream:
        async for event in stream:
            if event.type == "response.completed":
                final = event.response
    records = await gw.records()
    assert final is not None and final.usage.output_tokens == 6
    assert final.usage.model_extra["cost_usd"] == records[-1].cost_nano / 1e9 > 0


async def test_a_translated_stream_is_stored_for_retrieval_and_later_turns(gw: Gw) -> None:
    client = gw.client(await gw.key("alpha"))
    async with client.responses.stream(model="local", input="first streamed turn") as stream:
        first = await stream.get_final_response()
    got = await client.responses.retrieve(first.id)       # kept before the stream's last event went out
    assert got.id == first.id and got.output_text == first.output_text and got.status == "completed"
    follow = await client.responses.create(model="local", input="second turn", previous_response_id=first.id)
    items = await client.responses.input_items.list(follow.id, order="asc")
    assert [item.role for item in items.data] == ["user", "assistant", "user"]
    [record, _] = await gw.records()
    assert got.usage is not None and got.usage.model_extra["cost_usd"] == record.cost_nano / 1e9


async def test_a_response_is_kept_after_the_reply_and_found_right_after_it(gw: Gw) -> None:
    key = await gw.key("alpha")
    status, raw = await gw.post(key, {"model": "local", "input": "keep me"}, path="/v1/responses")
    response_id = orjson.loads(raw)["id"]
    store = gw.app.state.responses.store
    assert status == 200 and isinstance(store, MemoryResponsesStore)
    assert response_id in store._pending            # the reply went out before the record was built
    got = await gw.client(key).responses.retrieve(response_id)     # the very next request finds it
    assert got.id == response_id and got.output_text == orjson.loads(raw)["output"][0]["content"][0]["text"]
    assert not store._pending and len(store) == 1
