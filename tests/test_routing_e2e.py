"""Routing end to end: gateway processes in front of several mock upstreams (healthy, slow, failing with 500s,
refusing connections, with a small context window), the official ``openai`` SDK as the client."""

from __future__ import annotations

import asyncio
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from redis.asyncio import Redis
from redis_fixtures import free_port

from conftest import GatewayFactory, Server
from gateway.state.keys import RedisKeyStore
from gateway.state.ledger import RedisLedger

pytestmark = pytest.mark.e2e   # starts gateway processes on the mock upstream

HEALTH = "health: {failures: 3, window_s: 30, cooldown_s: 60, sync_interval_s: 0.2, check_interval_s: 0}"


def dep(name: str, model: str, base: str, price: str = "{input_per_mtok: 1, output_per_mtok: 2}",
        provider: str = "openai", extra: str = "") -> str:
    return (f"      - {{provider: {provider}, name: {name}, model: {model}, api_base: '{base}/v1', "
            f"price: {price}{', ' + extra if extra else ''}}}\n")


def policy(mock: str, routes: str, health: str = HEALTH) -> str:
    closed = f"http://127.0.0.1:{free_port()}"
    models = {
        "healthy": dep("healthy", "mock-healthy", mock),
        "quick": dep("quick", "mock-quick", mock),
        "slowish": dep("slowish", "mock-lat80", mock),
        "slow": dep("slow", "mock-lat400", mock, extra="timeout_s: 2"),
        "hanging": dep("hanging", "mock-lat401", mock, extra="timeout_s: 0.1"),
        "broken": dep("broken", "mock-status500", mock),
        "refused": dep("refused", "mock-refused", closed),
        "tiny": dep("tiny", "mock-ctx20", mock),
        "cut": dep("cut", "mock-cut3", mock),
        "frontier": dep("frontier", "mock-frontier", mock, "{input_per_mtok: 10, output_per_mtok: 30}"),
        "local": dep("local", "mock-local", mock, "{gpu_hour_usd: 3.6, output_tokens_per_second: 1000}", "vllm"),
        "local-down": dep("local-down", "mock-down", closed, "{gpu_hour_usd: 3.6, output_tokens_per_second: 1000}",
                          "vllm"),
    }
    text = "models:\n" + "".join(f"  {name}:\n    deployments:\n{d}" for name, d in models.items())
    return text + "routes:\n" + routes + health + "\n"


ROUTES = """
  - {name: pii-local, match: {contains: [personal_data, secrets]}, candidates: [local]}
  - {name: chain, match: {models: [chain]}, candidates: [refused, broken, hanging, healthy]}
  - {name: limited, match: {models: [limited]}, candidates: [broken, refused, healthy], max_attempts: 2}
  - {name: strict, match: {models: [strict]}, candidates: [broken, healthy], retry_on: [connection]}
  - {name: deadline, match: {models: [deadline]}, candidates: [slow, healthy], deadline_s: 0.2}
  - {name: window, match: {models: [window]}, candidates: [tiny, healthy]}
  - {name: cheap, match: {models: [auto]}, candidates: [frontier, healthy], strategy: cheapest, baseline: frontier}
  - {name: fastest, match: {models: [fastest]}, candidates: [slowish, quick], strategy: latency}
  - {name: no-replay, match: {models: [no-replay]}, candidates: [cut, healthy]}
"""
MSG = [{"role": "user", "content": "hello there"}]


def client_for(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-any", max_retries=0, timeout=20)


def upstream_models(mock: str) -> list[str]:
    return [r["body"].get("model") for r in httpx.get(f"{mock}/_requests").json() if isinstance(r.get("body"), dict)]


def metric(server: Server, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def chat(server: Server, model: str, content: str = "hello there", **kw: Any) -> Any:
    return client_for(server).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], **kw)


def error_of(server: Server, model: str, **kw: Any) -> tuple[int, str, str]:
    with pytest.raises(openai.APIStatusError) as err:
        chat(server, model, **kw)
    body = err.value.body if isinstance(err.value.body, dict) else {}
    return err.value.status_code, str(body.get("code")), str(body.get("message"))


@pytest.fixture
def gw(gateway: GatewayFactory, mock_reset: str) -> Server:
    return gateway(policy(mock_reset, ROUTES))


