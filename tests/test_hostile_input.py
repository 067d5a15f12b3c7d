"""Hostile and malformed input, in process: a clear 4xx in the API's shape, never a 5xx, never a hold left.

Regression cases from the attack run (issue 11: deep nesting past what an upstream call can be
serialised with, a ``max_tokens`` whose worst case passes 2^53 nano-USD, a list as a role,
non-iterable ``messages`` on the completions and embeddings endpoints), then property-based
fuzzing of every proxy endpoint's body with ``hypothesis``, each request checked for its status
class, its envelope and the team's reserved budget afterwards.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inprocess import Gateway, in_process

POLICY = """\
models:
  fast:
    deployments:
      - provider: simulated
        name: fast-sim
        price: {input_per_mtok: 1.0, output_per_mtok: 2.0}
        simulated: {output_tokens: 4}
  embed:
    deployments:
      - provider: simulated
        name: embed-sim
        model: text-embed-sim
        capabilities: [embeddings]
        price: {input_per_mtok: 0.1, output_per_mtok: 0}
teams:
  paying:
    budgets: [{period: daily, usd: 50}]
"""
PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
BASE = b'{"model":"fast","messages":[{"role":"user","content":"hi"}]'


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with in_process(tmp_path, POLICY) as gateway:
        yield gateway


def nested(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


@pytest.mark.parametrize("raw, path, param", [
    (BASE + b',"metadata":{"x":' + nested(254) + b"}}", PATHS[0], "body"),
    (BASE + b',"stream":true,"extra":' + nested(300) + b"}", PATHS[0], "body"),
    (BASE + b',"extra":' + nested(1000) + b"}", PATHS[0], "body"),
    (BASE + b',"max_tokens":9007199254740993}', PATHS[0], "max_tokens"),
    (BASE + b',"max_completion_tokens":100000000000000000000}', PATHS[0], "max_completion_tokens"),
    (b'{"model":"fast","messages":[{"role":["user"],"content":"hi"}]}', PATHS[0], "messages[0].role"),
    (b'{"model":"fast","messages":[{"role":{"a":1},"content":"hi"}]}', PATHS[0], "messages[0].role"),
])
async def test_attack_inputs_get_a_400_and_hold_nothing(gw: Gateway, raw: bytes, path: str, param: str) -> None:
    key = await gw.key("paying")
    status, body = await gw.post(key, raw, path)
    assert status == 400, body
    assert orjson.loads(body)["error"]["param"] == param
    assert await gw.reserved("paying") == 0 and not gw.settles
    assert (await gw.post(key, {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}))[0] == 200


@pytest.mark.parametrize("raw, path", [
    (b'{"model":"fast","prompt":"x","messages":5}', PATHS[1]),
    (b'{"model":"fast","prompt":"x","messages":5,"stream":true}', PATHS[1]),
    (b'{"model":"embed","input":"x","messages":5}', PATHS[2]),
    (b'{"model":"embed","input":"x","messages":{"a":1},"stream":true}', PATHS[2]),
])
async def test_foreign_fields_on_other_endpoints_are_passed_not_read(gw: Gateway, raw: bytes, path: str) -> None:
    key = await gw.key("paying")
    status, body = await gw.post(key, raw, path)
    assert status == 200, body
    assert await gw.reserved("paying") == 0


# ---------------------------------------------------------------- property-based fuzzing
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=20)
message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]),
                                                   json_value),
                                 "content": st.one_of(st.text(max_size=50), json_value)})
fields = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.sampled_from(["fast", "embed", "nope"]), json_value),
    "messages": st.one_of(st.lists(message, max_size=3), json_value),
    "prompt": st.one_of(st.text(max_size=30), json_value),
    "input": st.one_of(st.text(max_size=30), json_value),
    "stream": st.one_of(st.booleans(), json_value),
    "stream_options": json_value,
    "max_tokens": st.one_of(st.integers(min_value=-5, max_value=2**64), json_value),
    "n": st.one_of(st.integers(min_value=-2, max_value=200), json_value),
    "tools": json_value,
    "temperature": json_value,
    "response_format": json_value,
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(fields, json_value), path=st.sampled_from(PATHS))
async def test_fuzzed_bodies_never_get_a_5xx_nor_leave_a_hold(gw: Gateway, body: Any, path: str) -> None:
    key = await gw.key("paying")
    status, reply = await gw.post(key, json.dumps(body).encode(), path)
    assert status < 500, (status, reply)
    if status >= 400:
        error = orjson.loads(reply)["error"]
        assert isinstance(error["message"], str) and error["type"]
    assert await gw.reserved("paying") == 0


async def test_the_api_schema_is_not_served(gw: Gateway) -> None:
    """``/openapi.json`` used to list the admin API to anyone (issue 11, item 9)."""
    import httpx
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:
        for path in ("/openapi.json", "/docs", "/redoc"):
            reply = await client.get(path)
            assert reply.status_code == 404 and "admin" not in reply.text
