"""The simulated provider's knobs, called directly through the provider interface (``complete``/``stream``).

Each test builds its deployment from a policy file (the ``simulated:`` section is parsed the way
``gateway serve`` parses it), then calls :class:`SimulatedProvider` with a :class:`Call`. Timings
are checked as lower bounds only, with generous slack.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import UpstreamError, UpstreamRateLimited
from gateway.policy import Deployment, load_policies
from gateway.providers.base import Call
from gateway.providers.simulated import SimulatedProvider

SLACK = 0.8   # a measured duration must be at least this share of the configured one
HELLO = [{"role": "user", "content": "hello"}]


def deployment(tmp_path: Path, simulated: str, name: str = "sim") -> Deployment:
    """One simulated deployment whose ``simulated:`` section is the flow mapping ``simulated``."""
    config = tmp_path / f"policies-{name}"
    config.mkdir()
    (config / "models.yaml").write_text(
        f"models:\n  {name}:\n    deployments:\n      - provider: simulated\n"
        f"        model: sim-1\n        simulated: {simulated}\n")
    return load_policies(str(config)).models[name].deployments[0]


def call(d: Deployment, endpoint: str = "chat", **body: Any) -> Call:
    if endpoint == "chat":
        body.setdefault("messages", HELLO)
    elif endpoint == "completions":
        body.setdefault("prompt", "hello")
    return Call(endpoint, {"model": d.upstream_model, **body}, d, 30.0)


async def content_chunks(provider: SimulatedProvider, c: Call) -> list[tuple[float, str]]:
    """(seconds since the call, content) of every chunk that carries text."""
    started = time.perf_counter()
    out = []
    async for chunk in provider.stream(c):
        for choice in chunk["choices"]:
            text = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
            if text:
                out.append((time.perf_counter() - started, text))
    return out


async def test_output_length_and_its_cap(tmp_path: Path) -> None:
    d = deployment(tmp_path, "{output_tokens: 7}")
    p = SimulatedProvider()
    full = await p.complete(call(d))
    text = full["choices"][0]["message"]["content"]
    assert len(text.split()) == 7 and full["choices"][0]["finish_reason"] == "stop"
    assert full["usage"]["completion_tokens"] == 7
    capped = await p.complete(call(d, max_tokens=3))
    assert len(capped["choices"][0]["message"]["content"].split()) == 3
    assert capped["choices"][0]["finish_reason"] == "length" and capped["usage"]["completion_tokens"] == 3
    two = await p.complete(call(d, n=2))
    assert len(two["choices"]) == 2 and two["usage"]["completion_tokens"] == 14
    legacy = await p.complete(call(d, "completions", max_completion_tokens=5))
    assert len(legacy["choices"][0]["text"].split()) == 5 and legacy["usage"]["completion_tokens"] == 5

    streamed = await content_chunks(p, call(d, stream=True))
    assert len(streamed) == 7 and "".join(t for _, t in streamed) == text   # one token per chunk, same answer
    chunks = [c async for c in p.stream(call(d, stream=True, max_tokens=4, stream_options={"include_usage": True}))]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "length"


async def test_latency_delays_the_answer(tmp_path: Path) -> None:
    p = SimulatedProvider()
    slow = deployment(tmp_path, "{latency_ms: 200}", "slow")
    started = time.perf_counter()
    reply = await p.complete(call(slow))
    assert time.perf_counter() - started >= 0.2 * SLACK
    assert reply["choices"][0]["message"]["content"]


async def test_ttft_delays_the_first_chunk(tmp_path: Path) -> None:
    p = SimulatedProvider()
    d = deployment(tmp_path, "{ttft_ms: 200, output_tokens: 3}")
    chunks = await content_chunks(p, call(d, stream=True))
    assert len(chunks) == 3 and chunks[0][0] >= 0.2 * SLACK


async def test_tokens_per_second_paces_the_stream(tmp_path: Path) -> None:
    p = SimulatedProvider()
    d = deployment(tmp_path, "{tokens_per_second: 50, output_tokens: 6}")   # 20 ms between tokens
    chunks = await content_chunks(p, call(d, stream=True))
    assert len(chunks) == 6
    assert chunks[-1][0] - chunks[0][0] >= 5 * 0.02 * SLACK   # five gaps after the first token
    gaps = [b[0] - a[0] for a, b in zip(chunks, chunks[1:], strict=False)]
    assert all(gap >= 0.02 * SLACK for gap in gaps), gaps


async def test_fail_after_tokens_cuts_the_stream(tmp_path: Path) -> None:
    p = SimulatedProvider()
    d = deployment(tmp_path, "{fail_after_tokens: 3, output_tokens: 10}")
    received: list[str] = []
    with pytest.raises(UpstreamError) as err:
        async for chunk in p.stream(call(d, stream=True)):
            received.extend(c["delta"]["content"] for c in chunk["choices"] if c["delta"].get("content"))
    assert len(received) == 3 and "cut" in err.value.message
    assert len((await p.complete(call(d)))["choices"][0]["message"]["content"].split()) == 10   # only streams


async def _outcomes(p: SimulatedProvider, d: Deployment, count: int) -> list[str]:
    out = []
    for i in range(count):
        try:
            if i % 2:
                [c async for c in p.stream(call(d, stream=True))]
            else:
                await p.complete(call(d))
            out.append("ok")
        except UpstreamRateLimited:
            out.append("429")
    return out


async def test_failure_rate_is_deterministic(tmp_path: Path) -> None:
    d = deployment(tmp_path, "{failure_rate: 0.3, failure_status: 429, output_tokens: 2}")
    first = await _outcomes(SimulatedProvider(), d, 20)
    second = await _outcomes(SimulatedProvider(), d, 20)
    assert first == second                       # the same sequence in every fresh instance
    assert first.count("429") == 6               # 30 % of 20 calls, exactly
    assert first[:4] == ["ok", "ok", "ok", "429"]   # spread out, not bunched at the start
    always = SimulatedProvider()
    down = deployment(tmp_path, "{failure_rate: 1.0}", "down")   # failure_status defaults to 503
    for _ in range(3):
        with pytest.raises(UpstreamError) as err:
            await always.complete(call(down))
        assert "HTTP 503" in err.value.message and not isinstance(err.value, UpstreamRateLimited)


async def test_instances_are_independent(tmp_path: Path) -> None:
    """A provider's failure sequence does not depend on other instances running at the same time."""
    d = deployment(tmp_path, "{failure_rate: 0.5, failure_status: 429, output_tokens: 1}")
    together = await asyncio.gather(_outcomes(SimulatedProvider(), d, 6), _outcomes(SimulatedProvider(), d, 6))
    assert together[0] == together[1] == ["ok", "429"] * 3


