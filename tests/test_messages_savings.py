"""Prompt caching and compression of native Messages API bodies (issue 12), in process.

Prompt caching: with the policy on, a Messages body sent natively gets ``cache_control`` breakpoints
where the chat path puts them (end of the conversation, system, tools, long early messages; at most
four, never on a thinking block), and a body whose client placed any breakpoint goes out exactly as
sent; the upstream's cache reads and both write tiers are then priced to the nano-dollar.
Compression: a long native conversation reaches the upstream shorter but still a valid Messages body
(system, tools, ``cache_control``, thinking blocks and their signatures, images untouched; every
``tool_use`` with its ``tool_result``), the summary call is paid and recorded exactly, and the way
back from the chat shape (:func:`gateway.api.anthropic.compressed.native_messages`) is checked case
by case.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

try:     # the SDK's own HTTP package: httpx2 from anthropic 2.x, httpx before
    import httpx2 as sdk_http  # type: ignore[import-not-found]
except ImportError:
    import httpx as sdk_http

from mock_anthropic import SIGNATURE, MockAnthropic, mock_anthropic, mock_anthropic_server  # noqa: F401

from gateway.api.anthropic.compressed import native_messages
from gateway.api.anthropic.translate import messages_to_chat
from gateway.policy import PromptCacheSettings
from gateway.savings.compression import SUMMARY_ACK, SUMMARY_HEADER
from gateway.savings.prompt_caching import native_protected
from inprocess import Gateway, in_process

# pico-USD per token: $3 in, $15 out, $0.30 cache read, $3.75 5-minute write, $6 1-hour write per Mtok
IN, OUT, READ, WRITE, WRITE_1H = 3_000_000, 15_000_000, 300_000, 3_750_000, 6_000_000
SUMMARY_IN, SUMMARY_OUT = 500_000, 1_000_000      # the summary model: $0.50 in, $1 out per Mtok
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
  summarizer:
    deployments:
      - provider: simulated
        name: summary-sim
        price: {{input_per_mtok: 0.5, output_per_mtok: 1}}
        simulated: {{output_tokens: 20}}
teams:
  cachers: {{budgets: [{{period: daily, usd: 10}}]}}
  cachers1h: {{budgets: [{{period: daily, usd: 10}}]}}
  plain: {{budgets: [{{period: daily, usd: 10}}]}}
  squeeze: {{budgets: [{{period: daily, usd: 10}}]}}
  trim: {{budgets: [{{period: daily, usd: 10}}]}}
prompt_cache:
  teams:
    cachers: {{enabled: true, min_tokens: 100}}
    cachers1h: {{enabled: true, min_tokens: 100, ttl: 1h}}
compression:
  teams:
    squeeze:
      enabled: true
      trigger_tokens: 1000
      summary_model: summarizer
      strategies: [summarize, drop_middle]
      keep_tool_outputs: 1
      keep_last_turns: 1
    trim:
      enabled: true
      trigger_tokens: 900
      strategies: [clear_tool_outputs, drop_middle]
      keep_tool_outputs: 1
      keep_last_turns: 1
"""
FIVE_MIN, ONE_HOUR = {"type": "ephemeral"}, {"type": "ephemeral", "ttl": "1h"}


class Gw(Gateway):
    def client(self, key: str) -> anthropic.AsyncAnthropic:
        return self.sdk_client(anthropic.AsyncAnthropic, sdk_http, key)


@pytest.fixture
async def gw(tmp_path: Path, mock_anthropic: MockAnthropic,  # noqa: F811
             monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gw]:
    monkeypatch.setenv("TEST_ANTHROPIC_UPSTREAM_KEY", "sk-ant-upstream-secret")
    mock_anthropic.set(tool="off")
    async with in_process(tmp_path, POLICY.format(mock=mock_anthropic.url)) as gateway:
        yield Gw(gateway.app, gateway)


def nano_of(pico: int) -> int:
    return (pico + 500) // 1000


def words(word: str, n: int) -> str:
    return " ".join([word] * n)


TOOLS = [
    {"name": "read_file", "description": "Read a file of the repository. " + words("detail", 60),
     "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}},
    {"name": "bash", "description": "Run a shell command.",
     "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}},
    {"type": "web_search_20250305", "name": "web_search", "max_uses": 2},
]
PNG_1X1 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_1X1}}


