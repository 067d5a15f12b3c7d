"""The request path across a policy reload and on its error replies: a request finishes on the
policies it started with, and a reply refused or failed after routing still names the rule that
decided (``x-gateway-route``). Real gateway processes, the mock upstream, the ``openai`` SDK.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest
from test_routing_e2e import MSG, dep, policy

from conftest import GatewayFactory

pytestmark = pytest.mark.e2e   # starts gateway processes on the mock upstream


def with_model(text: str, name: str, deployment: str) -> str:
    return text.replace("routes:\n", f"  {name}:\n    deployments:\n{deployment}routes:\n", 1)


async def test_error_replies_after_routing_name_the_rule(gateway: GatewayFactory, mock_reset: str) -> None:
    routes = ("  - {name: all-down, match: {models: [down]}, candidates: [broken, refused]}\n"
              "  - {name: to-healthy, match: {models: [auto]}, candidates: [healthy]}\n")
    plain = policy(mock_reset, routes)
    broke = plain + "teams:\n  default: {budgets: [{period: daily, usd: 0.000000001}]}\n"
    for text, model, status, code, route in ((plain, "down", 502, "upstream_error", "all-down"),
                                             (broke, "auto", 429, "budget_exceeded", "to-healthy")):
        client = openai.AsyncOpenAI(base_url=f"{gateway(text).url}/v1", api_key="sk-any", max_retries=0, timeout=20)
        try:
            await client.chat.completions.create(model=model, messages=MSG)
            raise AssertionError(f"{model} was answered")
        except openai.APIStatusError as exc:
            assert (exc.status_code, exc.code) == (status, code)
            assert exc.response.headers["x-gateway-route"] == route
            assert exc.response.headers["x-request-id"]
    try:   # refused before routing: no rule decided anything
        await client.chat.completions.create(model="no-such-model", messages=MSG)
        raise AssertionError("an unknown model was answered")
    except openai.NotFoundError as exc:
        assert "x-gateway-route" not in exc.response.headers
    await client.close()


async def test_in_flight_requests_finish_on_the_policies_they_started_with(
        gateway: GatewayFactory, mock_reset: str, tmp_path: Path) -> None:
    routes = "  - {name: first, match: {models: [auto]}, candidates: [sleepy]}\n"
    text = with_model(policy(mock_reset, routes), "sleepy", dep("sleepy", "mock-lat2000", mock_reset))
    server = gateway(text, env={"GATEWAY_POLICY_WATCH_S": "0.05"})
    models_file = tmp_path / "policies0" / "models.yaml"
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="sk-any", max_retries=0, timeout=20)
    in_flight = asyncio.create_task(client.chat.completions.with_raw_response.create(model="auto", messages=MSG))
    await asyncio.sleep(0.2)
    swapped = with_model(text, "probe", dep("probe", "mock-probe", mock_reset))
    models_file.write_text(swapped.replace("{name: first, match: {models: [auto]}, candidates: [sleepy]}",
                                           "{name: second, match: {models: [auto]}, candidates: [quick]}"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:   # bounded: the watcher swaps within ~0.1 s
        if "probe" in [m.id async for m in client.models.list()]:
            break
        await asyncio.sleep(0.02)
    raw = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG)
    assert (raw.headers["x-gateway-route"], raw.headers["x-gateway-model"]) == ("second", "quick")
    assert not in_flight.done()                 # the swap happened while the first request was in flight
    first = await in_flight
    assert (first.headers["x-gateway-route"], first.headers["x-gateway-model"]) == ("first", "sleepy")
    assert first.parse().choices[0].message.content
    await client.close()
