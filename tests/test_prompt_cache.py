"""Provider prompt caching: where breakpoints go (planner), that they reach Anthropic's Messages API
through litellm (the mock records the body it received), OpenAI's ``prompt_cache_key``, the
``prompt_cache`` savings, priced by hand, and compression leaving the cached prefix as it was."""

from __future__ import annotations

import hashlib
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from mock_anthropic import MockAnthropic, mock_anthropic, mock_anthropic_server  # noqa: F401  (fixtures)
from saving_harness import InProcess, metric, nano

from conftest import mock_policy
from gateway.policy import Deployment, PromptCacheSettings, load_policies
from gateway.savings.prompt_caching import apply, min_cacheable, plan_breakpoints, prompt_cache_key, protected_messages

ON = PromptCacheSettings(enabled=True)
LONG = "alpha " * 1200          # ~1200 tokens: above the 1024 minimum, below Haiku's 2048
SHORT = "Be brief."
TOOL = {"type": "function", "function": {"name": "lookup", "description": "beta " * 1100,
                                         "parameters": {"type": "object", "properties": {}}}}


def deployments(tmp_path: Path, anthropic_url: str = "http://127.0.0.1:9") -> dict[str, Deployment]:
    (tmp_path / "models.yaml").write_text(textwrap.dedent(f"""\
        models:
          sonnet:
            deployments: [{{provider: anthropic, model: claude-sonnet-4-5, api_base: "{anthropic_url}"}}]
          haiku:
            deployments: [{{provider: anthropic, model: claude-3-5-haiku-20241022, api_base: "{anthropic_url}"}}]
          gpt:
            deployments: [{{provider: openai, model: gpt-4o-mini, api_base: "http://127.0.0.1:9/v1"}}]
        """))
    policies = load_policies(str(tmp_path))
    return {name: policies.models[name].deployments[0] for name in ("sonnet", "haiku", "gpt")}