def thinking(text: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": text, "signature": SIGNATURE}


def conversation() -> list[dict[str, Any]]:
    """An agent's conversation: tool calls with thinking, results split across turns, an image."""
    return [
        {"role": "user", "content": [{"type": "text", "text": "Fix the failing test."}, IMAGE]},
        {"role": "assistant", "content": [thinking("Look at the test first."), {"type": "text", "text": "Reading."},
                                          {"type": "tool_use", "id": "t1", "name": "read_file",
                                           "input": {"path": "tests/test_x.py"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": words("file", 300)}]},
        {"role": "assistant", "content": [thinking("Run it."), {"type": "tool_use", "id": "t2", "name": "bash",
                                                                 "input": {"command": "pytest"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t2",
                                      "content": [{"type": "text", "text": words("log", 300)}]},
                                     {"type": "text", "text": "Also check the docs. " + words("docs", 100)}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Checked. " + words("done", 150)}]},
        {"role": "user", "content": "What next? " + words("context", 150)},
        {"role": "assistant", "content": [thinking("One more file."),
                                          {"type": "tool_use", "id": "t3", "name": "read_file",
                                           "input": {"path": "src/x.py"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t3", "content": "x = 1"},
                                     {"type": "text", "text": "Please finish.", "cache_control": FIVE_MIN}]},
    ]


SYSTEM = [{"type": "text", "text": "You are a coding agent. " + words("rule", 60)},
          {"type": "text", "text": "Project notes. " + words("note", 60), "cache_control": FIVE_MIN}]


def pairs_intact(messages: list[dict[str, Any]]) -> bool:
    """Roles alternate from a user turn, and every tool_use is answered by a tool_result in the next turn
    (and every tool_result answers one in the turn before)."""
    if not messages or messages[0]["role"] != "user":
        return False
    for before, after in zip(messages, messages[1:], strict=False):
        if before["role"] == after["role"]:
            return False
    for i, message in enumerate(messages):
        blocks = message["content"] if isinstance(message["content"], list) else []
        if message["role"] == "assistant":
            calls = {b["id"] for b in blocks if b.get("type") == "tool_use"}
            nxt = messages[i + 1]["content"] if i + 1 < len(messages) else []
            answered = {b["tool_use_id"] for b in nxt if isinstance(b, dict) and b.get("type") == "tool_result"}
            if calls != answered:
                return False
        elif any(b.get("type") == "tool_result" for b in blocks) and (i == 0 or messages[i - 1]["role"] != "assistant"):
            return False
    return True


# ---------------------------------------------------------------------------- prompt caching, native
async def test_breakpoints_are_added_to_a_native_body_and_cache_tokens_priced(gw: Gw, mock_anthropic: MockAnthropic  # noqa: F811
                                                                              ) -> None:
    mock_anthropic.set(input=40, cache_read=900, cache_write_5m=300, output=6)
    messages = [
        {"role": "user", "content": "Here is the spec. " + words("spec", 200)},          # long: an early breakpoint
        {"role": "assistant", "content": [thinking("ok"), {"type": "text", "text": "Noted."}]},
        {"role": "user", "content": "And the plan. " + words("plan", 200)},             # long too: no room left
        {"role": "assistant", "content": [{"type": "text", "text": "Understood."}]},
        {"role": "user", "content": [{"type": "text", "text": "Go."}, {"type": "text", "text": ""}]},
    ]
    system = "You are careful. " + words("careful", 150)
    client = gw.client(await gw.key("cachers"))
    raw = await client.messages.with_raw_response.create(
        model="claude-sonnet", max_tokens=100, system=system, tools=TOOLS[:2], messages=messages)  # type: ignore[arg-type]
    await raw.parse()
    sent = mock_anthropic.last.body
    assert sent["system"] == [{"type": "text", "text": system, "cache_control": FIVE_MIN}]
    assert sent["tools"] == [TOOLS[0], {**TOOLS[1], "cache_control": FIVE_MIN}]
    assert sent["messages"][0]["content"] == [{"type": "text", "text": messages[0]["content"],
                                               "cache_control": FIVE_MIN}]
    assert sent["messages"][1:4] == messages[1:4]                   # no fifth breakpoint: the limit is four
    assert sent["messages"][4]["content"] == [{"type": "text", "text": "Go.", "cache_control": FIVE_MIN},
                                              {"type": "text", "text": ""}]   # never on an empty text block
    assert count_breakpoints(sent) == 4
    cost = nano_of(40 * IN + 900 * READ + 300 * WRITE + 6 * OUT)
    assert raw.headers["x-gateway-cost-usd"] == f"{cost / 1e9:.9f}".rstrip("0")
    [record] = await gw.records()
    assert record.cost_nano == cost and record.cached_input_tokens == 900 and record.cache_write_tokens == 300
    assert record.input_tokens == 1240 and record.output_tokens == 6


async def test_one_hour_tier_on_a_native_stream_is_priced_exactly(gw: Gw, mock_anthropic: MockAnthropic  # noqa: F811
                                                                  ) -> None:
    mock_anthropic.set(input=12, cache_read=0, cache_write_1h=700, output=6)
    client = gw.client(await gw.key("cachers1h"))
    messages = [{"role": "user", "content": "Summarise this. " + words("text", 200)},
                {"role": "assistant", "content": [thinking("hmm")]},          # nothing markable: skipped
                {"role": "user", "content": [{"type": "text", "text": "Thanks."}]}]
    usage: dict[str, Any] = {}
    async with client.messages.stream(model="claude-sonnet", max_tokens=64, messages=messages) as stream:  # type: ignore[arg-type]
        async for event in stream:
            if event.type == "message_delta":
                usage = event.usage.model_dump()
    sent = mock_anthropic.last.body
    assert sent["messages"][2]["content"] == [{"type": "text", "text": "Thanks.", "cache_control": ONE_HOUR}]
    assert sent["messages"][0]["content"][0]["cache_control"] == ONE_HOUR and sent["messages"][1] == messages[1]
    assert "system" not in sent and count_breakpoints(sent) == 2
    cost = nano_of(12 * IN + 700 * WRITE_1H + 6 * OUT)
    [record] = await gw.records()
    assert record.cost_nano == cost and usage["cost_usd"] == cost / 1e9 and record.cache_write_tokens == 700


async def test_a_body_with_client_breakpoints_is_sent_as_is(gw: Gw, mock_anthropic: MockAnthropic  # noqa: F811
                                                            ) -> None:
    client = gw.client(await gw.key("cachers"))
    messages = [{"role": "user", "content": "Question. " + words("long", 300)},
                {"role": "assistant", "content": "Answer. " + words("long", 300)},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": [
                    {"type": "text", "text": "nested", "cache_control": FIVE_MIN}]}, {"type": "text", "text": "ok"}]}]
    await client.messages.create(model="claude-sonnet", max_tokens=10, system="Be brief. " + words("s", 200),
                                 tools=TOOLS[:2], messages=messages)  # type: ignore[arg-type]
    sent = mock_anthropic.last.body
    assert sent["messages"] == messages and sent["system"] == "Be brief. " + words("s", 200)
    assert sent["tools"] == TOOLS[:2] and count_breakpoints(sent) == 1
    await client.messages.create(model="claude-sonnet", max_tokens=10, messages=messages[:2],
                                 extra_body={"cache_control": FIVE_MIN})   # automatic caching, top level
    sent = mock_anthropic.last.body
    assert sent["messages"] == messages[:2] and sent["cache_control"] == FIVE_MIN


async def test_no_breakpoints_without_the_policy(gw: Gw, mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    client = gw.client(await gw.key("plain"))
    messages = [{"role": "user", "content": "Question. " + words("long", 300)}]
    await client.messages.create(model="claude-sonnet", max_tokens=10, system=words("s", 300), messages=messages)  # type: ignore[arg-type]
    sent = mock_anthropic.last.body
    assert sent["messages"] == messages and sent["system"] == words("s", 300) and count_breakpoints(sent) == 0


def count_breakpoints(value: Any) -> int:
    if isinstance(value, dict):
        return ("cache_control" in value) + sum(count_breakpoints(v) for k, v in value.items() if k != "cache_control")
    if isinstance(value, list):
        return sum(count_breakpoints(v) for v in value)
    return 0


# ---------------------------------------------------------------------------- compression, native
async def test_summarised_native_conversation_stays_a_valid_messages_body(gw: Gw, mock_anthropic: MockAnthropic  # noqa: F811
                                                                          ) -> None:
    mock_anthropic.set(input=300, output=5)
    client = gw.client(await gw.key("squeeze"))
    original = conversation()
    raw = await client.messages.with_raw_response.create(
        model="claude-sonnet", max_tokens=200, system=SYSTEM, tools=TOOLS, messages=copy.deepcopy(original),  # type: ignore[arg-type]
        thinking={"type": "enabled", "budget_tokens": 100})
    await raw.parse()
    before, after = (int(x) for x in raw.headers["x-gateway-compression"].split("->"))
    [sent] = [r.body for r in mock_anthropic.requests]
    assert before > 1000 >= after
    assert sent["system"] == SYSTEM and sent["tools"] == TOOLS and sent["thinking"]["type"] == "enabled"
    kept = sent["messages"]
    assert pairs_intact(kept)
    # first turn whole (the image and both thinking blocks with their signatures), then the summary,
    # then the last turn (its tool result split off the dropped turn, its cache_control kept)
    assert kept[:4] == original[:4]
    assert kept[4]["role"] == "user" and kept[4]["content"][0] == original[4]["content"][0]
    assert kept[4]["content"][1]["text"].startswith(SUMMARY_HEADER)
    assert kept[5] == {"role": "assistant", "content": SUMMARY_ACK}
    assert kept[6] == {"role": "user", "content": [original[8]["content"][1]]}
    summary, main = sorted(await gw.records(), key=lambda r: r.route != "compression_summary")
    assert summary.route == "compression_summary" and summary.output_tokens == 20
    summary_cost = nano_of(summary.input_tokens * SUMMARY_IN + 20 * SUMMARY_OUT)
    assert summary.cost_nano == summary_cost > 0 and summary.savings == {"compression": -summary_cost}
    assert main.cost_nano == nano_of(300 * IN + 5 * OUT) and main.compressed
    assert main.compression_saved_tokens == before - after


async def test_old_native_tool_outputs_are_cleared_in_place(gw: Gw, mock_anthropic: MockAnthropic  # noqa: F811
                                                             ) -> None:
    client = gw.client(await gw.key("trim"))
    original = conversation()
    raw = await client.messages.with_raw_response.create(
        model="claude-sonnet", max_tokens=200, system=SYSTEM, tools=TOOLS, messages=copy.deepcopy(original))  # type: ignore[arg-type]
    await raw.parse()
    before, after = (int(x) for x in raw.headers["x-gateway-compression"].split("->"))
    assert before > 900 >= after
    kept = mock_anthropic.last.body["messages"]
    assert pairs_intact(kept) and len(kept) == len(original)
    for i, block in ((2, 0), (4, 0)):                          # the two older tool outputs, cleared in place
        cleared = kept[i]["content"][block]
        assert cleared["content"].startswith("[tool output removed by the gateway to save context: ")
        assert {**cleared, "content": original[i]["content"][block]["content"]} == original[i]["content"][block]
    assert kept[4]["content"][1:] == original[4]["content"][1:]   # the text beside the result stays
    assert [kept[i] for i in (0, 1, 3, 5, 6, 7, 8)] == [original[i] for i in (0, 1, 3, 5, 6, 7, 8)]


async def test_a_client_breakpoint_protects_its_prefix_from_compression(gw: Gw, mock_anthropic: MockAnthropic  # noqa: F811
                                                                        ) -> None:
    client = gw.client(await gw.key("trim"))
    original = conversation()
    original[2]["content"][0]["cache_control"] = FIVE_MIN     # the client caches up to the first tool result
    raw = await client.messages.with_raw_response.create(
        model="claude-sonnet", max_tokens=200, system=SYSTEM, tools=TOOLS, messages=copy.deepcopy(original))  # type: ignore[arg-type]
    await raw.parse()
    before, after = (int(x) for x in raw.headers["x-gateway-compression"].split("->"))
    assert before > after
    kept = mock_anthropic.last.body["messages"]
    # nothing up to the next user turn is touched (no tool output cleared); the middle turn (the third
    # call and its result) is dropped, the last message keeps its text and its breakpoint
    assert kept == [*original[:6], {"role": "user", "content": [original[8]["content"][1]]}]
    assert pairs_intact(kept) and count_breakpoints(kept) == 2


# ---------------------------------------------------------------------------- the way back, case by case
def traced(native: list[dict[str, Any]], keep: Any) -> list[dict[str, Any]] | None:
    origins: list[tuple[int, ...]] = []
    chat, _ = messages_to_chat({"model": "m", "max_tokens": 1, "messages": native}, origins=origins)
    return native_messages(native, origins, chat["messages"], keep(chat["messages"]))


def test_way_back_keeps_untouched_messages_as_the_same_objects() -> None:
    native = conversation()
    out = traced(native, lambda chat: chat)
    assert out == native and all(a is b for a, b in zip(out or [], native, strict=True))


def test_way_back_splits_a_user_message_between_a_dropped_and_a_kept_turn() -> None:
    native = conversation()
    # chat: 0 user, 1 asst(t1), 2 tool t1, 3 asst(t2), 4 tool t2, 5 user "Also", 6 asst, 7 user, 8 asst(t3),
    # 9 tool t3, 10 user "Please finish": drop the turn of messages 5-6 (native 4's text, native 5)
    out = traced(native, lambda chat: [m for i, m in enumerate(chat) if i not in (5, 6)])
    assert out == [*native[:4], {"role": "user", "content": [native[4]["content"][0],
                                                             {"type": "text", "text": native[6]["content"]}]},
                   *native[7:]]


def test_way_back_clears_a_tool_result_in_place_keeping_its_fields() -> None:
    native = conversation()
    native[2]["content"][0]["cache_control"] = FIVE_MIN

    def clear(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**m, "content": "[removed]"} if m.get("tool_call_id") == "t1" else m for m in chat]
    out = traced(native, clear)
    assert out is not None and out[2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": "[removed]", "cache_control": FIVE_MIN}]}
    assert out[:2] == native[:2] and out[3:] == native[3:]


def test_way_back_puts_the_summary_pair_where_the_turns_were() -> None:
    native = conversation()
    summary = [{"role": "user", "content": SUMMARY_HEADER + "s"}, {"role": "assistant", "content": SUMMARY_ACK}]
    out = traced(native, lambda chat: [*chat[:5], *summary, *chat[10:]])   # turns 5-9 summarised
    text = {"type": "text", "text": summary[0]["content"]}
    assert out == [*native[:4],
                   {"role": "user", "content": [native[4]["content"][0], text]},
                   summary[1],
                   {"role": "user", "content": [native[8]["content"][1]]}]
    assert out is not None and pairs_intact(out)


def test_way_back_carries_messages_without_a_chat_counterpart_with_their_neighbour() -> None:
    native = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
              {"role": "user", "content": [{"type": "document", "source": {"type": "file", "file_id": "f"}}]},
              {"role": "user", "content": "three"}, {"role": "assistant", "content": "four"},
              {"role": "user", "content": "five"}]
    assert traced(native, lambda chat: chat) == [*native[:2], {"role": "user", "content": [
        native[2]["content"][0], {"type": "text", "text": "three"}]}, *native[4:]]
    dropped = traced(native, lambda chat: [chat[0], chat[1], chat[4]])   # "three" and "four" dropped
    assert dropped == [native[0], native[1], native[5]]               # the document went with "three"


def test_way_back_gives_up_on_an_unknown_tool_message() -> None:
    native = conversation()
    assert traced(native, lambda chat: [*chat, {"role": "tool", "tool_call_id": "nope", "content": "x"}]) is None


async def test_compression_spares_the_early_messages_the_gateway_will_mark(gw: Gw) -> None:
    deployment = next(d for d in gw.app.state.policies.deployments if d.id == "anthropic-mock")
    native = {"messages": [{"role": "user", "content": "Spec. " + words("spec", 200)},      # marked: long enough
                           {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
                           {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "content": "r"},
                                                        {"type": "text", "text": "short"}]},
                           {"role": "assistant", "content": "fine"},
                           {"role": "user", "content": "Last. " + words("last", 200)}]}   # the end: not protected
    origins: list[tuple[int, ...]] = []
    messages_to_chat({**native, "model": "m", "max_tokens": 1}, origins=origins)
    assert origins == [(0,), (1,), (2,), (2,), (3,), (4,)]
    on = PromptCacheSettings(enabled=True, min_tokens=100)
    assert native_protected(native, origins, deployment, on) == 1
    assert native_protected(native, origins, deployment, PromptCacheSettings()) == 0
    marked = {**native, "messages": [*native["messages"][:2], {**native["messages"][2], "content": [
        native["messages"][2]["content"][0], {"type": "text", "text": "short", "cache_control": FIVE_MIN}]},
        *native["messages"][3:]]}
    assert native_protected(marked, origins, deployment, PromptCacheSettings()) == 4   # both chat parts of it
