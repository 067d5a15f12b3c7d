"""The admin API end to end: a gateway process (embedded state, or a private redis-server) in front of
the mock upstream; keys created through ``/admin/keys`` and used with the official ``openai`` SDK; the
spend report and the teams' budgets checked against the ``cost_usd`` the SDK received, to the nano-dollar."""

from __future__ import annotations

import csv
import io
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest
from admin_helpers import MASTER, NANO, admin, admin_policy, admin_redis, nano, redis_url, sdk, traffic
from redis_fixtures import RedisProc, free_port

from conftest import GatewayFactory, Server

pytestmark = pytest.mark.e2e   # starts gateway processes on the mock upstream and a private redis-server

__all__ = ["admin_redis"]   # the fixture, imported for pytest
KEY_TTL_S = 1.0


def envelope(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["code"] == code and body["error"]["message"], body
    return body["error"]


def start(gateway: GatewayFactory, mock: str, backend: str, port: int | None, **env: str) -> Server:
    full = {"GATEWAY_MASTER_KEY": MASTER, "GATEWAY_KEY_CACHE_TTL_S": str(KEY_TTL_S), **env}
    if backend == "redis":
        assert port is not None
        full["GATEWAY_REDIS_URL"] = redis_url(port)
    return gateway(admin_policy(mock), env=full)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> tuple[str, int | None]:
    port = request.getfixturevalue("admin_redis") if request.param == "redis" else None
    return request.param, port


def test_keys_spend_and_teams_end_to_end(gateway: GatewayFactory, mock_reset: str,
                                         backend: tuple[str, int | None]) -> None:
    server = start(gateway, mock_reset, *backend)
    created = admin(server, "POST", "/admin/keys", json={"team": "alpha", "name": "notebook", "budget_usd": "0.75",
                                                         "budget_period": "weekly", "rpm": 500, "tpm": 100000,
                                                         "expires_in_days": 30})
    assert created.status_code == 201, created.text
    alpha = created.json()
    secret, key = alpha["secret"], alpha["key"]
    assert secret.startswith("sk-gw-") and key["prefix"] == secret[:8] and alpha["warnings"] == []
    assert (key["team"], key["name"], key["status"], key["budget_usd"], key["budget_period"], key["rpm"],
            key["tpm"]) == ("alpha", "notebook", "active", "0.75", "weekly", 500, 100000)
    expires = datetime.fromisoformat(key["expires_at"].replace("Z", "+00:00")).timestamp()
    assert abs(expires - (time.time() + 30 * 86400)) < 120
    beta = admin(server, "POST", "/admin/keys", json={"team": "beta"}).json()
    stray = admin(server, "POST", "/admin/keys", json={"team": "nosuchteam"}).json()
    assert "nosuchteam" in stray["warnings"][0]

    alpha_costs = traffic(sdk(server, secret), 7)
    beta_costs = traffic(sdk(server, beta["secret"]), 4, models=("mock",))
    # spend, read right after the last answer: the admin API writes buffered records first
    report = admin(server, "GET", "/admin/spend", params={"by": "team"}).json()
    alpha_nano = {m: nano(c) for m, c in alpha_costs.items()}
    beta_nano = nano(beta_costs["mock"])
    rows = {r["team"]: r for r in report["rows"]}
    assert set(rows) == {"alpha", "beta"}
    assert rows["alpha"]["requests"] == 7 and rows["beta"]["requests"] == 4
    assert rows["alpha"]["cost_nano"] == sum(alpha_nano.values())
    assert Decimal(rows["alpha"]["cost_usd"]) == sum(alpha_costs.values())
    assert rows["beta"]["cost_nano"] == beta_nano and Decimal(rows["beta"]["cost_usd"]) == beta_costs["mock"]
    assert report["total"]["cost_nano"] == sum(alpha_nano.values()) + beta_nano
    # no routing change here, so the baseline is the actual cost and nothing was saved
    assert rows["alpha"]["baseline_nano"] == rows["alpha"]["cost_nano"] and rows["alpha"]["savings_nano"] == 0
    by_model = admin(server, "GET", "/admin/spend", params={"by": "model", "team": "alpha"}).json()
    assert {r["model"]: r["cost_nano"] for r in by_model["rows"]} == alpha_nano
    by_day = admin(server, "GET", "/admin/spend", params={"by": "day", "since": "1h"}).json()
    assert [r["day"] for r in by_day["rows"]] == [datetime.now(UTC).strftime("%Y-%m-%d")]
    assert by_day["rows"][0]["requests"] == 11
    today = datetime.now(UTC).strftime("%Y-%m-%d")   # a whole-day range: the Redis rollups answer it
    assert admin(server, "GET", "/admin/spend", params={"since": today}).json()["total"] == report["total"]
    text = admin(server, "GET", "/admin/spend", params={"format": "csv"})
    assert text.headers["content-type"].startswith("text/csv")
    parsed = list(csv.DictReader(io.StringIO(text.text)))
    assert {r["team"]: Decimal(r["cost_usd"]) for r in parsed} == {"alpha": sum(alpha_costs.values()),
                                                                   "beta": beta_costs["mock"]}
    assert all(int(r["requests"]) > 0 and Decimal(r["savings_usd"]) == 0 for r in parsed)
    table = admin(server, "GET", "/admin/spend", params={"format": "table"}).text
    assert "TOTAL" in table and rows["alpha"]["cost_usd"] in table and "alpha" in table

    listed = admin(server, "GET", "/admin/keys")
    assert listed.status_code == 200
    assert secret not in listed.text and beta["secret"] not in listed.text and stray["secret"] not in listed.text
    assert {k["id"] for k in listed.json()["data"]} == {key["id"], beta["key"]["id"], stray["key"]["id"]}
    assert [k["id"] for k in admin(server, "GET", "/admin/keys", params={"team": "beta"}).json()["data"]] \
        == [beta["key"]["id"]]

    # the teams' budgets: spent equals the same sum, nothing left reserved
    teams = {t["name"]: t for t in admin(server, "GET", "/admin/teams").json()["data"]}
    assert set(teams) == {"default", "alpha", "beta"}
    budgets = {b["period"]: b for b in teams["alpha"]["budgets"]}
    assert set(budgets) == {"monthly", "daily"}
    spent = sum(alpha_nano.values())
    for period, limit in (("monthly", NANO), ("daily", NANO // 2)):
        b = budgets[period]
        assert (b["limit_nano"], b["spent_nano"], b["reserved_nano"], b["remaining_nano"]) == \
            (limit, spent, 0, limit - spent)
        assert Decimal(b["spent_usd"]) == sum(alpha_costs.values())
        assert b["soft_alert_reached"] is False
    assert budgets["monthly"]["limit_usd"] == "1.00" and budgets["daily"]["remaining_usd"] == \
        str(Decimal(NANO // 2 - spent) / NANO)
    assert (teams["alpha"]["rpm"], teams["alpha"]["soft_alert"], teams["alpha"]["on_exceed"]) == (1000, 0.5, "block")
    assert teams["beta"]["budgets"] == [] and teams["beta"]["allowed_models"] == ["demo", "mock"]

    # revoke: 200 with revoked true, then false; unknown id 404; the SDK gets 401 after the key cache TTL
    gone = admin(server, "DELETE", f"/admin/keys/{key['id']}")
    assert gone.status_code == 200 and gone.json()["revoked"] is True and gone.json()["key"]["status"] == "revoked"
    assert admin(server, "DELETE", f"/admin/keys/{key['id']}").json()["revoked"] is False
    envelope(admin(server, "DELETE", "/admin/keys/key_000000000000"), 404, "key_not_found")
    statuses = {k["id"]: k["status"] for k in admin(server, "GET", "/admin/keys").json()["data"]}
    assert statuses[key["id"]] == "revoked" and statuses[beta["key"]["id"]] == "active"
    time.sleep(KEY_TTL_S + 0.5)
    with pytest.raises(openai.AuthenticationError) as err:
        sdk(server, secret).chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "invalid_api_key"
    assert traffic(sdk(server, beta["secret"]), 1, models=("mock",))["mock"] > 0   # other keys still work


def test_models_lists_only_what_the_key_may_use(gateway: GatewayFactory, mock_reset: str,
                                                backend: tuple[str, int | None]) -> None:
    server = start(gateway, mock_reset, *backend)
    beta = admin(server, "POST", "/admin/keys", json={"team": "beta"}).json()["secret"]
    alpha = admin(server, "POST", "/admin/keys", json={"team": "alpha"}).json()["secret"]
    assert sorted(m.id for m in sdk(server, beta).models.list()) == ["demo", "mock"]
    every = sorted(m.id for m in sdk(server, alpha).models.list())
    assert len(every) > 2 and {"demo", "mock", "mock-embed"} <= set(every)
    assert sdk(server, beta).models.retrieve("mock").id == "mock"
    with pytest.raises(openai.NotFoundError):
        sdk(server, beta).models.retrieve("mock-embed")
    with pytest.raises(openai.PermissionDeniedError) as err:
        sdk(server, beta).chat.completions.create(model="mock-fallback", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "model_not_allowed"
    with pytest.raises(openai.AuthenticationError):
        sdk(server, "sk-gw-not-a-key").models.list()


def test_reload_valid_then_invalid_keeps_last_good_set(gateway: GatewayFactory, mock_reset: str,
                                                       tmp_path: Path) -> None:
    server = start(gateway, mock_reset, "memory", None)
    policy_file = tmp_path / "policies0" / "models.yaml"
    assert policy_file.exists()
    good = admin_policy(mock_reset) + "  gamma:\n    budgets: [{period: daily, usd: 2.5}]\n"
    policy_file.write_text(good)
    ok = admin(server, "POST", "/admin/reload")
    assert ok.status_code == 200, ok.text
    assert "gamma" in ok.json()["teams"] and ok.json()["generation"] is None   # embedded state: one process
    teams = {t["name"]: t for t in admin(server, "GET", "/admin/teams").json()["data"]}
    assert teams["gamma"]["budgets"][0]["limit_usd"] == "2.50"

    bad = good + "    budgett: 3\n"
    bad_line = len(bad.splitlines())
    policy_file.write_text(bad)
    err = envelope(admin(server, "POST", "/admin/reload"), 400, "invalid_policy")
    assert f"{policy_file}:{bad_line}: teams.gamma.budgett" in err["message"], err
    assert err["param"] == "teams.gamma.budgett"
    teams = {t["name"] for t in admin(server, "GET", "/admin/teams").json()["data"]}
    assert "gamma" in teams                              # the last good set is still in force
    assert traffic(sdk(server, MASTER), 1, models=("mock",))["mock"] > 0
    policy_file.write_text("models: [")
    assert "<yaml>" in envelope(admin(server, "POST", "/admin/reload"), 400, "invalid_policy")["message"]


def test_reload_and_revocation_reach_every_worker(gateway: GatewayFactory, mock_reset: str, admin_redis: int,
                                                  tmp_path: Path) -> None:
    server = gateway(admin_policy(mock_reset), env={"GATEWAY_MASTER_KEY": MASTER, "GATEWAY_REDIS_URL":
                                                    redis_url(admin_redis), "GATEWAY_KEY_CACHE_TTL_S": "1"},
                     args=("--workers", "3"))
    created = admin(server, "POST", "/admin/keys", json={"team": "alpha"}).json()
    client = sdk(server, created["secret"])
    assert traffic(client, 6, models=("mock",))["mock"] > 0
    (tmp_path / "policies0" / "models.yaml").write_text(admin_policy(mock_reset) + "  gamma: {rpm: 7}\n")
    reloaded = admin(server, "POST", "/admin/reload").json()
    assert reloaded["generation"] >= 1 and "gamma" in reloaded["teams"]
    time.sleep(2.5)   # the other workers poll the generation every second
    for _ in range(30):   # fresh connections, spread over the workers by the kernel
        teams = {t["name"]: t for t in admin(server, "GET", "/admin/teams").json()["data"]}
        assert teams["gamma"]["rpm"] == 7
    assert admin(server, "DELETE", f"/admin/keys/{created['key']['id']}").json()["revoked"] is True
    time.sleep(1.5)
    for _ in range(30):
        with pytest.raises(openai.AuthenticationError):
            sdk(server, created["secret"]).chat.completions.create(
                model="mock", messages=[{"role": "user", "content": "x"}])


def test_master_key_guards_every_admin_endpoint(gateway: GatewayFactory, mock_reset: str) -> None:
    endpoints = [("POST", "/admin/keys"), ("GET", "/admin/keys"), ("DELETE", "/admin/keys/key_x"),
                 ("GET", "/admin/teams"), ("GET", "/admin/spend"), ("POST", "/admin/reload")]
    open_server = gateway(admin_policy(mock_reset))   # no master key
    for method, path in endpoints:
        for key in (None, "anything", MASTER):
            err = envelope(admin(open_server, method, path, key=key, json={"team": "alpha"}), 403, "admin_disabled")
            assert "GATEWAY_MASTER_KEY" in err["message"]
    assert admin(open_server, "GET", "/admin/keys", key=None).json()["error"]["type"] == "permission_error"
    server = start(gateway, mock_reset, "memory", None)
    for method, path in endpoints:
        for key in (None, "wrong", MASTER + "x"):
            err = envelope(admin(server, method, path, key=key, json={"team": "alpha"}), 401, "invalid_api_key")
            assert admin(server, method, path, key=key).json()["error"]["type"] == "authentication_error", err
    via_header = httpx.get(f"{server.url}/admin/keys", headers={"x-api-key": MASTER})
    assert via_header.status_code == 200 and via_header.json()["data"] == []
    created = admin(server, "POST", "/admin/keys", json={"team": "beta"}).json()
    envelope(admin(server, "GET", "/admin/keys", key=created["secret"]), 401, "invalid_api_key")  # not a master key


BAD = [
    ("POST", "/admin/keys", {"content": b"{nope"}, "invalid_json", "body"),
    ("POST", "/admin/keys", {"content": b"[1]"}, "invalid_json", None),
    ("POST", "/admin/keys", {"json": {}}, "missing_field", "team"),
    ("POST", "/admin/keys", {"json": {"team": ""}}, "invalid_value", "team"),
    ("POST", "/admin/keys", {"json": {"team": 5}}, "invalid_type", "team"),
    ("POST", "/admin/keys", {"json": {"team": "a", "secret": "x"}}, "unknown_field", "secret"),
    ("POST", "/admin/keys", {"json": {"team": "a", "budget_usd": "ten"}}, "invalid_value", "budget_usd"),
    ("POST", "/admin/keys", {"json": {"team": "a", "budget_usd": -1}}, "invalid_value", "budget_usd"),
    ("POST", "/admin/keys", {"json": {"team": "a", "budget_usd": "1e30"}}, "invalid_value", "budget_usd"),
    ("POST", "/admin/keys", {"json": {"team": "a", "budget_usd": True}}, "invalid_type", "budget_usd"),
    ("POST", "/admin/keys", {"json": {"team": "a", "budget_usd": "0.0000000001"}}, "invalid_value", "budget_usd"),
    ("POST", "/admin/keys", {"json": {"team": "a", "budget_usd": 1, "budget_period": "yearly"}}, "invalid_value",
     "budget_period"),
    ("POST", "/admin/keys", {"json": {"team": "a", "budget_period": "daily"}}, "invalid_value", "budget_period"),
    ("POST", "/admin/keys", {"json": {"team": "a", "rpm": 0}}, "invalid_value", "rpm"),
    ("POST", "/admin/keys", {"json": {"team": "a", "tpm": 1.5}}, "invalid_value", "tpm"),
    ("POST", "/admin/keys", {"json": {"team": "a", "rpm": 2**60}}, "invalid_value", "rpm"),
    ("POST", "/admin/keys", {"json": {"team": "a", "expires_in_days": 0}}, "invalid_value", "expires_in_days"),
    ("POST", "/admin/keys", {"json": {"team": "a", "expires_in_days": "soon"}}, "invalid_value", "expires_in_days"),
    ("POST", "/admin/keys?x=1", {"json": {"team": "a"}}, "unknown_parameter", "x"),
    ("GET", "/admin/keys?teams=a", {}, "unknown_parameter", "teams"),
    ("GET", "/admin/spend?since=yesterday", {}, "invalid_value", "since"),
    ("GET", "/admin/spend?since=-3d", {}, "invalid_value", "since"),
    ("GET", "/admin/spend?since=99999d", {}, "invalid_value", "since"),
    ("GET", "/admin/spend?by=galaxy", {}, "invalid_value", "by"),
    ("GET", "/admin/spend?by=team,user,tag", {}, "invalid_value", "by"),
    ("GET", "/admin/spend?top=many", {}, "invalid_value", "top"),
    ("GET", "/admin/spend?top=0", {}, "invalid_value", "top"),
    ("GET", "/admin/spend?user=a%0Ab", {}, "invalid_value", "user"),
    ("GET", "/admin/users?name=a%0Ab", {}, "invalid_value", "name"),
    ("GET", "/admin/sessions?colour=red", {}, "unknown_parameter", "colour"),
    ("GET", "/admin/spend?format=xml", {}, "invalid_value", "format"),
    ("GET", "/admin/spend?by=team&by=day", {}, "invalid_request", "by"),
    ("GET", "/admin/teams?all=1", {}, "unknown_parameter", "all"),
]


def test_bad_admin_parameters_are_400s(gateway: GatewayFactory, mock_reset: str) -> None:
    server = start(gateway, mock_reset, "memory", None)
    for method, path, kw, code, param in BAD:
        err = envelope(admin(server, method, path, **kw), 400, code)
        assert err["type"] == "invalid_request_error" and err["param"] == param, (path, kw, err)
    assert admin(server, "GET", "/admin/keys").json()["data"] == []   # nothing was created
    envelope(admin(server, "PUT", "/admin/keys"), 405, "method_not_allowed")
    envelope(admin(server, "GET", "/admin/nothing"), 404, "not_found")
    ok = admin(server, "POST", "/admin/keys", json={"team": "a", "budget_usd": 0.1, "expires_in_days": 0.5})
    assert ok.status_code == 201 and ok.json()["key"]["budget_usd"] == "0.1"
    assert "Traceback" not in server.output()


def test_admin_answers_503_while_redis_is_down(gateway: GatewayFactory, mock_reset: str, tmp_path: Path) -> None:
    port = free_port()
    redis_proc = RedisProc(port, tmp_path / "redis")
    try:
        server = gateway(admin_policy(mock_reset), env={"GATEWAY_MASTER_KEY": MASTER,
                                                        "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
        assert admin(server, "POST", "/admin/keys", json={"team": "alpha"}).status_code == 201
        redis_proc.stop()
        for method, path, kw in [("POST", "/admin/keys", {"json": {"team": "alpha"}}), ("GET", "/admin/keys", {}),
                                 ("DELETE", "/admin/keys/key_000000000000", {}), ("GET", "/admin/teams", {}),
                                 ("GET", "/admin/spend", {})]:
            err = envelope(admin(server, method, path, **kw), 503, "state_unavailable")
            assert "unreachable" in err["message"] and err["type"] == "api_error", (path, err)
        envelope(admin(server, "GET", "/admin/spend?since=never"), 400, "invalid_value")   # still validated
        redis_proc = RedisProc(port, tmp_path / "redis")
        assert admin(server, "GET", "/admin/keys").status_code == 200
    finally:
        redis_proc.stop()
    assert "Traceback" not in server.output()