def controls(body: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every cache_control in an OpenAI-shaped body: (where, value)."""
    out = [(f"tools[{i}]", t["cache_control"]) for i, t in enumerate(body.get("tools") or ()) if "cache_control" in t]
    for i, m in enumerate(body["messages"]):
        if "cache_control" in m:
            out.append((f"messages[{i}]", m["cache_control"]))
        for j, part in enumerate(m["content"] if isinstance(m.get("content"), list) else ()):
            if "cache_control" in part:
                out.append((f"messages[{i}].content[{j}]", part["cache_control"]))
        for j, call in enumerate(m.get("tool_calls") or ()):
            if "cache_control" in call:
                out.append((f"messages[{i}].tool_calls[{j}]", call["cache_control"]))
    return out


def test_minimum_cacheable_length_table() -> None:
    assert min_cacheable("claude-sonnet-4-5") == 1024 and min_cacheable("claude-opus-4-1") == 1024
    assert min_cacheable("claude-3-5-haiku-20241022") == 2048 and min_cacheable("claude-3-haiku-20240307") == 2048
    assert min_cacheable("claude-haiku-4-5") == 4096 and min_cacheable("claude-opus-4-5") == 4096
    assert min_cacheable("claude-sonnet-4-6") == 2048


def test_system_and_conversation_end_marked(tmp_path: Path) -> None:
    d = deployments(tmp_path)["sonnet"]
    body = {"messages": [{"role": "system", "content": LONG}, {"role": "user", "content": "hi"}]}
    out = apply(body, d, ON, "t")
    assert controls(out) == [("messages[0]", {"type": "ephemeral"}), ("messages[1]", {"type": "ephemeral"})]
    assert controls(body) == []                                 # the request itself is untouched
    assert out["messages"][0]["content"] == LONG


def test_short_prefix_gets_no_breakpoint_and_haiku_needs_more(tmp_path: Path) -> None:
    ds = deployments(tmp_path)
    short = {"messages": [{"role": "system", "content": SHORT}, {"role": "user", "content": "hi"}]}
    assert apply(short, ds["sonnet"], ON, "t") is short
    long = {"messages": [{"role": "system", "content": LONG}, {"role": "user", "content": "hi"}]}
    assert controls(apply(long, ds["haiku"], ON, "t")) == []    # ~1200 tokens < Haiku's 2048
    assert apply(long, ds["haiku"], ON, "t") is long
    custom = PromptCacheSettings(enabled=True, min_tokens=1000)
    assert len(controls(apply(long, ds["haiku"], custom, "t"))) == 2


def test_at_most_four_breakpoints_and_one_hour_tier(tmp_path: Path) -> None:
    d = deployments(tmp_path)["sonnet"]
    messages: list[dict[str, Any]] = [{"role": "system", "content": LONG}]
    for i in range(5):
        messages += [{"role": "user", "content": f"doc {i} " + LONG}, {"role": "assistant", "content": "ok"}]
    messages.append({"role": "user", "content": "question"})
    body = {"messages": messages, "tools": [TOOL]}
    hour = PromptCacheSettings(enabled=True, ttl="1h")
    out = apply(body, d, hour, "t")
    marks = controls(out)
    assert len(marks) == 4 and all(v == {"type": "ephemeral", "ttl": "1h"} for _, v in marks)
    # conversation end, system prompt, tools, then the oldest long message
    assert [w for w, _ in marks] == ["tools[0]", "messages[0]", "messages[1]", "messages[11]"]
    assert protected_messages(body, d, hour) == 2              # compression keeps messages[0..1]
    plan = plan_breakpoints(body, d.upstream_model, PromptCacheSettings(enabled=True, conversation=False))
    assert plan is not None and plan.tools and plan.messages == (0, 1, 3)


def test_client_breakpoints_are_left_alone_and_parts_and_tool_calls_marked(tmp_path: Path) -> None:
    d = deployments(tmp_path)["sonnet"]
    own = {"messages": [{"role": "system", "content": [{"type": "text", "text": LONG,
                                                        "cache_control": {"type": "ephemeral"}}]},
                        {"role": "user", "content": "hi"}]}
    assert apply(own, d, ON, "t") is own
    body = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": LONG}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "result"}]}
    marks = [w for w, _ in controls(apply(body, d, ON, "t"))]
    assert marks == ["messages[0].content[1]", "messages[2]"]
    calling = {"messages": body["messages"][:2]}
    assert [w for w, _ in controls(apply(calling, d, ON, "t"))] == ["messages[0].content[1]",
                                                                    "messages[1].tool_calls[0]"]


def test_openai_prompt_cache_key(tmp_path: Path) -> None:
    d = deployments(tmp_path)["gpt"]
    body = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]}
    team_key = apply(body, d, ON, "research")["prompt_cache_key"]
    assert team_key == "gw-" + hashlib.sha256(orjson.dumps(["research"])).hexdigest()[:32]
    assert apply(body, d, ON, "ops")["prompt_cache_key"] != team_key
    prefix = PromptCacheSettings(enabled=True, openai_cache_key="prefix")
    other = {"messages": [{"role": "system", "content": "T"}, {"role": "user", "content": "hi"}]}
    assert apply(body, d, prefix, "research")["prompt_cache_key"] != apply(other, d, prefix, "research")[
        "prompt_cache_key"]
    assert prompt_cache_key(body, "research", "prefix") == prompt_cache_key(
        {**body, "messages": [*body["messages"], {"role": "assistant", "content": "x"}]}, "research", "prefix")
    assert apply({**body, "prompt_cache_key": "mine"}, d, ON, "research")["prompt_cache_key"] == "mine"
    assert apply(body, d, PromptCacheSettings(enabled=True, openai_cache_key="off"), "research") is body
    assert apply(body, d, PromptCacheSettings(), "research") is body     # not enabled


# ---------------------------------------------------------------- through the gateway
# $3 in, $15 out, $0.30 cache read, $3.75 5-minute write, $6 1-hour write per Mtok => nano per token
IN, OUT, READ, WRITE_5M, WRITE_1H = 3000, 15000, 300, 3750, 6000


@pytest.fixture
async def anthropic_gw(tmp_path: Path, mock_anthropic: MockAnthropic,  # noqa: F811
                       mock_upstream: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[InProcess]:
    monkeypatch.setenv("GATEWAY_TEST_ANTHROPIC_KEY", "sk-ant-test")
    (tmp_path / "models.yaml").write_text(mock_policy(mock_upstream) + textwrap.dedent(f"""\
          sonnet:
            deployments:
              - provider: anthropic
                model: claude-sonnet-4-5
                api_base: {mock_anthropic.url}
                api_key_env: GATEWAY_TEST_ANTHROPIC_KEY
                price: {{input_per_mtok: 3, output_per_mtok: 15, cache_read_per_mtok: 0.30,
                         cache_write_per_mtok: 3.75, cache_write_1h_per_mtok: 6}}
        prompt_cache:
          enabled: true
          teams:
            hourly: {{ttl: 1h}}
            plain: {{enabled: false}}
        compression:
          teams:
            squeeze:
              enabled: true
              trigger_tokens: 5000
              target_tokens: 4500
              strategies: [clear_tool_outputs, drop_middle]
              keep_first_turns: 0
              keep_last_turns: 1
              keep_tool_outputs: 1
        """))
    h = InProcess(tmp_path)
    yield h
    await h.aclose()


async def test_breakpoints_reach_the_messages_api_and_savings_are_priced(
        anthropic_gw: InProcess, mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    h = anthropic_gw
    mock_anthropic.set(input=25, cache_read=2000, cache_write_5m=500)
    client = h.client(await h.key("research"))
    raw = await client.chat.completions.with_raw_response.create(
        model="sonnet", max_tokens=50, tools=[TOOL],
        messages=[{"role": "system", "content": LONG}, {"role": "user", "content": "What is alpha?"}])
    sent = mock_anthropic.last.body
    assert sent["tools"][0]["cache_control"] == {"type": "ephemeral"}
    assert sent["system"][-1]["cache_control"] == {"type": "ephemeral"} and sent["system"][-1]["text"] == LONG
    assert sent["messages"][-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    count = orjson.dumps(sent).count(b'"cache_control"')
    assert count == 3
    # 25 uncached + 2000 read + 500 written; the mock answers a tool call with 12 output tokens
    cost = 25 * IN + 2000 * READ + 500 * WRITE_5M + 12 * OUT              # 2,730,000 nano
    uncached = 2525 * IN + 12 * OUT                                        # 7,755,000 nano
    assert cost == 2_730_000 and uncached == 7_755_000
    assert nano(float(raw.headers["x-gateway-cost-usd"])) == cost
    [record] = await h.records(0, "research", 1)
    assert (record.cost_nano, record.baseline_nano, record.savings) == (cost, uncached,
                                                                       {"prompt_cache": uncached - cost})
    assert (record.cached_input_tokens, record.cache_write_tokens) == (2000, 500)
    text = await h.metrics()
    assert nano(metric(text, "gateway_savings_usd_total", team="research", source="prompt_cache")) == 5_025_000


async def test_one_hour_tier_and_a_team_without_prompt_caching(
        anthropic_gw: InProcess, mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    h = anthropic_gw
    mock_anthropic.set(input=25, cache_write_1h=2000)
    hourly = h.client(await h.key("hourly"))
    messages = [{"role": "system", "content": LONG}, {"role": "user", "content": "What is alpha?"}]
    await hourly.chat.completions.create(model="sonnet", max_tokens=50, messages=messages)
    sent = mock_anthropic.last.body
    assert sent["system"][-1]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert sent["messages"][-1]["content"][-1]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    # a cache write costs more than reading uncached: a negative saving, held back from the counter
    cost, uncached = 25 * IN + 2000 * WRITE_1H + 6 * OUT, 2025 * IN + 6 * OUT
    [record] = await h.records(0, "hourly", 1)
    assert record.savings == {"prompt_cache": uncached - cost} and uncached - cost == -6_000_000
    assert metric(await h.metrics(), "gateway_savings_usd_total", team="hourly", source="prompt_cache") == 0
    assert h.app.state.metrics.savings_debt("hourly", "prompt_cache") == 6_000_000
    plain = h.client(await h.key("plain"))
    await plain.chat.completions.create(model="sonnet", max_tokens=50, messages=messages)
    assert b"cache_control" not in orjson.dumps(mock_anthropic.last.body)


async def test_prompt_cache_key_reaches_an_openai_compatible_upstream(
        anthropic_gw: InProcess, mock_reset: str) -> None:
    h = anthropic_gw
    for team in ("research", "ops"):
        client = h.client(await h.key(team))
        await client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}])
    await h.client(await h.key("research")).chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hi"}], prompt_cache_key="client-chosen")
    async with httpx.AsyncClient() as c:
        seen = [r["body"]["prompt_cache_key"] for r in (await c.get(f"{mock_reset}/_requests")).json()]
    expected = ["gw-" + hashlib.sha256(orjson.dumps([t])).hexdigest()[:32] for t in ("research", "ops")]
    assert seen == [*expected, "client-chosen"]


def lookup_call(cid: str) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": cid, "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}


def long_conversation() -> list[dict[str, Any]]:
    """A stable prefix heavy enough for breakpoints (system prompt, a long document, a long tool result),
    then five short tool-using turns, then the question."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": LONG},
        {"role": "user", "content": "Read this document: " + "gamma " * 1200},
        lookup_call("c0"),
        {"role": "tool", "tool_call_id": "c0", "content": "delta " * 1100},
        {"role": "assistant", "content": "I have read it."}]
    for k in range(1, 6):
        messages += [{"role": "user", "content": f"Check item {k}."}, lookup_call(f"c{k}"),
                     {"role": "tool", "tool_call_id": f"c{k}", "content": f"row{k} " * 300},
                     {"role": "assistant", "content": f"Item {k} checked."}]
    messages.append({"role": "user", "content": "Which item should I pick?"})
    return messages