def test_fallback_order_headers_and_metrics(gw: Server, mock_reset: str) -> None:
    raw = chat(gw, "chain")
    assert raw.headers["x-gateway-route"] == "chain" and raw.headers["x-gateway-model"] == "healthy"
    assert raw.parse().choices[0].message.content
    # refused never reached the mock; broken answered 500; hanging timed out after 0.1 s
    assert upstream_models(mock_reset) == ["mock-status500", "mock-lat401", "mock-healthy"]
    assert metric(gw, "gateway_upstream_errors_total", model="refused", error="connection") == 1
    assert metric(gw, "gateway_upstream_errors_total", model="broken", error="server_error") == 1
    assert metric(gw, "gateway_upstream_errors_total", model="hanging", error="timeout") == 1
    assert metric(gw, "gateway_fallbacks_total", from_model="hanging", to_model="healthy", reason="timeout") == 1


def test_attempt_limit_and_retry_on(gw: Server, mock_reset: str) -> None:
    status, code, message = error_of(gw, "limited")
    assert (status, code) == (502, "upstream_error")
    assert "broken" in message and "refused" in message and "healthy" not in message
    httpx.post(f"{mock_reset}/_reset")
    status, code, _ = error_of(gw, "strict")         # a 500 is not in retry_on: no fallback
    assert (status, code) == (502, "upstream_error")
    assert upstream_models(mock_reset) == ["mock-status500"]


def test_deadline_across_attempts(gw: Server, mock_reset: str) -> None:
    started = time.monotonic()
    status, code, message = error_of(gw, "deadline")
    assert (status, code) == (504, "upstream_timeout") and "deadline" in message
    assert time.monotonic() - started < 2.0           # the slow deployment's own 2 s timeout was cut short
    assert upstream_models(mock_reset) == ["mock-lat400"]   # healthy was never tried: no time left


def test_context_window_rejection_moves_to_a_larger_window(gw: Server, mock_reset: str) -> None:
    raw = chat(gw, "window", " ".join(["word"] * 30))  # > the tiny mock's 20-token window
    assert raw.headers["x-gateway-model"] == "healthy"
    assert upstream_models(mock_reset) == ["mock-ctx20", "mock-healthy"]
    assert chat(gw, "window", "short").headers["x-gateway-model"] == "tiny"


def test_personal_data_stays_local(gw: Server, mock_reset: str) -> None:
    for text in ("mail jane.doe@example.com", "token sk-proj-abcdefghijklmnopqrstuvwxyz0123", "+44 20 7946 0958"):
        raw = chat(gw, "healthy", text)
        assert raw.headers["x-gateway-route"] == "pii-local" and raw.headers["x-gateway-model"] == "local"
    assert chat(gw, "healthy", "nothing private").headers["x-gateway-route"] == "default"
    assert upstream_models(mock_reset) == ["mock-local"] * 3 + ["mock-healthy"]


def test_cheapest_routing_records_savings_against_the_baseline(gw: Server) -> None:
    saved = Decimal(0)
    for _ in range(3):
        raw = chat(gw, "auto")
        usage = raw.parse().usage
        assert raw.headers["x-gateway-model"] == "healthy" and raw.headers["x-gateway-route"] == "cheap"
        cost = Decimal(usage.prompt_tokens * 1 + usage.completion_tokens * 2) / 10**6
        assert Decimal(raw.headers["x-gateway-cost-usd"]) == cost
        baseline = Decimal(usage.prompt_tokens * 10 + usage.completion_tokens * 30) / 10**6
        saved += baseline - cost
    assert metric(gw, "gateway_savings_usd_total", source="routing") == pytest.approx(float(saved), abs=1e-12)


async def test_routing_savings_in_the_ledger(gateway: GatewayFactory, mock_reset: str, redis_port: int) -> None:
    team = f"t{uuid.uuid4().hex[:8]}"
    server = gateway(policy(mock_reset, ROUTES), env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"})
    rc = Redis(host="127.0.0.1", port=redis_port)
    _, secret = await RedisKeyStore(rc).create(team, "savings")
    since = time.time() - 1
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0, timeout=20)
    usages = [(await client.chat.completions.create(model="auto", messages=MSG)).usage for _ in range(3)]
    ledger = RedisLedger(rc)
    deadline = time.monotonic() + 10
    while len(records := await ledger.read(since, team=team)) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert len(records) == 3
    for record, usage in zip(sorted(records, key=lambda r: r.ts), usages, strict=True):
        assert usage is not None
        cost = usage.prompt_tokens * 1000 + usage.completion_tokens * 2000           # nano-USD
        baseline = usage.prompt_tokens * 10_000 + usage.completion_tokens * 30_000
        assert (record.route, record.requested_model, record.model, record.deployment) == \
            ("cheap", "auto", "healthy", "healthy")
        assert (record.cost_nano, record.baseline_nano, record.savings) == (cost, baseline,
                                                                            {"routing": baseline - cost})
    await client.close()
    await rc.aclose()


