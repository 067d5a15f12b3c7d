"""The response cache and context compression on OpenAI's Responses API, with the official ``openai`` SDK.

The app runs in process (httpx's ASGI transport); upstreams are the loopback mock Responses API
(``tests/mock_responses.py``) behind a deployment that speaks Responses natively, and the simulated
model behind translation to chat. Checked for the cache: a deterministic request misses, then hits
without reaching the upstream, JSON and streamed (the hit replayed as a Responses event stream the
SDK accumulates), under a fresh response id that ``GET /v1/responses/{id}`` finds (and a later
turn continues, with the history inlined, since no deployment holds that id), ``store: false``
honoured on a hit; a ``previous_response_id`` request keyed on the conversation, not the id; the
hit at $0 with its saving to the nano-dollar in the ledger.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from mock_responses import MockResponses, mock_responses, mock_responses_server  # noqa: F401

from inprocess import Gateway, in_process

# pico-USD per token: $2 in, $8 out, $0.5 cached in (gpt-native); $1 in, $2 out (local)
IN, OUT, CACHED = 2_000_000, 8_000_000, 500_000
LOCAL_IN, LOCAL_OUT = 1_000_000, 2_000_000
POLICY = """\
models:
  gpt-native:
    deployments:
      - provider: openai
        name: responses-mock
        model: gpt-mock
        api_base: {mock}/v1
        api_key_env: TEST_OPENAI_UPSTREAM_KEY
        apis: [chat, responses]
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


async def streamed(client: openai.AsyncOpenAI, **kw: Any) -> tuple[list[str], Any]:
    """(event types, the final Response) of one ``responses.stream``."""
    kinds: list[str] = []
    async with client.responses.stream(**kw) as stream:
        async for event in stream:
            kinds.append(event.type)
        final = await stream.get_final_response()
    return kinds, final


async def test_native_json_miss_then_hit_at_zero_with_the_saving(gw: Gw, mock_responses: MockResponses  # noqa: F811
                                                                 ) -> None:
    mock_responses.set(input=1000, cached=600, output=50, reasoning=20)
    client = gw.client(await gw.key("alpha"))
    kw: dict[str, Any] = {"model": "gpt-native", "input": "what is 2+2?", "instructions": "be brief",
                          "temperature": 0}
    miss = await client.responses.with_raw_response.create(**kw)
    hit = await client.responses.with_raw_response.create(**kw)
    first, second = miss.parse(), hit.parse()
    assert len(mock_responses.requests) == 1                      # the hit never reached the upstream
    assert miss.headers["x-gateway-cache"] == "miss" and hit.headers["x-gateway-cache"] == "hit"
    assert hit.headers["x-gateway-cost-usd"] == "0" and second.usage is not None
    assert second.usage.model_extra["cost_usd"] == 0 and second.usage.input_tokens == 1000
    assert second.id != first.id and second.id.startswith("resp_") and second.output_text == first.output_text
    miss_record, hit_record = await gw.records()
    assert miss_record.cost_nano == nano_of(400 * IN + 600 * CACHED + 70 * OUT) and miss_record.cache == "miss"
    uncached = nano_of(1000 * IN + 70 * OUT)     # a hit saves what the answer costs with no prompt caching
    assert (hit_record.cost_nano, hit_record.baseline_nano, hit_record.savings) == (0, uncached, {"cache": uncached})
    assert hit_record.cache == "hit" and hit_record.endpoint == "responses"
    assert gw.settles[hit_record.request_id] == 0 and await gw.reserved("alpha") == 0   # a hit holds nothing

    got = await client.responses.retrieve(second.id)             # stored under its fresh id
    assert got.id == second.id and got.output_text == first.output_text
    follow = await client.responses.create(model="gpt-native", input="and 3+3?", previous_response_id=second.id)
    sent = mock_responses.last.body                              # no deployment holds the hit's id: inlined
    assert "previous_response_id" not in sent and follow.output_text
    assert [i.get("role") for i in sent["input"]] == ["user", "assistant", "user"]


async def test_a_hit_keeps_its_own_store_setting(gw: Gw, mock_responses: MockResponses) -> None:  # noqa: F811
    client = gw.client(await gw.key("alpha"))
    kw: dict[str, Any] = {"model": "gpt-native", "input": "store me not", "temperature": 0}
    await client.responses.create(**kw)
    hit = await client.responses.with_raw_response.create(**kw, store=False)
    assert hit.headers["x-gateway-cache"] == "hit" and hit.parse().store is False
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(hit.parse().id)
    other = gw.client(await gw.key("beta"))                      # never across teams
    assert (await other.responses.with_raw_response.create(**kw)).headers["x-gateway-cache"] == "miss"
    assert len(mock_responses.requests) == 2


