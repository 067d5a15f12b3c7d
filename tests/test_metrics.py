"""Prometheus metrics: names and label sets as SPEC section 7, bounded cardinality, budget gauges read
from state at scrape time, the optional /metrics key, and correctness with several workers
(prometheus-client's multiprocess mode). Gateways run as real processes on loopback; keys, budgets
and the ledger live in a private redis-server.
"""

from __future__ import annotations

import asyncio
import glob
import os
import random
import string
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from conftest import GatewayFactory, Server, start_gateway, stop
from gateway.metrics import (
    DURATION_BUCKETS,
    EXTRA_CODES,
    KNOWN_CODES,
    OTHER,
    OVERHEAD_BUCKETS,
    BoundedValues,
    Metrics,
)
from gateway.state.keys import RedisKeyStore
from gateway.state.ledger import LedgerRecord, RedisLedger

DB = 5   # this module's logical database on the session's private redis-server

# SPEC section 7, verbatim: metric -> (type, labels)
SPEC_METRICS = {
    "gateway_requests_total": ("counter", {"team", "model", "provider", "route", "status", "cache"}),
    "gateway_tokens_total": ("counter", {"team", "model", "provider", "type"}),
    "gateway_cost_usd_total": ("counter", {"team", "model", "provider"}),
    "gateway_savings_usd_total": ("counter", {"team", "source"}),
    "gateway_request_duration_seconds": ("histogram", {"team", "model", "provider", "stream"}),
    "gateway_upstream_duration_seconds": ("histogram", {"model", "provider"}),
    "gateway_time_to_first_token_seconds": ("histogram", {"model", "provider"}),
    "gateway_overhead_seconds": ("histogram", {"route"}),
    "gateway_budget_limit_usd": ("gauge", {"team", "period"}),
    "gateway_budget_spent_usd": ("gauge", {"team", "period"}),
    "gateway_budget_rejections_total": ("counter", {"team"}),
    "gateway_rate_limited_total": ("counter", {"team"}),
    "gateway_cache_requests_total": ("counter", {"team", "result"}),
    "gateway_compression_tokens_saved_total": ("counter", {"team", "strategy"}),
    "gateway_fallbacks_total": ("counter", {"from_model", "to_model", "reason"}),
    "gateway_upstream_errors_total": ("counter", {"provider", "model", "error"}),
    "gateway_deployment_healthy": ("gauge", {"model", "provider"}),
}
# the traffic below produces samples for every one of them
EXPECT_SAMPLES = set(SPEC_METRICS)


def policy(suffix: str) -> str:
    return textwrap.dedent(f"""
        models:
          cheap:
            deployments:
              - provider: simulated
                name: cheap-sim
                price: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
                simulated: {{output_tokens: 10}}
          pricey:
            deployments:
              - provider: simulated
                name: pricey-sim
                max_output_tokens: 100
                price: {{input_per_mtok: 100.0, output_per_mtok: 400.0}}
                simulated: {{output_tokens: 20}}
          flaky:
            deployments:
              - provider: simulated
                name: flaky-primary
                weight: 1
                price: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
                simulated: {{output_tokens: 10, failure_rate: 0.5}}
              - provider: simulated
                name: flaky-backup
                weight: 0
                price: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
                simulated: {{output_tokens: 10}}
          broken:
            deployments:
              - provider: simulated
                name: broken-sim
                price: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
                simulated: {{failure_rate: 1.0, failure_status: 500}}
        teams:
          big-{suffix}:
            budgets: [{{period: monthly, usd: 100}}, {{period: daily, usd: 50}}]
            soft_alert: 0.6
          small-{suffix}:
            budgets: [{{period: daily, usd: 0.01}}]
            on_exceed: downgrade
            downgrade_to: cheap
          limited-{suffix}:
            rpm: 3
          tiny-{suffix}:
            budgets: [{{period: daily, usd: 0.0005}}]
        compression:
          teams:
            squeeze-{suffix}:
              enabled: true
              trigger_tokens: 300
              strategies: [clear_tool_outputs]
              keep_first_turns: 0
              keep_last_turns: 1
              keep_tool_outputs: 0
        """)


