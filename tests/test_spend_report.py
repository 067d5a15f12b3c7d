"""The spend report formatter and the admin operations' validation, without any process: exact money
strings, the ``--since`` grammar, the three renderings of one report, and key-creation checks."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from gateway.admin import ops as adminops
from gateway.admin.spend_report import build_report, parse_since, render, usd
from gateway.errors import InvalidRequest, NotFound
from gateway.state.keys import MemoryKeyStore
from gateway.state.ledger import LedgerRecord, MemoryLedger

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("nano", "text"), [
    (0, "0.00"), (50_000_000, "0.05"), (1_000_000_000, "1.00"), (123_456, "0.000123456"),
    (12_345_678_901, "12.345678901"), (-100_000_000, "-0.10"), (1, "0.000000001"),
])
def test_usd_is_exact(nano: int, text: str) -> None:
    assert usd(nano) == text
    assert Decimal(text) * 10**9 == nano


@pytest.mark.parametrize(("text", "expected"), [
    ("30m", NOW - 1800), ("24h", NOW - 86400), ("7d", NOW - 7 * 86400), ("2w", NOW - 14 * 86400),
    ("45s", NOW - 45), ("0d", NOW), ("7D", NOW - 7 * 86400),
    ("2026-03-01", datetime(2026, 3, 1, tzinfo=UTC).timestamp()),
    ("2026-03-01T06:30", datetime(2026, 3, 1, 6, 30, tzinfo=UTC).timestamp()),
    ("2026-03-01T06:30Z", datetime(2026, 3, 1, 6, 30, tzinfo=UTC).timestamp()),
    ("2026-03-01T08:30+02:00", datetime(2026, 3, 1, 6, 30, tzinfo=UTC).timestamp()),
])
def test_parse_since(text: str, expected: float) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "d", "7", "-7d", "7y", "1.5d", "yesterday", "2026-13-01", "99999d"])
def test_parse_since_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_since(text, NOW)


def record(i: int, team: str, model: str, cost: int, baseline: int, routing: int = 0) -> LedgerRecord:
    return LedgerRecord(request_id=f"r{i}", ts=NOW - 3600 + i, team=team, key_id=None, requested_model=model,
                        model=model, deployment="d", provider="openai", route="default", input_tokens=10 + i,
                        output_tokens=5, cost_nano=cost, baseline_nano=baseline,
                        savings={"routing": routing} if routing else {})


async def test_report_renderings_agree() -> None:
    ledger = MemoryLedger()
    await ledger.append([record(0, "a,b", "m1", 123_456_789, 123_456_789),
                         record(1, "a,b", "m2", 1, 200_000_001, routing=200_000_000),
                         record(2, "zed", "m1", 50_000_000, 40_000_000, routing=-10_000_000)])
    report = build_report(await ledger.totals(0, None, None, "team"), by="team", team=None, since=NOW - 7200,
                          until=NOW)
    doc = json.loads(render(report, "json"))
    assert doc == json.loads(json.dumps(report))
    rows = {r["team"]: r for r in doc["rows"]}
    assert rows["a,b"]["cost_nano"] == 123_456_790 and rows["a,b"]["cost_usd"] == "0.12345679"
    assert rows["a,b"]["savings_nano"] == 200_000_000
    assert rows["a,b"]["savings_by_source_nano"]["routing"] == 200_000_000
    assert rows["zed"]["savings_usd"] == "-0.01"
    assert doc["total"]["cost_nano"] == 173_456_790 and doc["total"]["requests"] == 3
    assert (doc["since"], doc["until"]) == ("2026-03-10T10:00:00Z", "2026-03-10T12:00:00Z")
    parsed = list(csv.DictReader(io.StringIO(render(report, "csv"))))
    assert [r["team"] for r in parsed] == ["a,b", "zed"]        # quoted, not split
    assert [Decimal(r["cost_usd"]) * 10**9 for r in parsed] == [123_456_790, 50_000_000]
    assert parsed[0]["savings_routing_usd"] == "0.20" and parsed[1]["savings_usd"] == "-0.01"
    table = render(report, "table").splitlines()
    assert table[0] == "Spend by team, all teams, 2026-03-10T10:00:00Z to 2026-03-10T12:00:00Z"
    assert table[-2].split()[:2] == ["TOTAL", "3"] and "0.17345679" in table[-2]
    assert table[-1] == "savings by source (USD): routing 0.19"
    with pytest.raises(ValueError):
        render(report, "xml")
    empty = render(build_report([], by="day", team="t", since=NOW, until=NOW), "table")
    assert "team t" in empty and "TOTAL" in empty


async def test_key_operations_validate_and_never_show_secrets() -> None:
    store = MemoryKeyStore()
    req = adminops.key_request({"team": " research ", "budget_usd": 0.1, "expires_in_days": 1})
    assert (req.team, req.budget_usd, req.budget_period, req.expires_in_days) == ("research", "0.1", "monthly", 1.0)
    created = await adminops.create_key(store, req, {"default"})
    assert created["warnings"] and created["key"]["budget_period"] == "monthly"
    listed = await adminops.list_keys(store, None)
    assert created["secret"] not in json.dumps(listed) and listed[0]["status"] == "active"
    assert (await adminops.revoke_key(store, listed[0]["id"]))["revoked"] is True
    assert (await adminops.list_keys(store, "research"))[0]["status"] == "revoked"
    with pytest.raises(NotFound):
        await adminops.revoke_key(store, "key_nope")
    for body, param in [(None, None), ({"team": "x", "budget_usd": "NaN"}, "budget_usd"),
                        ({"team": "x", "budget_usd": "Infinity"}, "budget_usd"),
                        ({"team": "x", "name": "a\nb"}, "name"), ({"team": "x" * 129}, "team"),
                        ({"team": "x", "expires_in_days": True}, "expires_in_days"),
                        ({"team": "x", "expires_in_days": 10**6}, "expires_in_days")]:
        with pytest.raises(InvalidRequest) as err:
            adminops.key_request(body)
        assert err.value.status_code == 400 and err.value.param == param


async def test_spend_report_exact_over_whole_days_after_the_window_evicts() -> None:
    """The embedded ledger keeps only a window of records; a report from a UTC midnight on is still exact,
    from its per-day rollups, and the same with a team filter."""
    ledger = MemoryLedger(max_records=3)
    teams, models = ("a,b", "zed"), ("m1", "m2")
    records = [record(i, teams[i % 2], models[i // 2 % 2], 123_456_789 * (i + 1) + i, 200_000_001 * (i + 1),
                      routing=10_000_000 * i) for i in range(40)]
    for i in range(0, 40, 6):
        await ledger.append(records[i:i + 6])
    assert len(ledger) == 3 and ledger.evicted == 37
    since = datetime.fromtimestamp(NOW, UTC).strftime("%Y-%m-%d")   # the records' UTC midnight
    for team in (None, "zed"):
        chosen = [r for r in records if team is None or r.team == team]
        for by, key in (("team", lambda r: r.team), ("model", lambda r: r.model)):
            doc = await adminops.spend(ledger, team, since, by)
            assert doc["total"]["requests"] == len(chosen)
            assert doc["total"]["cost_nano"] == sum(r.cost_nano for r in chosen)
            assert doc["total"]["savings_by_source_nano"]["routing"] == sum(r.savings.get("routing", 0)
                                                                            for r in chosen)
            rows = {row[by]: row for row in doc["rows"]}
            assert {k: rows[k]["cost_nano"] for k in rows} == {
                k: sum(r.cost_nano for r in chosen if key(r) == k) for k in {key(r) for r in chosen}}
        assert (await adminops.spend(ledger, team, since, "day"))["rows"][0]["day"] == since