async def test_native_stream_miss_then_streamed_and_json_hits(gw: Gw, mock_responses: MockResponses  # noqa: F811
                                                              ) -> None:
    mock_responses.set(input=30, output=8)
    client = gw.client(await gw.key("alpha"))
    kw: dict[str, Any] = {"model": "gpt-native", "input": "stream it", "temperature": 0}
    kinds, first = await streamed(client, **kw)
    assert kinds[-1] == "response.completed"
    kinds, second = await streamed(client, **kw)
    assert len(mock_responses.requests) == 1
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 1 and "response.output_item.done" in kinds
    assert second.id != first.id and second.output_text == first.output_text == "Hello from the mock Responses API."
    assert second.usage.model_extra["cost_usd"] == 0 and second.usage.output_tokens == 8
    json_hit = await client.responses.with_raw_response.create(**kw)   # a stored stream answers JSON too
    assert json_hit.headers["x-gateway-cache"] == "hit" and json_hit.parse().output_text == first.output_text
    records = await gw.records()
    cost = nano_of(30 * IN + 8 * OUT)
    assert [(r.cache, r.cost_nano, r.savings, r.stream) for r in records] == [
        ("miss", cost, {}, True), ("hit", 0, {"cache": cost}, True), ("hit", 0, {"cache": cost}, False)]
    assert (await client.responses.retrieve(second.id)).output_text == first.output_text


async def test_a_hit_replays_function_calls_and_reasoning_as_events(gw: Gw, mock_responses: MockResponses  # noqa: F811
                                                                    ) -> None:
    client = gw.client(await gw.key("alpha"))
    tool = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}}}
    kw: dict[str, Any] = {"model": "gpt-native", "input": "weather?", "temperature": 0, "tools": [tool],
                          "reasoning": {"summary": "auto"}}
    _, first = await streamed(client, **kw)
    kinds, second = await streamed(client, **kw)
    assert len(mock_responses.requests) == 1
    assert [item.type for item in second.output] == [item.type for item in first.output] == ["reasoning",
                                                                                             "function_call"]
    assert second.output[1].arguments == first.output[1].arguments == '{"city": "mock"}'
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds


async def test_translated_stream_is_stored_and_cached(gw: Gw) -> None:
    client = gw.client(await gw.key("alpha"))
    kw: dict[str, Any] = {"model": "local", "input": "translate me", "temperature": 0}
    _, first = await streamed(client, **kw)
    assert (await client.responses.retrieve(first.id)).output_text == first.output_text   # was never stored
    _, second = await streamed(client, **kw)
    miss, hit = await gw.records()
    assert (miss.cache, hit.cache) == ("miss", "hit") and second.output_text == first.output_text
    cost = nano_of(miss.input_tokens * LOCAL_IN + 6 * LOCAL_OUT)
    assert miss.cost_nano == cost and (hit.cost_nano, hit.savings) == (0, {"cache": cost})
    assert second.usage.model_extra["cost_usd"] == 0 and second.usage.output_tokens == 6


async def test_previous_response_id_keys_on_the_conversation(gw: Gw, mock_responses: MockResponses  # noqa: F811
                                                             ) -> None:
    client = gw.client(await gw.key("alpha"))
    one = await client.responses.create(model="gpt-native", input="start", temperature=0, store=True)
    mock_responses.set(text="A different first answer.")
    two = await client.responses.create(model="gpt-native", input="begin", temperature=0)
    mock_responses.set(text="Hello from the mock Responses API.")
    follow = {"model": "gpt-native", "input": "go on", "temperature": 0}
    a = await client.responses.with_raw_response.create(**follow, previous_response_id=one.id)
    b = await client.responses.with_raw_response.create(**follow, previous_response_id=two.id)
    assert (a.headers["x-gateway-cache"], b.headers["x-gateway-cache"]) == ("miss", "miss")   # other histories
    # the same conversation under another id (a cached first turn): the same key
    again = await client.responses.create(model="gpt-native", input="start", temperature=0)
    assert again.id != one.id
    c = await client.responses.with_raw_response.create(**follow, previous_response_id=again.id)
    assert c.headers["x-gateway-cache"] == "hit" and c.parse().previous_response_id == again.id
    assert c.parse().output_text == a.parse().output_text and len(mock_responses.requests) == 4