async def make_key(port: int, team: str) -> str:
    client = Redis(host="127.0.0.1", port=port, db=DB)
    try:
        return (await RedisKeyStore(client).create(team, "metrics-test"))[1]
    finally:
        await client.aclose()


def families(text: str) -> dict[str, tuple[str, list[tuple[str, dict[str, str], float]]]]:
    """Parsed exposition text: family name as exposed (counters with ``_total``) -> (type, samples)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        out[name] = (fam.type, [(s.name, s.labels, s.value) for s in fam.samples])
    return out


def total(fams: dict[str, tuple[str, list[tuple[str, dict[str, str], float]]]], name: str,
          sample: str | None = None) -> float:
    """The sum of family ``name``'s samples called ``sample`` (default: the family's own name)."""
    _, samples = fams.get(name, ("", []))
    return sum(v for n, _, v in samples if n == (sample or name))


async def chat(client: httpx.AsyncClient, key: str, model: str, stream: bool = False, **extra: object) -> int:
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": "hello there"}], **extra}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    resp = await client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
    return resp.status_code


def tool_conversation() -> list[dict[str, object]]:
    """A request over the squeeze team's 300-token trigger, mostly one old tool result."""
    call = {"id": "c1", "type": "function", "function": {"name": "search", "arguments": "{}"}}
    return [{"role": "user", "content": "Find the drills."}, {"role": "assistant", "content": None,
                                                              "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "drill " * 400},
            {"role": "assistant", "content": "Found them."}, {"role": "user", "content": "Which is cheapest?"}]


@pytest.fixture
def suffix() -> str:
    return uuid.uuid4().hex[:8]


async def test_metric_names_and_label_sets_follow_the_spec(gateway: GatewayFactory, redis_port: int,
                                                           suffix: str) -> None:
    server = gateway(policy(suffix), env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/{DB}"})
    big, small, limited, tiny, squeeze = [await make_key(redis_port, f"{t}-{suffix}")
                                          for t in ("big", "small", "limited", "tiny", "squeeze")]
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        statuses = [await chat(c, big, m, stream=s) for m in ("cheap", "flaky", "broken") for s in (False, True)]
        statuses += [await chat(c, big, "cheap", temperature=0) for _ in range(2)]     # cache miss, then hit
        statuses += [await chat(c, squeeze, "cheap", messages=tool_conversation())]    # compressed
        statuses += [await chat(c, small, "pricey") for _ in range(4)]        # capped, then downgraded
        statuses += [await chat(c, tiny, "pricey") for _ in range(2)]         # refused: not even one token fits
        statuses += [await chat(c, limited, "cheap") for _ in range(8)]       # 3 a minute: >= 2 refused
        text = (await c.get("/metrics")).text
    assert 502 in statuses and 429 in statuses and 200 in statuses
    fams = families(text)
    for name, (kind, labels) in SPEC_METRICS.items():
        assert name in fams, f"{name} is not exported"
        assert fams[name][0] == kind, (name, fams[name][0])
        samples = fams[name][1]
        if name in EXPECT_SAMPLES:
            assert samples, f"{name} has no samples"
        for sample, sample_labels, _ in samples:
            extra = {"le"} if sample.endswith("_bucket") else set()
            assert set(sample_labels) == labels | extra, (sample, sample_labels)
    token_types = {lab["type"] for n, lab, _ in fams["gateway_tokens_total"][1]}
    assert token_types <= {"input", "output", "cached_input", "cache_write", "reasoning"}
    assert {"input", "output"} <= token_types
    statuses_seen = {lab["status"] for _, lab, _ in fams["gateway_requests_total"][1]}
    assert {"ok", "upstream_error", "budget_exceeded", "rate_limit_exceeded"} <= statuses_seen
    fallbacks = fams["gateway_fallbacks_total"][1]
    assert {(lab["from_model"], lab["to_model"]) for _, lab, _ in fallbacks} == {("flaky", "flaky")}
    sources = {lab["source"] for _, lab, _ in fams["gateway_savings_usd_total"][1]}
    assert sources == {"routing", "cache", "compression"}   # the downgrade from pricey to cheap, the hit, squeeze
    health = {(lab["model"], lab["provider"]): v for _, lab, v in fams["gateway_deployment_healthy"][1]}
    assert health == {(m, "simulated"): 1.0 for m in ("cheap", "pricey", "flaky", "broken")}
    lookups = {(lab["team"], lab["result"]): v for n, lab, v in fams["gateway_cache_requests_total"][1]
               if n == "gateway_cache_requests_total"}
    assert lookups[(f"big-{suffix}", "miss")] == 1 and lookups[(f"big-{suffix}", "hit")] == 1
    saved = {(lab["team"], lab["strategy"]): v for n, lab, v in fams["gateway_compression_tokens_saved_total"][1]
             if n == "gateway_compression_tokens_saved_total"}
    assert list(saved) == [(f"squeeze-{suffix}", "clear_tool_outputs")] and saved[next(iter(saved))] > 300


async def test_budget_gauges_come_from_the_budget_store_at_scrape_time(gateway: GatewayFactory, redis_port: int,
                                                                       suffix: str) -> None:
    url = f"redis://127.0.0.1:{redis_port}/{DB}"
    first = gateway(policy(suffix), env={"GATEWAY_REDIS_URL": url})
    second = gateway(policy(suffix), env={"GATEWAY_REDIS_URL": url})     # another replica, no traffic at all
    key = await make_key(redis_port, f"big-{suffix}")
    since = time.time() - 1
    async with httpx.AsyncClient(base_url=first.url, timeout=30) as c:
        for i in range(6):
            assert await chat(c, key, "pricey", stream=i % 2 == 1) == 200
    client = Redis(host="127.0.0.1", port=redis_port, db=DB)
    try:
        for _ in range(50):   # the ledger writer batches every 0.1 s
            records = await RedisLedger(client).read(since, team=f"big-{suffix}")
            if len(records) == 6:
                break
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()
    spent = sum(r.cost_nano for r in records)
    assert len(records) == 6 and spent > 0
    for server in (first, second):
        async with httpx.AsyncClient(timeout=10) as c:
            fams = families((await c.get(f"{server.url}/metrics")).text)
        gauges = {(n, lab["team"], lab["period"]): v for name in ("gateway_budget_limit_usd",
                  "gateway_budget_spent_usd", "gateway_budget_soft_limit_usd") for n, lab, v in fams[name][1]}
        team = f"big-{suffix}"
        assert gauges[("gateway_budget_limit_usd", team, "monthly")] == 100.0
        assert gauges[("gateway_budget_limit_usd", team, "daily")] == 50.0
        assert gauges[("gateway_budget_soft_limit_usd", team, "monthly")] == 60.0    # soft_alert 0.6
        assert gauges[("gateway_budget_spent_usd", team, "monthly")] == spent / 1e9
        assert gauges[("gateway_budget_spent_usd", team, "daily")] == spent / 1e9
        assert gauges[("gateway_budget_spent_usd", f"small-{suffix}", "daily")] == 0.0


async def test_cardinality_stays_bounded_with_thousands_of_random_model_names(
        gateway: GatewayFactory, suffix: str) -> None:
    server = gateway(policy(suffix))
    rng = random.Random(7)
    async with httpx.AsyncClient(base_url=server.url, timeout=30,
                                 limits=httpx.Limits(max_connections=32)) as c:
        assert await chat(c, "anything", "cheap") == 200
        assert await chat(c, "anything", "first-unknown") == 404   # its series: status model_not_found, model other
        assert await chat(c, "anything", "second-unknown", stream=True) == 404
        before = families((await c.get("/metrics")).text)
        names = ["".join(rng.choices(string.ascii_lowercase + string.digits + "-/.:", k=rng.randint(3, 60)))
                 for _ in range(3000)]
        sem = asyncio.Semaphore(32)

        async def ask(name: str) -> int:
            async with sem:
                return await chat(c, "anything", name, stream=rng.random() < 0.3)

        statuses = await asyncio.gather(*(ask(n) for n in names))
        assert await chat(c, "anything", "cheap") == 200
        text = (await c.get("/metrics")).text
    assert set(statuses) == {404}
    after = families(text)
    series_before = sum(len(s) for _, s in before.values())
    series_after = sum(len(s) for _, s in after.values())
    assert series_after == series_before             # not one new series for 3000 unknown names
    models = {lab.get("model") for _, samples in after.values() for _, lab, _ in samples} - {None}
    assert models <= {"cheap", "pricey", "flaky", "broken", OTHER}
    assert not any(name in text for name in names if len(name) > 12)


def test_label_values_from_outside_the_policies_are_capped() -> None:
    codes = BoundedValues(EXTRA_CODES, KNOWN_CODES)
    rng = random.Random(3)
    seen = {codes("".join(rng.choices(string.ascii_lowercase, k=12))) for _ in range(5000)}
    assert len(seen) == EXTRA_CODES + 1 and OTHER in seen
    assert codes("budget_exceeded") == "budget_exceeded"       # known codes always keep their value
    assert codes("x" * 200) == OTHER and codes("bad code with spaces") == OTHER and codes(None) == OTHER
    teams = BoundedValues(2, {"research"})
    assert [teams(t) for t in ("research", "a", "b", "c", "a")] == ["research", "a", "b", OTHER, "a"]


def done(**fields: Any) -> LedgerRecord:
    """A finished request's ledger record, served by deployment ``p/m`` of model ``m`` to team ``t``."""
    base: dict[str, Any] = dict(request_id="r", ts=0.0, team="t", key_id=None, requested_model="m", model="m",
                                deployment="p/m", provider="p", route="default", input_tokens=0, output_tokens=0)
    return LedgerRecord(**(base | fields))


def test_tallied_requests_render_exactly_what_direct_updates_would() -> None:
    """request_done adds to plain tallies; what a scrape shows equals prometheus-client fed one by one."""
    rng = random.Random(5)
    metrics = Metrics()
    metrics.set_known_models(["m"])
    metrics.set_known_teams(["t"])
    reference = CollectorRegistry()
    duration = Histogram("ref_duration_seconds", "", ["team"], buckets=DURATION_BUCKETS, registry=reference)
    ttft = Histogram("ref_ttft_seconds", "", ["team"], buckets=DURATION_BUCKETS, registry=reference)
    cost_nano = output = ttfts = 0
    values = [rng.choice(DURATION_BUCKETS) * rng.choice((0.5, 1.0, 1.5)) for _ in range(300)] + [0.0, 1e6]
    for i, seconds in enumerate(values):      # bounds themselves, between them, 0 and beyond the last
        first = seconds / 3 if i % 3 == 0 else None
        metrics.request_done(done(stream=first is not None, latency_ms=seconds * 1000,
                                  ttft_ms=None if first is None else first * 1000, input_tokens=7, output_tokens=i,
                                  cost_nano=1_000 + i), upstream_s=seconds / 2, cache_looked_up=False)
        duration.labels("t").observe(seconds)
        if first is not None:
            ttft.labels("t").observe(first)
            ttfts += 1
        cost_nano, output = cost_nano + 1_000 + i, output + i
    labels = {"team": "t", "model": "m", "provider": "p", "route": "default", "status": "ok", "cache": "bypass"}
    assert metrics.registry.get_sample_value("gateway_requests_total", labels) == len(values)   # no loop: at once
    fams = families(metrics.render().decode())
    ref = families(generate_latest(reference).decode())

    def buckets(f: dict[str, Any], name: str, sample: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for n, lab, v in f[name][1]:
            if n == sample:
                out[lab["le"]] = out.get(lab["le"], 0.0) + v
        return out
    assert buckets(fams, "gateway_request_duration_seconds", "gateway_request_duration_seconds_bucket") == \
        buckets(ref, "ref_duration_seconds", "ref_duration_seconds_bucket")
    assert buckets(fams, "gateway_time_to_first_token_seconds", "gateway_time_to_first_token_seconds_bucket") == \
        buckets(ref, "ref_ttft_seconds", "ref_ttft_seconds_bucket")
    assert total(fams, "gateway_request_duration_seconds", "gateway_request_duration_seconds_sum") == \
        pytest.approx(sum(values))
    assert total(fams, "gateway_requests_total") == len(values)
    assert total(fams, "gateway_time_to_first_token_seconds", "gateway_time_to_first_token_seconds_count") == ttfts
    assert total(fams, "gateway_cost_usd_total") == pytest.approx(cost_nano / 1e9, abs=1e-12)
    tokens = {lab["type"]: v for n, lab, v in fams["gateway_tokens_total"][1] if n == "gateway_tokens_total"}
    assert tokens == {"input": 7 * len(values), "output": output}


async def test_tallies_reach_the_series_within_the_flush_interval_without_a_scrape() -> None:
    metrics = Metrics()
    metrics.request_done(done(latency_ms=10.0, cost_nano=5), upstream_s=0.005, cache_looked_up=False)
    labels = {"team": "t", "model": OTHER, "provider": "p", "route": "default", "status": "ok", "cache": "bypass"}
    assert not metrics.registry.get_sample_value("gateway_requests_total", labels)   # tallied, not yet added
    deadline = time.monotonic() + 15
    while not metrics.registry.get_sample_value("gateway_requests_total", labels) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert metrics.registry.get_sample_value("gateway_requests_total", labels) == 1.0
    assert metrics.registry.get_sample_value("gateway_cost_usd_total", {"team": "t", "model": OTHER,
                                                                         "provider": "p"}) == 5e-9


def test_buckets_resolve_sub_millisecond_overhead_and_minute_long_generations() -> None:
    assert sum(b < 0.001 for b in OVERHEAD_BUCKETS) >= 5 and min(OVERHEAD_BUCKETS) <= 0.0001
    assert sum(b < 0.001 for b in DURATION_BUCKETS) >= 3
    assert sum(60 <= b <= 600 for b in DURATION_BUCKETS) >= 3 and max(DURATION_BUCKETS) >= 600
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)


async def test_metrics_key_is_required_when_set(gateway: GatewayFactory, suffix: str) -> None:
    server = gateway(policy(suffix), env={"GATEWAY_METRICS_KEY": "scrape-secret"})
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        missing = await c.get("/metrics")
        wrong = await c.get("/metrics", headers={"authorization": "Bearer nope"})
        right = await c.get("/metrics", headers={"authorization": "Bearer scrape-secret"})
        open_ = await c.get("/health/live")
    for resp in (missing, wrong):
        assert resp.status_code == 401
        error = resp.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        assert "GATEWAY_METRICS_KEY" in error["message"]
    assert right.status_code == 200 and "gateway_requests_total" in right.text
    assert open_.status_code == 200


# ---------------------------------------------------------------------------------- several workers

def write_stale_metrics(directory: Path) -> None:
    """What a crashed earlier run leaves behind: a worker file counting 1000 requests."""
    code = textwrap.dedent("""
        from prometheus_client import CollectorRegistry, Counter
        c = Counter("gateway_requests", "x", ["team", "model", "provider", "route", "status", "cache"],
                    registry=CollectorRegistry())
        c.labels("stale", "cheap", "simulated", "default", "ok", "bypass").inc(1000)
        """)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert glob.glob(str(directory / "*.db"))


@pytest.fixture
def workers_gateway(tmp_path: Path, redis_port: int) -> Iterator[tuple[Server, Path, str]]:
    suffix = uuid.uuid4().hex[:8]
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (policy_dir / "models.yaml").write_text(policy(suffix))
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    write_stale_metrics(metrics_dir)
    env = {"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/{DB}", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    server = start_gateway(policy_dir, tmp_path / "gateway.log", env, ("--workers", "3"))
    try:
        yield server, metrics_dir, suffix
    finally:
        stop(server.proc)


async def test_every_worker_reports_the_sum_over_all_workers(workers_gateway: tuple[Server, Path, str],
                                                             redis_port: int) -> None:
    server, metrics_dir, suffix = workers_gateway
    key = await make_key(redis_port, f"big-{suffix}")
    statuses: list[int] = []
    pids: set[str] = set()
    for _ in range(40):   # rounds on new connections until at least two workers have served some
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=8)) as c:
            statuses += await asyncio.gather(*(chat(c, key, "cheap", stream=i % 3 == 0) for i in range(6)))
        pids = {Path(f).stem.rsplit("_", 1)[-1] for f in glob.glob(str(metrics_dir / "*.db"))}
        if len(pids) >= 2 and len(statuses) >= 60:
            break
    sent = len(statuses)
    assert set(statuses) == {200}
    assert len(pids) >= 2, f"only one worker served the traffic: {pids}"   # the sum really spans workers
    deadline = time.monotonic() + 15   # each worker adds its last requests within FLUSH_S of them
    while True:
        async with httpx.AsyncClient(timeout=10) as c:
            fams = families((await c.get(f"{server.url}/metrics")).text)
        if total(fams, "gateway_requests_total") >= sent or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    scraped = []
    for _ in range(12):   # a new connection each time: the kernel spreads them over the workers
        async with httpx.AsyncClient(timeout=10) as c:
            scraped.append(families((await c.get(f"{server.url}/metrics")).text))
    for fams in scraped:
        requests = [(lab, v) for n, lab, v in fams["gateway_requests_total"][1] if n == "gateway_requests_total"]
        assert all(lab["team"] != "stale" for lab, _ in requests)              # the old run's file was removed
        assert sum(v for _, v in requests) == sent
        assert total(fams, "gateway_request_duration_seconds", "gateway_request_duration_seconds_count") == sent
        assert total(fams, "gateway_time_to_first_token_seconds",
                     "gateway_time_to_first_token_seconds_count") == sent // 3   # every third streamed
        spent = {lab["period"]: v for _, lab, v in fams["gateway_budget_spent_usd"][1]
                 if lab["team"] == f"big-{suffix}"}
        assert spent["monthly"] == spent["daily"] > 0
        assert abs(spent["monthly"] - total(fams, "gateway_cost_usd_total")) < 1e-9   # the team's only traffic
        healthy = fams["gateway_deployment_healthy"][1]
        assert len(healthy) == 4 and all(v == 1.0 for _, _, v in healthy)   # once per scrape, not per worker
    costs = {round(total(f, "gateway_cost_usd_total"), 12) for f in scraped}
    assert len(costs) == 1


@pytest.mark.e2e
async def test_serve_makes_and_removes_its_own_metrics_dir(tmp_path: Path, redis_port: int) -> None:
    suffix = uuid.uuid4().hex[:8]
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (policy_dir / "models.yaml").write_text(policy(suffix))
    key = await make_key(redis_port, f"big-{suffix}")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/{DB}", "TMPDIR": str(scratch)}
    server = start_gateway(policy_dir, tmp_path / "gateway.log", env, ("--workers", "2"))
    try:
        made = glob.glob(str(scratch / "gateway-metrics-*"))
        assert len(made) == 1
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            assert await chat(c, key, "cheap") == 200
        # a request's metrics are written just after its reply is sent: wait for the worker's file
        deadline = time.monotonic() + 120   # guards against a hang only
        while not glob.glob(made[0] + "/*.db") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert glob.glob(made[0] + "/*.db")
    finally:
        stop(server.proc, grace=120)   # a clean exit (which removes the directory) may be slow on a busy machine
    assert not glob.glob(str(scratch / "gateway-metrics-*"))
    assert server.proc.returncode == 0, server.output()


@pytest.mark.e2e
def test_single_worker_ignores_a_multiprocess_dir(tmp_path: Path) -> None:
    """One process keeps metrics in memory even when PROMETHEUS_MULTIPROC_DIR points nowhere."""
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (policy_dir / "models.yaml").write_text(policy(uuid.uuid4().hex[:8]))
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "does-not-exist")}
    server = start_gateway(policy_dir, tmp_path / "gateway.log", env)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            for _ in range(3):
                assert c.post("/v1/chat/completions", headers={"authorization": "Bearer x"},
                              json={"model": "cheap", "messages": [{"role": "user", "content": "hi"}]}
                              ).status_code == 200
            fams = families(c.get("/metrics").text)
        assert total(fams, "gateway_requests_total") == 3
    finally:
        stop(server.proc)
    assert not (tmp_path / "does-not-exist").exists()

