"""The response cache and context compression on OpenAI's Responses API, with the official ``openai`` SDK.

The app runs in process (httpx's ASGI transport); upstreams are the loopback mock Responses API
(``tests/mock_responses.py``) behind a deployment that speaks Responses natively, and the simulated
model behind translation to chat. Checked for the cache: a deterministic request misses, then hits
without reaching the upstream, JSON and streamed (the hit replayed as a Responses event stream the
SDK accumulates), under a fresh response id that ``GET /v1/responses/{id}`` finds (and a later
turn continues, with the history inlined, since no deployment holds that id), ``store: false``
honoured on a hit; a ``previous_response_id`` request keyed on the conversation, not the id; the
hit at $0 with its saving to the nano-dollar in the ledger. For compression: a long conversation
(input items, or the history a ``previous_response_id`` rebuilds) reaches a native deployment as
valid, compressed input items (instructions kept, a function call with its output, reasoning items
whole), and a translated one as compressed chat; the saving and the summary call's cost exact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from mock_responses import MockResponses, mock_responses, mock_responses_server  # noqa: F401

from gateway.api.responses.compressed import compressed_input
from gateway.api.responses.to_chat import message_origins, responses_to_chat
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


# ---- compression of native Responses input items ------------------------------------------------------

COMPRESSING = POLICY + """\
  gamma: {{}}
compression:
  enabled: true
  trigger_tokens: 300
  strategies: [clear_tool_outputs, drop_middle]
  keep_tool_outputs: 1
  keep_first_turns: 1
  keep_last_turns: 1
  teams:
    gamma: {{strategies: [summarize], summary_model: local, keep_first_turns: 0}}
