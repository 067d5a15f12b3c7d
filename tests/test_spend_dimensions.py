"""Spend reports by every dimension, two at once, filtered and cut to the top N, on the embedded ledger
and on Redis: each breakdown sums to the total to the nano-dollar (by tag: each tag's rows hold every
request carrying it, untagged ones under ``(none)``, and the report says so), and bad parameters are
clear 400s. Records are a mixed run: several teams, keys, users, tags, sessions, models, endpoints, days.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.admin import ops as adminops
from gateway.admin.spend_report import DIMENSIONS, TAG_NOTE, render
from gateway.errors import InvalidRequest
from gateway.state.ledger import Ledger, LedgerRecord, MemoryLedger, RedisLedger


def mixed_run(n: int, team_prefix: str) -> list[LedgerRecord]:
    rng = random.Random(7)
    now = time.time()
    out = []
    for i in range(n):
        cost = rng.randrange(0, 10**9)
        out.append(LedgerRecord(
            request_id=f"{team_prefix}-{i}", ts=now - rng.uniform(0, 2.5 * 86_400), team=f"{team_prefix}{i % 3}",
            key_id=rng.choice([None, "key_a", "key_b"]), requested_model="m", model=rng.choice(["m1", "m2"]),
            deployment=rng.choice(["d1", "d2", "d3"]), provider=rng.choice(["openai", "simulated"]),
            route=rng.choice(["default", "auto"]), input_tokens=rng.randrange(100), output_tokens=rng.randrange(100),
            cost_nano=cost, baseline_nano=cost + rng.randrange(10**6), savings={"routing": rng.randrange(10**6)},
            endpoint=rng.choice(["chat", "messages", "responses"]), user=rng.choice([None, "ann", "bob"]),
            tags=rng.choice([(), ("batch",), ("batch", "eval"), ("eval",)]), session=rng.choice([None, "s1", "s2"])))
    return out


async def check_every_breakdown(ledger: Ledger, records: list[LedgerRecord], team: str | None) -> None:
    chosen = [r for r in records if team is None or r.team == team]
    total = sum(r.cost_nano for r in chosen)
    for by in [*DIMENSIONS, "team,user", "user,tag", "session,model", "endpoint,day"]:
        doc = await adminops.spend(ledger, team, "7d", by)
        assert doc["total"]["cost_nano"] == total and doc["total"]["requests"] == len(chosen), by
        row_sum = sum(row["cost_nano"] for row in doc["rows"])
        if "tag" not in by:
            assert row_sum == total, by
            assert "notes" not in doc
        else:
            assert doc["notes"][0] == TAG_NOTE
            tagged = {row["tag"]: 0 for row in doc["rows"]}
            for row in doc["rows"]:
                tagged[row["tag"]] += row["cost_nano"]
            assert tagged == {t: sum(r.cost_nano for r in chosen if (t in r.tags if t != "(none)" else not r.tags))
                              for t in ("batch", "eval", "(none)")}
        for fmt in ("csv", "table", "json"):
            assert render(doc, fmt)
    for name, value, keep in (("user", "ann", lambda r: r.user == "ann"), ("tag", "eval", lambda r: "eval" in r.tags),
                              ("session", "s2", lambda r: r.session == "s2"), ("key", "key_b",
                                                                               lambda r: r.key_id == "key_b")):
        doc = await adminops.spend(ledger, team, "7d", "model", {name: value})
        assert doc["total"]["cost_nano"] == sum(r.cost_nano for r in chosen if keep(r))
        assert sum(row["cost_nano"] for row in doc["rows"]) == doc["total"]["cost_nano"]
        assert doc["filters"] == {name: value}
    top = await adminops.spend(ledger, team, "7d", "deployment,user", top=2)
    assert len(top["rows"]) == 3 and top["rows"][-1]["deployment"] == "(other)"
    assert sum(row["cost_nano"] for row in top["rows"]) == total
    assert top["rows"][0]["cost_nano"] >= top["rows"][1]["cost_nano"]


async def test_every_breakdown_sums_to_the_total_in_memory() -> None:
    records = mixed_run(300, "team")
    ledger = MemoryLedger()
    await ledger.append(records)
    await check_every_breakdown(ledger, records, None)
    await check_every_breakdown(ledger, records, "team1")


async def test_every_breakdown_sums_to_the_total_on_redis(redis_port: int) -> None:
    client = Redis(host="127.0.0.1", port=redis_port, db=5)
    await client.flushdb()
    ledger = RedisLedger(client)
    records = mixed_run(300, f"t{uuid.uuid4().hex[:6]}-")
    try:
        await ledger.append(records)
        await check_every_breakdown(ledger, records, None)
        await check_every_breakdown(ledger, records, records[1].team)
    finally:
        await client.flushdb()
        await ledger.aclose()


async def test_a_window_longer_than_the_records_kept_says_so() -> None:
    records = mixed_run(50, "team")
    ledger = MemoryLedger(max_records=10)
    await ledger.append(records)
    doc = await adminops.spend(ledger, None, "7d", "user")
    assert any("larger than the ledger keeps records for" in n for n in doc["notes"])
    full = await adminops.spend(ledger, None, "7d", "team")
    assert full["total"]["cost_nano"] == sum(r.cost_nano for r in records)


@pytest.mark.parametrize("kwargs, param", [
    ({"by": "galaxy"}, "by"), ({"by": "team,user,tag"}, "by"), ({"by": "user,user"}, "by"),
    ({"filters": {"user": "a\nb"}}, "user"), ({"filters": {"user": "x" * 300}}, "user"),
    ({"filters": {"colour": "red"}}, "colour"), ({"top": 0}, "top"),
])
async def test_bad_report_parameters_are_clear_400s(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        await adminops.spend(MemoryLedger(), None, "7d", kwargs.pop("by", "team"), **kwargs)
    assert err.value.status_code == 400 and err.value.param == param
