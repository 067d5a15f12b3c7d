"""``gateway demo`` as a user runs it (a real process, a shortened run), its policy set, and the simulated
provider's prompt caching the demo relies on for its long conversations."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from conftest import ROOT, free_port
from gateway.demo.runner import DEMO_POLICIES, TEAMS
from gateway.demo.traffic import TEAM_MIX
from gateway.policy import load_policies
from gateway.pricing import Usage, cost_nano, usage_from_openai
from gateway.providers.base import Call
from gateway.providers.simulated import PROMPT_CACHE_MIN_TOKENS, PROMPT_CACHE_STEP, SimulatedProvider


def run_demo(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "gateway", "demo", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT), env=full_env)


def test_demo_policy_set_has_what_the_demo_promises() -> None:
    policies = load_policies(str(DEMO_POLICIES))
    models = {spec.name: spec for spec in policies.unique_models()}
    prices = {d.price.output for spec in models.values() for d in spec.deployments if d.price.output}
    assert len(prices) >= 4                                                    # different prices
    gpu = [d for d in policies.deployments if d.self_hosted]
    assert gpu and gpu[0].price_source == "policy" and gpu[0].model == "local-llama"
    sims = [d.simulated for d in policies.deployments if d.simulated]
    assert any(s.failure_rate > 0 for s in sims) and any(s.latency_ms >= 1000 for s in sims)
    first, backup = models["resilient"].deployments
    assert first.simulated and first.simulated.failure_rate > 0 and first.weight > 0 == backup.weight
    teams = policies.teams
    assert set(TEAMS) <= set(teams) and set(TEAM_MIX) == set(TEAMS)
    assert teams["support"].on_exceed == "downgrade" and teams["support"].downgrade_to == "workhorse"
    assert teams["marketing"].on_exceed == "block" and teams["platform"].rpm
    for team, mix in TEAM_MIX.items():                                         # every step names a real model
        assert all(step.model in models and teams[team].allows(step.model) for step in mix)


@pytest.mark.e2e
def test_demo_refuses_workers_without_redis_and_a_bad_duration() -> None:
    no_redis = run_demo("--workers", "2", "--duration", "1", "--port", str(free_port()))
    assert no_redis.returncode == 2 and "needs shared state" in no_redis.stderr
    bad = run_demo("--duration", "0", "--port", str(free_port()))
    assert bad.returncode == 2 and "--duration" in bad.stderr


def summary_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.split("Budgets now:")[0].splitlines():
        parts = line.split()
        if parts and parts[0] in (*TEAMS, "total"):
            rows[parts[0]] = parts
    return rows


@pytest.mark.e2e
def test_demo_runs_in_one_process_with_no_key_and_no_redis() -> None:
    result = run_demo("--duration", "8", "--port", str(free_port()))
    assert result.returncode == 0, result.stderr[-3000:]
    out, err = result.stdout, result.stderr
    assert "1 worker, in-memory state" in err
    progress = [line for line in err.splitlines() if line.startswith("demo [")]
    assert len(progress) >= 3 and "#" * 30 in progress[-1]                # the bar fills up
    rows = summary_rows(out)
    assert set(rows) == {*TEAMS, "total"}
    requests = {team: int(rows[team][1]) for team in TEAMS}
    assert all(n > 0 for n in requests.values()), requests
    header = re.search(r"Spend by team \(from the ledger\), (\d+) requests in", out)
    assert header and int(header.group(1)) == int(rows["total"][1]) == sum(requests.values())   # one count
    summaries = {team: int(rows[team][6]) for team in TEAMS}
    assert int(rows["total"][6]) == sum(summaries.values())
    assert "summaries = compression summary calls the gateway made" in out
    records = re.search(r"The ledger holds (\d+) records for this run: the (\d+) requests and the (\d+) "
                        r"summaries\.", out)
    assert records and int(records.group(1)) == sum(requests.values()) + sum(summaries.values()), out
    spend = {team: Decimal(rows[team][7]) for team in TEAMS}
    assert all(v > 0 for v in spend.values()) and Decimal(rows["total"][-2]) == sum(spend.values())
    assert "/metrics" not in out and "The gateway has stopped; run with --keep-serving" in out
    charged = re.search(r"Clients were charged \$([0-9.]+) in all .* that is \$([0-9.]+), and the ledger says "
                        r"\$([0-9.]+)\.", out)
    assert charged, out
    # returned cost_usd plus the compression summaries the gateway ran = the ledger, to the nano-dollar
    assert Decimal(charged.group(2)) == Decimal(charged.group(3)) == sum(spend.values())
    assert Decimal(charged.group(1)) <= Decimal(charged.group(2))
    assert "Budgets now:" in out and "marketing  daily" in out


# ------------------------------------------------------------------ the simulated provider's prompt cache

def call(messages: list[dict[str, str]], deployment_name: str = "workhorse-sim") -> Call:
    policies = load_policies(str(DEMO_POLICIES))
    deployment = next(d for d in policies.deployments if d.id == deployment_name)
    assert deployment.simulated is not None
    # answered at once: what these tests check is the usage, not the demo's simulated pace (up to 2.5 s)
    deployment = replace(deployment, simulated=replace(deployment.simulated, latency_ms=0, ttft_ms=0))
    return Call("chat", {"model": deployment.upstream_model, "messages": messages}, deployment, 30.0)


def long_text(n: int) -> str:
    return " ".join(f"word{i % 97}" for i in range(n))


async def test_simulated_prompt_cache_reports_prefixes_seen_before() -> None:
    sim = SimulatedProvider()
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": long_text(900)}]
    first = await sim.complete(call(history))
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0     # nothing seen yet
    history += [first["choices"][0]["message"], {"role": "user", "content": long_text(300)}]
    second = await sim.complete(call(history))
    usage = second["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert cached >= PROMPT_CACHE_MIN_TOKENS and cached % PROMPT_CACHE_STEP == 0
    assert cached < usage["prompt_tokens"]
    parsed = usage_from_openai(usage)
    assert parsed is not None and parsed.cached_input_tokens == cached
    deployment = call(history).deployment
    assert deployment.price.cache_read < deployment.price.input
    uncached = cost_nano(Usage(input_tokens=parsed.input_tokens, output_tokens=parsed.output_tokens),
                         deployment.price)
    assert cost_nano(parsed, deployment.price) < uncached                  # cache reads are cheaper
    # another deployment has its own cache; a stream reports the same prefix
    other = await sim.complete(call(history, "frontier-sim"))
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    stream_call = call(history)
    stream_call.body["stream_options"] = {"include_usage": True}
    chunks = [chunk async for chunk in sim.stream(stream_call)]
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= cached


async def test_simulated_prompt_cache_is_off_unless_asked_and_needs_long_prompts() -> None:
    sim = SimulatedProvider()
    short = [{"role": "user", "content": "hello"}]
    for _ in range(2):
        reply = await sim.complete(call(short))
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 0     # under the minimum
    long = [{"role": "user", "content": long_text(1500)}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "more"}]
    for _ in range(2):
        reply = await sim.complete(call(long, "reasoner-sim"))             # prompt_cache not enabled there
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


@pytest.mark.parametrize("path", ["models.yaml", "teams.yaml"])
def test_demo_policies_ship_with_the_package(path: str) -> None:
    assert (DEMO_POLICIES / path).is_file()
    text = (ROOT / "pyproject.toml").read_text()
    assert '"gateway.demo" = ["policies/*.yaml"]' in text
    assert Path(DEMO_POLICIES).parent == ROOT / "gateway" / "demo"


@pytest.mark.e2e
def test_demo_keep_serving_prints_the_metrics_url_and_the_local_prometheus_command() -> None:
    import os
    import signal

    import httpx

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--duration", "3", "--port", str(port),
                             "--keep-serving"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=str(ROOT), env=env)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:                   # the summary, then the serving lines; the process stays up
            lines.append(line)
            if "--config.file=" in line:
                break
        out = "".join(lines)
        assert f"gateway still serving on http://127.0.0.1:{port} (metrics: http://127.0.0.1:{port}/metrics)" in out
        assert "prometheus --config.file=deploy/prometheus/prometheus.local.yml" in out
        assert f"change its target to 127.0.0.1:{port}" in out and "The gateway has stopped" not in out
        assert (ROOT / "deploy" / "prometheus" / "prometheus.local.yml").is_file()
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
        assert metrics.status_code == 200 and "gateway_requests_total" in metrics.text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.e2e
def test_demo_on_a_port_in_use_exits_with_one_clear_line() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_demo("--duration", "1", "--port", str(port))
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"gateway: demo: cannot listen on 127.0.0.1:{port} (") and "--port" in line