async def test_structured_output_and_tool_arguments_stay_within_max_tokens(tmp_path: Path) -> None:
    d = deployment(tmp_path, "{output_tokens: 50}")
    p = SimulatedProvider()
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "array", "minItems": 9,
                                                                                "items": {"type": "integer"}}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    whole = await p.complete(call(d, response_format=fmt))
    assert whole["choices"][0]["finish_reason"] == "stop" and whole["usage"]["completion_tokens"] > 5
    capped = await p.complete(call(d, response_format=fmt, max_tokens=5))
    text = capped["choices"][0]["message"]["content"]
    assert capped["choices"][0]["finish_reason"] == "length" and 0 < capped["usage"]["completion_tokens"] <= 5
    assert whole["choices"][0]["message"]["content"].startswith(text)
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    args = (await p.complete(call(d, tools=[tool], max_tokens=4)))["choices"][0]
    assert args["finish_reason"] == "length" and len(args["message"]["tool_calls"][0]["function"]["arguments"]) < 30
    chunks = [c async for c in p.stream(call(d, stream=True, response_format=fmt, max_tokens=5,
                                             stream_options={"include_usage": True}))]
    streamed = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert streamed == text and chunks[-1]["usage"]["completion_tokens"] == capped["usage"]["completion_tokens"]
