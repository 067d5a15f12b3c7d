"""Attribution on every ledger record: end user, tags, session, agent; bad values are a clear 400.

In process on the simulated model, through the OpenAI chat codec and the Messages codec.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from inprocess import Gateway, in_process

POLICY = """\
models:
  fast:
    deployments:
      - provider: simulated
        name: fast-sim
        price: {input_per_mtok: 1.0, output_per_mtok: 2.0}
"""
CHAT = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with in_process(tmp_path, POLICY) as gateway:
        yield gateway


async def post(gw: Gateway, body: dict[str, object], headers: dict[str, str],
               path: str = "/v1/chat/completions") -> tuple[int, bytes]:
    key = await gw.key("default")
    return await gw.post(key, body, path, headers=headers)


async def test_dimensions_reach_the_ledger(gw: Gateway) -> None:
    assert (await post(gw, {**CHAT, "user": "body-user"}, {"x-gateway-tags": "batch, nightly,batch",
                                                           "x-gateway-session": "run-7"}))[0] == 200
    assert (await post(gw, {**CHAT, "user": "body-user"}, {"x-gateway-user": "header-user"}))[0] == 200
    messages = {"model": "fast", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                "metadata": {"user_id": "claude-user"}}
    status, _ = await post(gw, messages, {"x-claude-code-session-id": "cc-session", "x-claude-code-agent-id": "a2",
                                          "x-claude-code-parent-agent-id": "a1", "anthropic-version": "2023-06-01"},
                           "/v1/messages")
    assert status == 200
    first, second, third = await gw.records()
    assert (first.user, first.tags, first.session, first.endpoint) == ("body-user", ("batch", "nightly"), "run-7",
                                                                       "chat")
    assert second.user == "header-user"                      # the header wins over the body
    assert (third.endpoint, third.user, third.session, third.agent, third.parent_agent) == \
        ("messages", "claude-user", "cc-session", "a2", "a1")


@pytest.mark.parametrize("headers, body, param", [
    ({"x-gateway-user": "u" * 10_000}, CHAT, "x-gateway-user"),
    ({"x-gateway-tags": "ok,bad\x07tag"}, CHAT, "x-gateway-tags"),
    ({"x-gateway-tags": ",".join(f"t{i}" for i in range(1000))}, CHAT, "x-gateway-tags"),
    ({"x-gateway-session": "s" * 300}, CHAT, "x-gateway-session"),
    ({}, {**CHAT, "user": "x" * 10_000}, "user"),
])
async def test_bad_values_are_a_clear_400(gw: Gateway, headers: dict[str, str], body: dict[str, object],
                                          param: str) -> None:
    status, reply = await post(gw, body, headers)
    assert status == 400 and orjson.loads(reply)["error"]["param"] == param
    assert await gw.records() == []
