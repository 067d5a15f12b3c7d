"""``python -m gateway keys ...`` and ``spend ...`` as subprocesses: on a private Redis directly (the gateway
serving from the same database) and through a running gateway's admin API (embedded state). Keys the CLI
creates are used with the official ``openai`` SDK; the reports must match the ``cost_usd`` it received."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import openai
import pytest
from admin_helpers import MASTER, admin, admin_policy, admin_redis, nano, redis_url, sdk, traffic
from redis_fixtures import free_port

from conftest import ROOT, GatewayFactory, Server

pytestmark = pytest.mark.e2e   # starts gateway processes and the gateway command

__all__ = ["admin_redis"]   # the fixture, imported for pytest
SECRET = re.compile(r"sk-gw-[A-Za-z0-9_-]{20,}")
KEY_ID = re.compile(r"key_[0-9a-f]{12}")


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    full = full | {"GATEWAY_DATA_DIR": ":memory:"} | env   # embedded state: the gateway's admin API
    proc = subprocess.run([sys.executable, "-m", "gateway", *args], cwd=str(ROOT), env=full, capture_output=True,
                          text=True, timeout=60)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    return proc


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.args, proc.stdout, proc.stderr)
    return proc.stdout


def failed(proc: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert proc.returncode == status, (proc.args, proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.startswith("gateway: ") and text in proc.stderr, proc.stderr
    assert proc.stdout == ""


def spend_json(env: dict[str, str], expect_requests: int, *args: str) -> dict:
    """The CLI's JSON report, once it counts ``expect_requests`` (Redis: the gateway writes records every 0.1 s)."""
    deadline = time.monotonic() + 15
    while True:
        report = json.loads(ok(cli("spend", "--format", "json", *args, env=env)))
        if report["total"]["requests"] >= expect_requests or time.monotonic() > deadline:
            return report
        time.sleep(0.2)


@pytest.fixture(params=["redis", "api"])
def setup(request: pytest.FixtureRequest, gateway: GatewayFactory, mock_reset: str
          ) -> tuple[str, Server, dict[str, str]]:
    """(mode, the gateway, the CLI's environment): Redis only for ``redis``, master key and address for ``api``."""
    env = {"GATEWAY_MASTER_KEY": MASTER, "GATEWAY_KEY_CACHE_TTL_S": "1"}
    if request.param == "redis":
        port = request.getfixturevalue("admin_redis")
        server = gateway(admin_policy(mock_reset), env=env | {"GATEWAY_REDIS_URL": redis_url(port)})
        return "redis", server, {"GATEWAY_REDIS_URL": redis_url(port)}
    server = gateway(admin_policy(mock_reset), env=env)
    return "api", server, {"GATEWAY_MASTER_KEY": MASTER, "GATEWAY_PORT": str(server.port)}