"""


@pytest.fixture
async def squeezing(tmp_path: Path, mock_responses: MockResponses,  # noqa: F811
                    monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gw]:
    monkeypatch.setenv("TEST_OPENAI_UPSTREAM_KEY", "sk-upstream-secret")
    async with in_process(tmp_path, COMPRESSING.format(mock=mock_responses.url)) as gateway:
        yield Gw(gateway.app, gateway)


def words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def user(text: str, item_id: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    return {**item, "id": item_id} if item_id else item


def assistant(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}


def reasoning(item_id: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "encrypted_content": "gAAAA" + item_id * 8}


def call(call_id: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": "lookup", "arguments": '{"q": "x"}'}


def output(call_id: str, text: str) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": text}


def pairs_intact(items: list[dict[str, Any]]) -> bool:
    calls = [i["call_id"] for i in items if i.get("type") == "function_call"]
    outputs = [i["call_id"] for i in items if i.get("type") == "function_call_output"]
    return calls == outputs


async def test_native_items_compressed_whole_and_paired_with_exact_savings(
        squeezing: Gw, mock_responses: MockResponses) -> None:  # noqa: F811
    mock_responses.set(input=150, output=9)
    first_turn = [user("look it up", "msg_client_1"), reasoning("rs_1"), call("call_1"),
                  output("call_1", words(400, "old")), assistant("found it")]
    middle_turn = [user(words(150, "mid")), reasoning("rs_2"), call("call_2"), output("call_2", words(50, "res")),
                   assistant(words(100, "said"))]
    last_turn = [user("and now?", "msg_client_3")]
    client = squeezing.client(await squeezing.key("alpha"))
    raw = await client.responses.with_raw_response.create(
        model="gpt-native", instructions="You are terse.", input=[*first_turn, *middle_turn, *last_turn],
        tools=[{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}],
        include=["reasoning.encrypted_content"], store=False)
    sent = mock_responses.last.body
    assert sent["instructions"] == "You are terse." and sent["include"] == ["reasoning.encrypted_content"]
    # clear_tool_outputs cleared call_1's old output (call_2's is the last one kept), then drop_middle
    # dropped the middle turn whole: its reasoning item, its call and output with it
    kept, cleared = sent["input"][:3] + sent["input"][4:], sent["input"][3]
    assert kept == [*first_turn[:3], first_turn[4], *last_turn]
    assert cleared["type"] == "function_call_output" and cleared["call_id"] == "call_1"
    assert cleared["output"].startswith("[tool output removed by the gateway to save context:")
    assert pairs_intact(sent["input"]) and sent["input"][1]["encrypted_content"] == "gAAAA" + "rs_1" * 8
    before, after = map(int, raw.headers["x-gateway-compression"].split("->"))
    assert before > 300 >= after
    [record] = await squeezing.records()
    cost = nano_of(150 * IN + 9 * OUT)
    assert record.compressed and record.compression_saved_tokens == before - after
    assert record.cost_nano == cost and raw.parse().usage.model_extra["cost_usd"] == cost / 1e9
    saved = nano_of((150 + before - after) * IN + 9 * OUT) - cost     # the removed tokens at the input price
    assert record.savings == {"compression": saved} and record.baseline_nano == cost + saved


async def test_rebuilt_history_summarised_for_a_native_deployment_with_the_summary_paid(
        squeezing: Gw, mock_responses: MockResponses) -> None:  # noqa: F811
    mock_responses.set(input=120, output=6)
    client = squeezing.client(await squeezing.key("gamma"))
    first = await client.responses.create(model="gpt-native", input=words(120, "a"), instructions="Be exact.")
    second = await client.responses.create(model="gpt-native", input="ok", previous_response_id=first.id)
    assert mock_responses.last.body["previous_response_id"] == first.id     # affinity: forwarded as it is
    raw = await client.responses.with_raw_response.create(
        model="gpt-native", input=words(120, "c"), previous_response_id=second.id, instructions="Be exact.")
    sent = mock_responses.last.body
    assert "previous_response_id" not in sent and sent["instructions"] == "Be exact."     # inlined, compressed
    summary, ack, last = sent["input"]
    assert summary["role"] == "user" and summary["content"].startswith("[Summary of the earlier conversation")
    assert ack == {"type": "message", "role": "assistant", "content": "Understood; continuing from that summary."}
    assert last == user(words(120, "c"))
    records = await squeezing.records()
    summary_call = next(r for r in records if r.route == "compression_summary")
    main = records[-1]
    assert summary_call.team == main.team == "gamma" and summary_call.model == "local"
    summary_cost = nano_of(summary_call.input_tokens * LOCAL_IN + 6 * LOCAL_OUT)
    assert (summary_call.cost_nano, summary_call.baseline_nano, summary_call.savings) == (
        summary_cost, 0, {"compression": -summary_cost})
    before, after = map(int, raw.headers["x-gateway-compression"].split("->"))
    cost = nano_of(120 * IN + 6 * OUT)
    assert main.cost_nano == cost and main.compression_saved_tokens == before - after > 0
    assert main.savings == {"compression": nano_of((120 + before - after) * IN + 6 * OUT) - cost}
    stored = await client.responses.input_items.list(raw.parse().id, order="asc", limit=10)
    assert len(stored.data) == 5      # the stored conversation is the whole one, not the compressed one


async def test_translated_responses_request_compressed_with_exact_savings(squeezing: Gw) -> None:
    client = squeezing.client(await squeezing.key("alpha"))
    raw = await client.responses.with_raw_response.create(model="local", input=[
        user("first"), assistant("ok"), user(words(200, "m")), assistant(words(150, "n")), user("last")])
    before, after = map(int, raw.headers["x-gateway-compression"].split("->"))
    [record] = await squeezing.records()
    cost = nano_of(record.input_tokens * LOCAL_IN + 6 * LOCAL_OUT)
    assert record.cost_nano == cost and record.compression_saved_tokens == before - after > 0
    assert record.savings == {"compression": nano_of((record.input_tokens + before - after) * LOCAL_IN
                                                     + 6 * LOCAL_OUT) - cost}


def test_compressed_input_maps_kept_messages_to_whole_items() -> None:
    items = [user("q1"), reasoning("rs_a"), {"type": "message", "role": "assistant", "content": "calling"},
             call("c1"), call("c2"), output("c1", "one"), output("c2", "two"), reasoning("rs_b"),
             user("q2"), {"type": "web_search_call", "id": "ws_1", "status": "completed"}, assistant("a2"),
             user("q3")]
    body = {"model": "m", "instructions": "sys", "input": items}
    chat, _ = responses_to_chat(body)
    assert message_origins(body) == [[], [0], [1, 2, 3, 4], [5], [6, 7], [8], [9, 10], [11]]
    messages = chat["messages"]
    cleared = {**messages[3], "content": "[removed]"}
    kept = [messages[0], messages[1], messages[2], cleared, messages[4], messages[7]]   # the second turn dropped
    assert compressed_input(body, None, messages, kept) == [
        items[0], items[1], items[2], items[3], items[4], {**items[5], "output": "[removed]"}, items[6], items[7],
        items[11]]