def test_latency_strategy_prefers_the_faster_deployment(gw: Server) -> None:
    served = [chat(gw, "fastest").headers["x-gateway-model"] for _ in range(8)]
    assert served[0] == "slowish"                      # nothing observed yet: written order
    assert served[1:] == ["quick"] * 7                 # quick (unknown, then ~0 ms) beats slowish (~80 ms)


def test_streams_fall_back_before_the_first_byte_but_never_after(gw: Server, mock_reset: str) -> None:
    stream = client_for(gw).chat.completions.create(model="chain", messages=MSG, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text and upstream_models(mock_reset) == ["mock-status500", "mock-lat401", "mock-healthy"]
    httpx.post(f"{mock_reset}/_reset")
    got: list[str] = []
    with pytest.raises(openai.APIError):
        for chunk in client_for(gw).chat.completions.create(model="no-replay", messages=MSG, stream=True):
            got.extend(c.delta.content or "" for c in chunk.choices)
    assert len(got) >= 1 and upstream_models(mock_reset) == ["mock-cut3"]   # not retried on healthy


def test_health_checks_take_a_dead_local_model_out_of_rotation(gateway: GatewayFactory, mock_reset: str) -> None:
    routes = "  - {name: local-first, match: {models: [auto]}, candidates: [local-down, healthy]}\n"
    health = "health: {failures: 5, cooldown_s: 60, check_interval_s: 0.2, sync_interval_s: 0.1}"
    server = gateway(policy(mock_reset, routes, health))
    deadline = time.monotonic() + 10
    while metric(server, "gateway_deployment_healthy", model="local-down") != 0:   # checked every 0.2 s
        assert time.monotonic() < deadline, "the dead local deployment was never marked unhealthy"
        time.sleep(0.1)
    assert metric(server, "gateway_deployment_healthy", model="healthy") == 1
    before = metric(server, "gateway_upstream_errors_total", model="local-down")
    for _ in range(5):
        assert chat(server, "auto").headers["x-gateway-model"] == "healthy"
    assert metric(server, "gateway_upstream_errors_total", model="local-down") == before   # not even tried


async def test_cooldown_is_shared_by_two_workers(gateway: GatewayFactory, mock_reset: str, redis_port: int) -> None:
    routes = "  - {name: flaky, match: {models: [flaky]}, candidates: [broken, healthy]}\n"
    server = gateway(policy(mock_reset, routes), env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"},
                     args=("--workers", "2"))
    keys = RedisKeyStore(Redis(host="127.0.0.1", port=redis_port))   # the shared Redis may hold other tests' keys
    _, secret = await keys.create("default", "routing-test")
    await keys.aclose()
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0, timeout=20)
    for _ in range(3):                                  # three failures, on whichever workers take them
        raw = await client.chat.completions.with_raw_response.create(model="flaky", messages=MSG)
        assert raw.headers["x-gateway-model"] == "healthy"
    await asyncio.sleep(1.0)                            # a few sync rounds (0.2 s each)
    httpx.post(f"{mock_reset}/_reset")
    workers: set[str] = set()
    for _ in range(10):                                 # bounded: until both workers have answered
        batch = await asyncio.gather(*(client.chat.completions.with_raw_response.create(model="flaky", messages=MSG)
                                       for _ in range(20)))
        workers.update(r.headers["x-request-id"][:16] for r in batch)
        assert all(r.headers["x-gateway-model"] == "healthy" for r in batch)
        if len(workers) >= 2:
            break
    assert len(workers) == 2
    assert "mock-status500" not in upstream_models(mock_reset)   # neither worker tried the broken one
    await client.close()