async def test_compression_keeps_the_cached_prefix_byte_for_byte(
        anthropic_gw: InProcess, mock_anthropic: MockAnthropic) -> None:  # noqa: F811
    h = anthropic_gw
    small_tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object",
                                                                                   "properties": {}}}}
    kw: dict[str, Any] = {"model": "sonnet", "max_tokens": 50, "tools": [small_tool],
                          "messages": long_conversation()}
    first = await h.client(await h.key("research")).chat.completions.with_raw_response.create(**kw)
    assert "x-gateway-compression" not in first.headers
    full = mock_anthropic.last.body
    mock_anthropic.set(input=25, cache_read=3000)
    raw = await h.client(await h.key("squeeze")).chat.completions.with_raw_response.create(**kw)
    sent = mock_anthropic.last.body
    before, after = (int(x) for x in raw.headers["x-gateway-compression"].split("->"))
    assert before > 5000 and after <= 4500                       # trigger_tokens, target_tokens
    # the protected prefix (system prompt, document, first tool result) arrives exactly as without
    # compression, its breakpoints included; so does the question, which carries the last one
    assert sent["system"] == full["system"] and sent["system"][-1]["cache_control"] == {"type": "ephemeral"}
    assert sent["messages"][:4] == full["messages"][:4] and sent["messages"][-1] == full["messages"][-1]
    assert sent["messages"][0]["content"][-1] == {"type": "text", "text": "Read this document: " + "gamma " * 1200,
                                                  "cache_control": {"type": "ephemeral"}}
    assert sent["messages"][2]["content"][-1]["tool_use_id"] == "c0" \
        and sent["messages"][2]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    assert sent["messages"][-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    assert controls_in(sent) == controls_in(full) == 4
    # the middle was compressed: its older tool results cleared (every call keeps a result), c5 kept
    results = {b["tool_use_id"]: b["content"] for m in sent["messages"] for b in m["content"]
               if b["type"] == "tool_result"}
    originals = {b["tool_use_id"]: b["content"] for m in full["messages"] for b in m["content"]
                 if b["type"] == "tool_result"}
    assert set(results) == set(originals) == {f"c{k}" for k in range(6)}
    assert [c for c in sorted(results) if results[c] != originals[c]] == ["c1", "c2", "c3", "c4"]
    assert all(str(results[c]).startswith("[tool output removed by the gateway") for c in ("c1", "c2", "c3", "c4"))
    assert len(orjson.dumps(sent)) < len(orjson.dumps(full)) - 4 * 1000
    # priced and recorded: compression saved the removed tokens, prompt caching the cache reads
    [record] = await h.records(0, "squeeze", 1)
    removed = before - after
    cost = 25 * IN + 3000 * READ + 12 * OUT
    assert record.compressed and record.compression_saved_tokens == removed
    assert (record.cost_nano, record.baseline_nano) == (cost, (25 + 3000 + removed) * IN + 12 * OUT)
    assert record.savings == {"compression": removed * IN, "prompt_cache": 3000 * (IN - READ)}
    text = await h.metrics()
    assert metric(text, "gateway_compression_tokens_saved_total", team="squeeze",
                  strategy="clear_tool_outputs") == removed


def controls_in(anthropic_body: dict[str, Any]) -> int:
    return orjson.dumps(anthropic_body).count(b'"cache_control"')
