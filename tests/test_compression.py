"""Context compression: the strategies on their own (a recording summariser), then through the gateway
(the summary call routed to a priced mock model, paid by the team, recorded; the compressed request
as the upstream received it; header, metrics and ledger savings checked exactly)."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from saving_harness import InProcess, metric, nano

from conftest import mock_policy
from gateway.policy import CompressionSettings
from gateway.savings.compression import SUMMARY_HEADER, SUMMARY_INSTRUCTIONS, compress, threshold
from gateway.tokens import count_prompt

MODEL = "gpt-4o-mini"
SYSTEM = {"role": "system", "content": "You are the support agent of a hardware shop. Never invent prices."}


def call(cid: str) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": cid, "type": "function", "function": {"name": "search", "arguments": '{"q": "stock"}'}}]}


def conversation() -> list[dict[str, Any]]:
    return [
        SYSTEM,
        {"role": "user", "content": "Task: help me pick a drill. " + "context " * 50},
        {"role": "user", "content": "Which drills are in stock?"}, call("c1"),
        {"role": "tool", "tool_call_id": "c1", "content": "row " * 500},
        {"role": "assistant", "content": "first answer " * 150},
        {"role": "user", "content": "And the cordless ones?"}, call("c2"),
        {"role": "tool", "tool_call_id": "c2", "content": "item " * 500},
        {"role": "assistant", "content": "second answer " * 150},
        {"role": "user", "content": "Which one do you recommend?"},
    ]


def pairs_intact(messages: list[dict[str, Any]]) -> bool:
    """Every tool call answered before the next user turn, every tool result preceded by its call."""
    open_calls: set[str] = set()
    for m in messages:
        if m["role"] == "user" and open_calls:
            return False
        for c in m.get("tool_calls") or ():
            open_calls.add(c["id"])
        if m["role"] == "tool":
            if m["tool_call_id"] not in open_calls:
                return False
            open_calls.discard(m["tool_call_id"])
    return not open_calls


def tokens(messages: list[dict[str, Any]]) -> int:
    return count_prompt({"messages": messages}, "chat", MODEL)


class Summariser:
    def __init__(self, text: str = "The user wants a drill; two in stock.", cost: int = 1234) -> None:
        self.calls: list[str] = []
        self.text, self.cost = text, cost

    async def __call__(self, transcript: str) -> tuple[str, int]:
        self.calls.append(transcript)
        return self.text, self.cost


def settings(**kw: Any) -> CompressionSettings:
    return CompressionSettings(enabled=True, **kw)


async def test_clear_tool_outputs_keeps_the_last_and_every_pair() -> None:
    body = {"messages": conversation()}
    before = tokens(body["messages"])
    goal = before - 300
    s = settings(strategies=("clear_tool_outputs",), keep_tool_outputs=1, keep_last_turns=1)
    out, report = await compress(body, s, MODEL, before, goal)
    msgs = out["messages"]
    assert len(msgs) == len(body["messages"]) and pairs_intact(msgs)
    assert msgs[4]["content"].startswith("[tool output removed by the gateway") and msgs[8] == body["messages"][8]
    assert report.after == tokens(msgs) <= goal and report.saved == {"clear_tool_outputs": before - report.after}
    assert report.header == f"{before}->{report.after}"
    assert body["messages"][4]["content"] == "row " * 500            # the request itself is not modified


def agent_loop(steps: int, words: int = 300) -> list[dict[str, Any]]:
    """The system prompt, then ``steps`` turns, each a user message, a tool call, its result and a reply."""
    out = [SYSTEM]
    for k in range(steps):
        out += [{"role": "user", "content": f"Step {k}: look it up."}, call(f"c{k}"),
                {"role": "tool", "tool_call_id": f"c{k}", "content": f"out{k} " * words},
                {"role": "assistant", "content": f"Step {k} done."}]
    return out


def results(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """tool_call_id -> the content of its result."""
    return {m["tool_call_id"]: m["content"] for m in messages if m["role"] == "tool"}


def cleared(content: Any) -> bool:
    return isinstance(content, str) and content.startswith("[tool output removed by the gateway")


async def test_clear_tool_outputs_reaches_old_outputs_in_any_turn_keeping_the_last() -> None:
    messages = agent_loop(6)                 # turns 0..5, one tool result each
    original = results(messages)
    s = settings(strategies=("clear_tool_outputs",), keep_tool_outputs=2, keep_first_turns=1, keep_last_turns=2)
    out, report = await compress({"messages": messages}, s, MODEL, tokens(messages), 10)   # unreachable goal
    got = results(out["messages"])
    # the turn limits are for summarize and drop_middle: old outputs go wherever they are, the last two stay
    assert [cid for cid, content in got.items() if cleared(content)] == ["c0", "c1", "c2", "c3"]
    assert {cid: got[cid] for cid in ("c4", "c5")} == {cid: original[cid] for cid in ("c4", "c5")}
    assert len(out["messages"]) == len(messages) and pairs_intact(out["messages"]) and set(got) == set(original)
    assert [m for m in out["messages"] if m["role"] != "tool"] == [m for m in messages if m["role"] != "tool"]
    assert report.after == tokens(out["messages"]) and report.saved == {"clear_tool_outputs": report.before
                                                                        - report.after}
    # an agent loop: one user message, then many tool calls (a single turn, both first and last)
    loop = [SYSTEM, {"role": "user", "content": "Find the cheapest drill."}]
    for k in range(5):
        loop += [call(f"a{k}"), {"role": "tool", "tool_call_id": f"a{k}", "content": f"page{k} " * 300}]
    out, _ = await compress({"messages": loop}, settings(strategies=("clear_tool_outputs",), keep_tool_outputs=1),
                            MODEL, tokens(loop), 10)
    assert [cid for cid, content in results(out["messages"]).items() if cleared(content)] == ["a0", "a1", "a2", "a3"]
    assert out["messages"][-1] == loop[-1] and pairs_intact(out["messages"])
    # oldest first, and only as far as the goal needs
    goal = tokens(loop) - 250
    out, report = await compress({"messages": loop}, settings(strategies=("clear_tool_outputs",)), MODEL,
                                 tokens(loop), goal)
    assert [cid for cid, content in results(out["messages"]).items() if cleared(content)] == ["a0"]
    assert report.after <= goal


async def test_clear_tool_outputs_spares_the_protected_prefix_and_barriers() -> None:
    messages = agent_loop(6)
    s = settings(strategies=("clear_tool_outputs",), keep_tool_outputs=0, keep_first_turns=0, keep_last_turns=1)
    # a prompt-cache breakpoint relies on messages[:9]: turns 0 and 1, with their tool results
    out, _ = await compress({"messages": messages}, s, MODEL, tokens(messages), 10, protected=9)
    assert out["messages"][:9] == messages[:9]
    assert [cid for cid, content in results(out["messages"]).items() if cleared(content)] == ["c2", "c3", "c4", "c5"]
    assert pairs_intact(out["messages"]) and set(results(out["messages"])) == set(results(messages))
    # a mid-conversation system message in turn 3: that turn and every later one are kept
    barrier = [*messages[:14], {"role": "system", "content": "Policy update: be terse."}, *messages[14:]]
    out, _ = await compress({"messages": barrier}, s, MODEL, tokens(barrier), 10)
    assert [cid for cid, content in results(out["messages"]).items() if cleared(content)] == ["c0", "c1", "c2"]
    assert out["messages"][13:] == barrier[13:] and pairs_intact(out["messages"])


async def test_summary_replaces_middle_turns_keeping_system_first_and_last() -> None:
    body = {"messages": conversation()}
    before = tokens(body["messages"])
    summariser = Summariser()
    out, report = await compress(body, settings(strategies=("clear_tool_outputs", "summarize", "drop_middle"),
                                                summary_model="s", keep_tool_outputs=1, keep_last_turns=1),
                                 MODEL, before, 400, summarise=summariser)
    msgs = out["messages"]
    assert msgs[0] == SYSTEM and msgs[1] == body["messages"][1] and msgs[-1] == body["messages"][-1]
    assert msgs[2] == {"role": "user", "content": SUMMARY_HEADER + summariser.text}
    assert msgs[3]["role"] == "assistant" and len(msgs) == 5
    [transcript] = summariser.calls
    assert "Which drills are in stock?" in transcript and "item item" in transcript
    assert "tool output removed by the gateway" in transcript            # cleared before summarising
    assert "Which one do you recommend?" not in transcript and "Task:" not in transcript
    assert report.after == tokens(msgs) <= 400 and report.summary_nano == 1234
    assert set(report.saved) == {"clear_tool_outputs", "summarize"}
    assert sum(report.saved.values()) == before - report.after


async def test_drop_middle_drops_oldest_turns_and_never_below_the_minimum() -> None:
    body = {"messages": conversation()}
    before = tokens(body["messages"])
    s = settings(strategies=("drop_middle",), keep_last_turns=2)
    out, report = await compress(body, s, MODEL, before, before - 500)
    msgs = out["messages"]
    assert msgs == [*body["messages"][:2], *body["messages"][6:]] and pairs_intact(msgs)
    assert report.saved == {"drop_middle": before - report.after} and report.after <= before - 500
    # a goal it cannot reach: the first turn and the last two stay, whatever the size
    out, report = await compress(body, s, MODEL, before, 10)
    assert out["messages"] == [*body["messages"][:2], *body["messages"][6:]] and report.after > 10
    assert await compress(body, settings(strategies=("drop_middle",), keep_first_turns=1, keep_last_turns=3),
                          MODEL, before, 10) is None                   # nothing compressible at all


async def test_protected_prefix_and_mid_conversation_system_messages_are_kept() -> None:
    messages = conversation()
    s = settings(strategies=("clear_tool_outputs", "drop_middle"), keep_tool_outputs=0, keep_first_turns=0,
                 keep_last_turns=1)
    out, _ = await compress({"messages": messages}, s, MODEL, tokens(messages), 100, protected=6)
    assert out["messages"] == [*messages[:6], messages[10]]             # messages[:6] untouched, tool output too
    barrier = [*messages[:10], {"role": "system", "content": "Policy update: be terse."}, messages[10]]
    out, _ = await compress({"messages": barrier}, settings(strategies=("drop_middle",), keep_first_turns=0,
                                                            keep_last_turns=1), MODEL, tokens(barrier), 100)
    assert out["messages"] == [SYSTEM, *barrier[6:]]                     # the turn holding it and after: kept


def test_threshold_is_the_lower_of_the_absolute_and_the_window_share() -> None:
    assert threshold(settings(), 100_000) == 80_000
    assert threshold(settings(trigger_tokens=50_000), 100_000) == 50_000
    assert threshold(settings(trigger_tokens=50_000, trigger_fraction=0.25), 100_000) == 25_000
    assert threshold(settings(trigger_tokens=9), None) == 9 and threshold(settings(), None) is None


# ---------------------------------------------------------------- through the gateway
IN_NANO, OUT_NANO, SUMMARY_IN, SUMMARY_OUT = 1000, 2000, 500, 1000

EXTRA = textwrap.dedent("""\
      small:
        deployments:
          - provider: openai
            model: mock
            api_base: {mock}/v1
            context_window: 2000
            price: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
      summarizer:
        deployments:
          - provider: openai
            model: mock-tokens20
            api_base: {mock}/v1
            price: {{input_per_mtok: 0.5, output_per_mtok: 1.0}}
    teams:
      squeeze:
        budgets: [{{period: daily, usd: 5}}]
    compression:
      teams:
        squeeze:
          enabled: true
          trigger_fraction: 0.5
          summary_model: summarizer
          keep_tool_outputs: 1
          keep_last_turns: 1
        trim:
          enabled: true
          trigger_tokens: 1000
          strategies: [clear_tool_outputs, drop_middle]
          keep_tool_outputs: 1
          keep_last_turns: 2
    """)


@pytest.fixture
async def h(tmp_path: Path, mock_reset: str) -> AsyncIterator[InProcess]:
    (tmp_path / "models.yaml").write_text(mock_policy(mock_reset) + EXTRA.format(mock=mock_reset))
    harness = InProcess(tmp_path)
    yield harness
    await harness.aclose()


async def upstream_bodies(mock: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as c:
        return [r["body"] for r in (await c.get(f"{mock}/_requests")).json()]


async def test_summary_call_is_routed_paid_and_recorded(h: InProcess, mock_reset: str) -> None:
    client = h.client(await h.key("squeeze"))
    raw = await client.chat.completions.with_raw_response.create(model="small", messages=conversation())
    before, after = (int(x) for x in raw.headers["x-gateway-compression"].split("->"))
    assert before > 1000 >= after                         # 0.5 of the 2000-token window
    summary_req, main_req = await upstream_bodies(mock_reset)
    assert summary_req["model"] == "mock-tokens20" and summary_req["messages"][0]["content"] == SUMMARY_INSTRUCTIONS
    sent = main_req["messages"]
    assert sent[0] == SYSTEM and sent[-1] == conversation()[-1] and sent[2]["content"].startswith(SUMMARY_HEADER)
    assert pairs_intact(sent)
    summary, main = await h.records(0, "squeeze", 2)
    assert (summary.route, summary.requested_model, summary.baseline_nano) == ("compression_summary", "summarizer", 0)
    summary_cost = summary.input_tokens * SUMMARY_IN + summary.output_tokens * SUMMARY_OUT
    assert summary.output_tokens == 20 and summary.cost_nano == summary_cost > 0
    assert summary.savings == {"compression": -summary_cost}
    assert main.compressed and main.compression_saved_tokens == before - after
    main_cost = main.input_tokens * IN_NANO + main.output_tokens * OUT_NANO
    assert main.cost_nano == main_cost == nano(float(raw.headers["x-gateway-cost-usd"]))
    removed = before - after
    assert main.baseline_nano == main_cost + removed * IN_NANO and main.savings == {"compression": removed * IN_NANO}
    spent, reserved = await h.spent("squeeze", "daily", 5 * 10**9)
    assert (spent, reserved) == (summary_cost + main_cost, 0)           # the team paid for both
    text = await h.metrics()
    saved_tokens = sum(metric(text, "gateway_compression_tokens_saved_total", team="squeeze", strategy=s)
                       for s in ("clear_tool_outputs", "summarize", "drop_middle"))
    assert saved_tokens == removed and metric(text, "gateway_compression_tokens_saved_total", strategy="summarize") > 0
    assert nano(metric(text, "gateway_savings_usd_total", team="squeeze", source="compression")) \
        == removed * IN_NANO - summary_cost
    assert metric(text, "gateway_requests_total", team="squeeze", route="compression_summary") == 1


async def test_drop_and_clear_keep_tool_pairs_for_the_upstream(h: InProcess, mock_reset: str) -> None:
    client = h.client(await h.key("trim"))
    raw = await client.chat.completions.with_raw_response.create(model="mock", messages=conversation())
    before, after = (int(x) for x in raw.headers["x-gateway-compression"].split("->"))
    assert before > 1000 >= after
    [body] = await upstream_bodies(mock_reset)
    sent, original = body["messages"], conversation()
    assert sent == [*original[:2], *original[6:]] and pairs_intact(sent)


async def test_too_long_for_every_window_is_compressed_to_fit(h: InProcess, mock_reset: str) -> None:
    long = conversation()
    long[5] = {"role": "assistant", "content": "first answer " * 700}   # > 2000 tokens in all
    assert tokens(long) > 2000
    squeeze = h.client(await h.key("squeeze"))
    raw = await squeeze.chat.completions.with_raw_response.create(model="small", messages=long)
    assert int(raw.headers["x-gateway-compression"].split("->")[1]) <= 1000
    other = h.client(await h.key("nobody"))                 # no compression for this team: refused as before
    with pytest.raises(openai.BadRequestError) as err:
        await other.chat.completions.create(model="small", messages=long)
    assert err.value.code == "context_length_exceeded"


async def test_a_cached_answer_serves_a_too_long_prompt_before_any_summary_call(h: InProcess, mock_reset: str) -> None:
    long = conversation()
    long[5] = {"role": "assistant", "content": "first answer " * 700}   # too long for every window
    squeeze = h.client(await h.key("squeeze"))
    first = await squeeze.chat.completions.with_raw_response.create(model="small", messages=long, temperature=0)
    assert first.headers["x-gateway-cache"] == "miss" and "x-gateway-compression" in first.headers
    assert len(await upstream_bodies(mock_reset)) == 2                  # the summary call and the answer
    again = await squeeze.chat.completions.with_raw_response.create(model="small", messages=long, temperature=0)
    assert again.headers["x-gateway-cache"] == "hit" and "x-gateway-compression" not in again.headers
    assert again.headers["x-gateway-cost-usd"] == "0" and again.headers["x-gateway-route"] == "default"
    assert len(await upstream_bodies(mock_reset)) == 2                  # no second summary, no upstream call
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    summary, main, hit = await h.records(0, "squeeze", 3)
    assert (summary.route, main.cache, hit.cache) == ("compression_summary", "miss", "hit")
    assert hit.cost_nano == 0 and not hit.compressed and hit.savings == {"cache": hit.baseline_nano}


ROUTED = textwrap.dedent("""\
    routes:
      - name: squeeze-auto
        match: {models: [auto]}
        candidates: [small]
        baseline: small
        cache: {mode: "off"}
        compression: {enabled: true, trigger_fraction: 0.5, strategies: [clear_tool_outputs, drop_middle],
                      keep_tool_outputs: 1, keep_last_turns: 1}
    """)


async def test_route_overrides_apply_to_route_only_names(tmp_path: Path, mock_reset: str) -> None:
    (tmp_path / "models.yaml").write_text(mock_policy(mock_reset) + EXTRA.format(mock=mock_reset))
    (tmp_path / "routes.yaml").write_text(ROUTED)
    harness = InProcess(tmp_path)
    try:
        client = harness.client(await harness.key("nobody"))      # no team-level compression or cache setting
        raw = await client.chat.completions.with_raw_response.create(model="auto", messages=conversation(),
                                                                     temperature=0)
        before, after = (int(x) for x in raw.headers["x-gateway-compression"].split("->"))
        assert before > 1000 >= after and raw.headers["x-gateway-route"] == "squeeze-auto"
        assert raw.headers["x-gateway-cache"] == "bypass"          # the route turned the cache off
        long = conversation()
        long[5] = {"role": "assistant", "content": "first answer " * 700}   # > the 2000-token window
        raw = await client.chat.completions.with_raw_response.create(model="auto", messages=long)
        assert int(raw.headers["x-gateway-compression"].split("->")[1]) <= 1000   # compressed to fit
        plain = await client.chat.completions.with_raw_response.create(model="mock", messages=conversation(),
                                                                       temperature=0)
        assert "x-gateway-compression" not in plain.headers and plain.headers["x-gateway-cache"] == "miss"
    finally:
        await harness.aclose()