async def test_hot_reload_under_load(gateway: GatewayFactory, mock_reset: str, tmp_path: Path) -> None:
    server = gateway(policy(mock_reset, "  - {name: first, match: {models: [auto]}, candidates: [healthy]}\n"),
                     env={"GATEWAY_POLICY_WATCH_S": "0.1"})
    policy_dir = tmp_path / "policies0"
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="sk-any", max_retries=0, timeout=20)
    routes_seen: list[str] = []
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def load() -> None:
        for _ in range(400):                            # bounded
            if stop.is_set():
                return
            try:
                raw = await client.chat.completions.with_raw_response.create(model="auto", messages=MSG)
                routes_seen.append(raw.headers["x-gateway-route"])
            except openai.APIError as exc:
                errors.append(exc)

    tasks = [asyncio.create_task(load()) for _ in range(4)]
    await asyncio.sleep(0.5)
    (policy_dir / "zz-routes.yaml").write_text(
        "routes:\n  - {name: second, match: {models: [auto]}, candidates: [quick]}\n")
    await asyncio.sleep(0.2)
    # the new rule comes after "first" in file order, so replace the first file's rule too
    text = (policy_dir / "models.yaml").read_text().replace("name: first", "name: renamed")
    (policy_dir / "models.yaml").write_text(text)
    await asyncio.sleep(1.0)
    (policy_dir / "models.yaml").write_text(text.replace("routes:", "routes:\n  - {name: bad, candidates: [nope]}"))
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks)
    assert not errors and len(routes_seen) > 20
    assert routes_seen[0] == "first" and routes_seen[-1] == "renamed"
    assert set(routes_seen) == {"first", "renamed"}     # the invalid set never took over
    assert "keeping the last good set" in server.output() and "routes[0].candidates" in server.output()
    await client.close()


async def test_a_route_that_costs_more_records_a_negative_saving(gateway: GatewayFactory, mock_reset: str,
                                                                 redis_port: int) -> None:
    """A rule sends `healthy` to the pricier `frontier`: the ledger records baseline - cost < 0 as the routing
    saving, and the savings counter, which cannot go down, holds it as a debt that later savings pay off."""
    routes = ("  - {name: pricier, match: {models: [healthy]}, candidates: [frontier]}\n"
              "  - {name: cheap, match: {models: [auto]}, candidates: [frontier, healthy], strategy: cheapest, "
              "baseline: frontier}\n")
    team = f"t{uuid.uuid4().hex[:8]}"
    server = gateway(policy(mock_reset, routes), env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"})
    rc = Redis(host="127.0.0.1", port=redis_port)
    _, secret = await RedisKeyStore(rc).create(team, "negative-savings")
    since = time.time() - 1
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0, timeout=20)

    async def ask(model: str) -> tuple[Any, Any]:
        raw = await client.chat.completions.with_raw_response.create(model=model, messages=MSG)
        usage = raw.parse().usage
        assert usage is not None
        return raw.headers, usage

    headers, usage = await ask("healthy")
    assert (headers["x-gateway-route"], headers["x-gateway-model"]) == ("pricier", "frontier")
    cost = usage.prompt_tokens * 10_000 + usage.completion_tokens * 30_000       # nano-USD at frontier's prices
    baseline = usage.prompt_tokens * 1000 + usage.completion_tokens * 2000      # healthy: the requested model
    extra = cost - baseline
    assert extra > 0 and Decimal(headers["x-gateway-cost-usd"]) == Decimal(cost) / 10**9
    assert metric(server, "gateway_savings_usd_total", team=team, source="routing") == 0   # never below zero
    # `auto` saves exactly that much (the same tokens, frontier's price as its baseline): the debt is paid off
    headers, same = await ask("auto")
    assert headers["x-gateway-model"] == "healthy"
    assert (same.prompt_tokens, same.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert metric(server, "gateway_savings_usd_total", team=team, source="routing") == 0
    # ... so the next saving counts in full
    headers, again = await ask("auto")
    assert headers["x-gateway-model"] == "healthy"
    assert (again.prompt_tokens, again.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert metric(server, "gateway_savings_usd_total", team=team, source="routing") == \
        pytest.approx(extra / 1e9, abs=1e-12)
    records = sorted(await wait_records(rc, since, team, 3), key=lambda r: r.ts)
    assert [(r.route, r.requested_model, r.model, r.deployment) for r in records] == [
        ("pricier", "healthy", "frontier", "frontier"), ("cheap", "auto", "healthy", "healthy"),
        ("cheap", "auto", "healthy", "healthy")]
    assert [(r.cost_nano, r.baseline_nano, r.savings) for r in records] == [
        (cost, baseline, {"routing": -extra}), (baseline, cost, {"routing": extra}),
        (baseline, cost, {"routing": extra})]
    await client.close()
    await rc.aclose()


async def wait_records(rc: Redis, since: float, team: str, n: int) -> list[Any]:
    """The team's ledger records once ``n`` are written (the writer batches), or what there is after 10 s."""
    ledger = RedisLedger(rc)
    deadline = time.monotonic() + 10
    while len(records := await ledger.read(since, team=team)) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert len(records) == n
    return records