def test_keys_and_spend_commands(setup: tuple[str, Server, dict[str, str]], tmp_path: Path) -> None:
    mode, server, env = setup
    config = str(tmp_path / "policies0")   # the gateway's policies: the CLI knows the teams
    out = ok(cli("keys", "create", "--team", "alpha", "--name", "c1", "--budget-usd", "0.5", "--budget-period",
                 "daily", "--rpm", "100", "--tpm", "50000", "--expires-in-days", "7", "--config", config, env=env))
    secrets = SECRET.findall(out)
    assert len(secrets) == 1 and out.count(secrets[0]) == 1            # printed exactly once
    alpha_secret = secrets[0]
    [alpha_id] = set(KEY_ID.findall(out))
    assert "team alpha" in out and "$0.5 daily" in out and "rpm 100" in out
    created = json.loads(ok(cli("keys", "create", "--team", "beta", "--json", "--config", config, env=env)))
    beta_secret, beta_id = created["secret"], created["key"]["id"]
    stray = cli("keys", "create", "--team", "nosuchteam", "--config", config, env=env)
    assert stray.returncode == 0 and "warning: team 'nosuchteam' is not defined" in stray.stderr
    stray_secret = SECRET.findall(stray.stdout)[0]

    alpha_costs = traffic(sdk(server, alpha_secret), 5)
    beta_costs = traffic(sdk(server, beta_secret), 3, models=("mock",))

    listing = ok(cli("keys", "list", env=env))
    for secret in (alpha_secret, beta_secret, stray_secret):
        assert secret not in listing
    assert alpha_id in listing and beta_id in listing and "active" in listing and alpha_secret[:8] in listing
    beta_only = json.loads(ok(cli("keys", "list", "--team", "beta", "--json", env=env)))
    assert [k["id"] for k in beta_only] == [beta_id] and "secret" not in beta_only[0]

    report = spend_json(env, 8)
    rows = {r["team"]: r for r in report["rows"]}
    assert set(rows) == {"alpha", "beta"} and report["total"]["requests"] == 8
    assert rows["alpha"]["cost_nano"] == nano(sum(alpha_costs.values()))
    assert Decimal(rows["beta"]["cost_usd"]) == beta_costs["mock"]
    assert report["total"]["cost_nano"] == nano(sum(alpha_costs.values()) + beta_costs["mock"])
    api_report = admin(server, "GET", "/admin/spend").json()
    assert api_report["rows"] == report["rows"] and api_report["total"] == report["total"]  # one formatter
    by_model = list(csv.DictReader(io.StringIO(ok(cli("spend", "--by", "model", "--format", "csv", env=env)))))
    expected = {m: alpha_costs.get(m, Decimal(0)) + beta_costs.get(m, Decimal(0)) for m in ("mock", "demo")}
    assert {r["model"]: Decimal(r["cost_usd"]) for r in by_model} == expected
    alpha_only = spend_json(env, 5, "--team", "alpha", "--since", "30m")
    assert [r["team"] for r in alpha_only["rows"]] == ["alpha"]
    table = ok(cli("spend", "--since", "1d", env=env))
    total_line = next(line for line in table.splitlines() if line.startswith("TOTAL"))
    assert total_line.split()[1] == "8" and report["total"]["cost_usd"] in total_line.split()

    revoked = ok(cli("keys", "revoke", alpha_id, env=env))
    assert revoked.startswith(f"Revoked key {alpha_id}")
    assert "already revoked" in ok(cli("keys", "revoke", alpha_id, env=env))
    failed(cli("keys", "revoke", "key_000000000000", env=env), 1, "No key with id 'key_000000000000'")
    status = {k["id"]: k["status"] for k in json.loads(ok(cli("keys", "list", "--json", env=env)))}
    assert status[alpha_id] == "revoked" and status[beta_id] == "active"
    time.sleep(1.5)   # GATEWAY_KEY_CACHE_TTL_S=1
    with pytest.raises(openai.AuthenticationError):
        sdk(server, alpha_secret).chat.completions.create(model="mock", messages=[{"role": "user", "content": "x"}])

    failed(cli("spend", "--since", "soon", env=env), 2, "since must be a duration")
    failed(cli("keys", "create", "--team", "alpha", "--budget-usd", "abc", env=env), 2, "budget_usd")
    failed(cli("keys", "create", "--team", "alpha", "--rpm", "0", env=env), 2, "'rpm' must be a positive integer")
    failed(cli("keys", "create", "--team", "  ", env=env), 2, "'team' must not be empty")
    failed(cli("keys", "create", "--team", "a", "--budget-period", "daily", env=env), 2, "needs 'budget_usd'")
    failed(cli("spend", "--by", "galaxy", env=env), 2, "by must be one of team, key, user")
    failed(cli("spend", "--by", "team,user,tag", env=env), 2, "one dimension or two")
    by_key_model = spend_json(env, 8, "--by", "key,model")
    assert sum(r["cost_nano"] for r in by_key_model["rows"]) == report["total"]["cost_nano"]
    assert {alpha_id, beta_id} <= {r["key"] for r in by_key_model["rows"]}
    top = spend_json(env, 8, "--by", "key", "--top", "1")
    assert len(top["rows"]) == 2 and top["rows"][1]["key"] == "(other)"
    assert sum(r["cost_nano"] for r in top["rows"]) == report["total"]["cost_nano"]
    assert len(json.loads(ok(cli("keys", "list", "--json", env=env)))) == 3   # no failed create left a key


def test_cli_errors_without_tracebacks(gateway: GatewayFactory, mock_reset: str) -> None:
    dead = free_port()
    failed(cli("keys", "list", env={"GATEWAY_REDIS_URL": f"redis://:pw@127.0.0.1:{dead}/0"}), 1,
           f"Redis at redis://:***@127.0.0.1:{dead}/0 is unreachable")
    failed(cli("spend", env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{dead}/0"}), 1, "is unreachable")
    failed(cli("keys", "list", "--url", f"http://127.0.0.1:{dead}", env={"GATEWAY_MASTER_KEY": MASTER}), 1,
           f"cannot reach the gateway admin API at http://127.0.0.1:{dead}")
    failed(cli("keys", "list", env={}), 2, "GATEWAY_MASTER_KEY is not set")
    server = gateway(admin_policy(mock_reset), env={"GATEWAY_MASTER_KEY": MASTER})
    failed(cli("keys", "list", "--url", server.url, env={"GATEWAY_MASTER_KEY": "wrong"}), 1, "Invalid master key")
    failed(cli("keys", "revoke", "key_nope", "--url", server.url, env={"GATEWAY_MASTER_KEY": MASTER}), 1,
           "No key with id 'key_nope'")
    failed(cli("spend", "--since=-1d", "--url", server.url, env={"GATEWAY_MASTER_KEY": MASTER}), 2,
           "since must be a duration")
    disabled = gateway(admin_policy(mock_reset))   # no master key on the gateway
    failed(cli("keys", "list", "--url", disabled.url, env={"GATEWAY_MASTER_KEY": MASTER}), 1,
           "The admin API is disabled")
    assert cli("keys", "rotate", "x", env={}).returncode == 2
    assert cli("keys", env={}).returncode == 2
