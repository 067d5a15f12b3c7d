"""The ClickHouse ledger against the real ClickHouse engine, in process (chdb, through clickhouse-connect's
``chdb://`` backend): batches stored once per dedup token, rollups equal to the records to the nano-dollar,
batches waiting in the disk spool while the engine is unavailable, the spend report equal to the memory
ledger's, forward migrations and retention. Each test opens its own engine directory and closes it."""

from __future__ import annotations

import fcntl
import random
from collections.abc import AsyncIterator
from dataclasses import fields
from pathlib import Path

import pytest

pytest.importorskip("chdb")
pytest.importorskip("clickhouse_connect")

from gateway.admin.spend_report import build_report, render  # noqa: E402
from gateway.errors import InvalidRequest
from gateway.settings import Settings  # noqa: E402
from gateway.state import clickhouse_schema as schema  # noqa: E402
from gateway.state.ledger import DAY_S, BufferedLedger, LedgerRecord, MemoryLedger  # noqa: E402
from gateway.state.ledger_archive import ArchivedLedger, buffered, stream_maxlen  # noqa: E402
from gateway.state.ledger_clickhouse import ClickHouseLedger, migrate  # noqa: E402
from gateway.state.spool import Spool  # noqa: E402

BASE = 1_796_000_000.0 // DAY_S * DAY_S   # a UTC midnight


def record(i: int, ts: float, rng: random.Random) -> LedgerRecord:
    savings = {s: rng.randrange(0, 10**6) for s in ("routing", "cache", "compression", "prompt_cache")
               if rng.random() < 0.3}
    return LedgerRecord(request_id=f"req-{i}", ts=ts, team=rng.choice(["alpha", "beta", "gamma team"]),
                        key_id=rng.choice([None, "key1", "key2"]), requested_model="auto",
                        model=rng.choice(["gpt-4o", "llama-3"]), deployment="d1",
                        provider=rng.choice(["openai", "vllm"]), route="default",
                        input_tokens=rng.randrange(0, 5000), output_tokens=rng.randrange(0, 2000),
                        cost_nano=rng.randrange(0, 10**8), baseline_nano=rng.randrange(0, 2 * 10**8),
                        savings=savings, latency_ms=rng.random() * 900, ttft_ms=rng.choice([None, 12.5]),
                        stream=rng.random() < 0.5, compressed=rng.random() < 0.2, user=(None, "ann", "bob")[i % 3])


def records(n: int, seed: int = 1, days: float = 6.0) -> list[LedgerRecord]:
    rng = random.Random(seed)
    return [record(i, BASE + rng.random() * days * DAY_S, rng) for i in range(n)]


@pytest.fixture
async def ch(tmp_path: Path) -> AsyncIterator[ClickHouseLedger]:
    ledger = ClickHouseLedger(f"chdb://{tmp_path / 'ch'}", hold_s=0.2, wait_s=0.2)
    yield ledger
    await ledger.aclose()


def test_every_record_field_has_a_column() -> None:
    names = {c.name for c in schema.COLUMNS}
    missing = [f.name for f in fields(LedgerRecord) if f.name not in names and f.name not in schema.STORED_ELSEWHERE]
    assert missing == [], f"LedgerRecord fields with no ClickHouse column: {missing}"
    assert schema.COLUMNS[1].name == "ts"   # rows() sets the DateTime64 there


async def test_read_returns_the_records_as_written(ch: ClickHouseLedger) -> None:
    batch = records(40)
    await ch.append(batch)
    back = await ch.read(BASE - 1)
    assert [r.request_id for r in back] == [r.request_id for r in sorted(batch, key=lambda r: r.ts)]
    by_id = {r.request_id: r for r in batch}
    for r in back:
        want = by_id[r.request_id]
        assert (r.team, r.key_id, r.cost_nano, r.baseline_nano, r.savings, r.ttft_ms, r.stream) == \
               (want.team, want.key_id, want.cost_nano, want.baseline_nano,
                {k: v for k, v in want.savings.items() if v}, want.ttft_ms, want.stream)
        assert abs(r.ts - want.ts) < 1e-5


async def test_a_retried_batch_is_stored_once(ch: ClickHouseLedger) -> None:
    first, second = records(50, seed=2), records(30, seed=3)
    for r in second:
        r.request_id += "-b"
    await ch.append(first)
    await ch.append(first)          # the same batch again: a retry after a lost reply
    await ch.append(second)
    await ch.append(first)
    assert len(await ch.read(BASE - 1)) == 80
    whole = await ch.totals(BASE, BASE + 7 * DAY_S, by="team")     # whole days: from the rollup
    assert sum(row["requests"] for row in whole) == 80
    assert sum(row["cost_nano"] for row in whole) == sum(r.cost_nano for r in first + second)


@pytest.mark.parametrize("by", ["team", "model", "day"])
async def test_rollups_equal_record_sums_and_the_memory_ledger(ch: ClickHouseLedger, by: str) -> None:
    batch = records(600, seed=4)
    memory = MemoryLedger()
    for i in range(0, len(batch), 100):
        await ch.append(batch[i:i + 100])
        await memory.append(batch[i:i + 100])
    # whole UTC days (the rollup), partial days at both ends (records), a team filter, inside one day
    for since, until, team in [(BASE, BASE + 7 * DAY_S, None), (BASE + 3600.5, BASE + 5 * DAY_S - 7.25, None),
                               (BASE + 0.5 * DAY_S, None, "beta"), (BASE + 2.1 * DAY_S, BASE + 2.9 * DAY_S, "alpha")]:
        got = await ch.totals(since, until, team, by)
        want = await memory.totals(since, until, team, by)
        assert got == want, (since, until, team)
        assert got, "the window holds records"
    # the rollup alone, against a plain sum over the records, to the nano-dollar
    rolled = await ch.totals(BASE, BASE + 7 * DAY_S, by="team")
    for row in rolled:
        mine = [r for r in batch if r.team == row["key"]]
        assert row["cost_nano"] == sum(r.cost_nano for r in mine)
        assert row["baseline_nano"] == sum(r.baseline_nano for r in mine)
        assert row["savings_nano"]["routing"] == sum(r.savings.get("routing", 0) for r in mine)


async def test_group_by_key_provider_and_pairs(ch: ClickHouseLedger) -> None:
    batch = records(200, seed=5)
    await ch.append(batch)
    rows = await ch.totals(BASE, None, by="team,model")
    want: dict[tuple[str, str], int] = {}
    for r in batch:
        want[(r.team, r.model)] = want.get((r.team, r.model), 0) + r.cost_nano
    assert {row["key"]: row["cost_nano"] for row in rows} == want
    keys = {row["key"]: row["requests"] for row in await ch.totals(BASE + 100, None, by="key")}
    assert keys == {k or "(none)": sum(1 for r in batch if r.key_id == k and r.ts >= BASE + 100)
                    for k in (None, "key1", "key2")}
    with pytest.raises(ValueError, match="by must be"):
        await ch.totals(BASE, None, by="team,prompt")


async def test_spend_report_from_clickhouse_equals_the_memory_ledgers(ch: ClickHouseLedger) -> None:
    batch = records(300, seed=6)
    memory = MemoryLedger()
    await ch.append(batch)
    await memory.append(batch)
    since, until = BASE + 1234.0, BASE + 6 * DAY_S
    for by in ("team", "model", "day"):
        for team in (None, "gamma team"):
            reports = [build_report(await led.totals(since, until, team, by), by=by, team=team, since=since,
                                    until=until) for led in (ch, memory)]
            for fmt in ("json", "csv", "table"):
                assert render(reports[0], fmt) == render(reports[1], fmt)


def _hold(path: Path) -> object:
    fh = open(str(path) + ".lock", "a+b")  # noqa: SIM115
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fh


async def test_batches_wait_in_the_spool_while_clickhouse_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "engine"
    inner = ClickHouseLedger(f"chdb://{path}", hold_s=0.1, wait_s=0.1)
    ledger = BufferedLedger(inner, spool=Spool(tmp_path / "spool"))
    batch = records(90, seed=7)
    try:
        holder = _hold(path)               # another process has the engine: unavailable
        for i in range(0, 90, 30):
            await ledger.append(batch[i:i + 30])
        assert ledger.pending == 90 and ledger.spool is not None and ledger.spool.records == 90
        assert ledger.dropped == 0 and ledger.rejected == 0
        holder.close()                    # back
        assert await ledger.flush() == 90
        assert ledger.pending == 0
        await ledger.flush()
        assert len(await inner.read(BASE - 1)) == 90
        totals = await inner.totals(BASE, None, by="model")
        assert sum(r["requests"] for r in totals) == 90
        assert sum(r["cost_nano"] for r in totals) == sum(r.cost_nano for r in batch)
    finally:
        await ledger.aclose()


class LostReply(ClickHouseLedger):
    """Stores the batch, then fails as if the reply had been lost (the first ``fail`` times)."""
    fail = 2

    async def append(self, records: list[LedgerRecord]) -> None:  # type: ignore[override]
        await super().append(records)
        if self.fail:
            self.fail -= 1
            raise ConnectionError("reply lost")


async def test_a_write_whose_reply_was_lost_is_not_doubled(tmp_path: Path) -> None:
    inner = LostReply(f"chdb://{tmp_path / 'engine'}", hold_s=0.1)
    ledger = BufferedLedger(inner, spool=Spool(tmp_path / "spool"))
    batch = records(25, seed=8)
    try:
        await ledger.append(batch)
        assert ledger.pending == 25
        await ledger.flush()
        await ledger.flush()
        assert ledger.pending == 0 and inner.fail == 0
        assert len(await inner.read(BASE - 1)) == 25
        assert sum(r["requests"] for r in await inner.totals(BASE, None)) == 25
    finally:
        await ledger.aclose()


async def test_an_unopenable_url_is_unavailable_not_fatal(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    ledger = BufferedLedger(ClickHouseLedger(f"chdb://{blocker}/sub", wait_s=0.1), spool=Spool(tmp_path / "s"))
    try:
        await ledger.append(records(3))
        assert ledger.pending == 3 and ledger.rejected == 0
    finally:
        ledger.spool.close() if ledger.spool else None


def test_bad_urls_and_retention_are_refused() -> None:
    with pytest.raises(ValueError, match="GATEWAY_CLICKHOUSE_URL"):
        ClickHouseLedger("redis://localhost")
    with pytest.raises(ValueError, match="retention"):
        ClickHouseLedger("chdb:///tmp/x", retention_days=-1)


async def test_forward_migration_adds_a_dimension_column(tmp_path: Path) -> None:
    version_1 = tuple(c for c in schema.COLUMNS if c.since == 1)     # before the attribution columns
    v1 = ClickHouseLedger(f"chdb://{tmp_path / 'engine'}", hold_s=0.1, columns=version_1)
    await v1.append(records(20, seed=9))
    assert await v1.schema_version() == 1
    await v1.aclose()
    version_2 = tuple(c for c in schema.COLUMNS if c.since <= 2)     # adds user, a rollup dimension
    v2 = ClickHouseLedger(f"chdb://{tmp_path / 'engine'}", hold_s=0.1, columns=version_2)
    try:
        batch = records(30, seed=10)
        for r in batch:
            r.request_id += "-v2"
            r.user = "u-" + r.team[:1]
        await v2.append(batch)
        assert await v2.schema_version() == 2

        def by_user(client: object) -> list[tuple[str, int, int]]:
            return client.query(  # type: ignore[attr-defined, no-any-return]
                f"SELECT user, sum(requests), sum(cost_nano) FROM {v2.db}.{schema.DAILY} "
                f"GROUP BY user ORDER BY user").result_rows
        rows = {u: (n, c) for u, n, c in await v2._run(by_user)}
        assert rows[""][0] == 20                     # the rows written before the column existed
        for u in ("u-a", "u-b", "u-g"):
            mine = [r for r in batch if "u-" + r.team[:1] == u]
            assert rows[u] == (len(mine), sum(r.cost_nano for r in mine))
        assert len(await v2.read(BASE - 1)) == 50
    finally:
        await v2.aclose()


async def test_retention_is_the_ttl_of_both_tables(tmp_path: Path) -> None:
    ledger = ClickHouseLedger(f"chdb://{tmp_path / 'engine'}", retention_days=30, hold_s=0.1)
    try:
        await ledger.append(records(2))

        def engines(client: object) -> dict[str, str]:
            q = "SELECT name, engine_full FROM system.tables WHERE database = currentDatabase()"
            return dict(client.query(q).result_rows)  # type: ignore[attr-defined]
        tables = await ledger._run(engines)
        assert "toIntervalDay(30)" in tables[schema.RECORDS] and "toIntervalDay(30)" in tables[schema.DAILY]
        assert "PARTITION BY toYYYYMM(ts)" in tables[schema.RECORDS]
        await ledger._run(lambda c: migrate(c, ledger.db, retention_days=0))
        tables = await ledger._run(engines)
        assert "TTL" not in tables[schema.RECORDS] and "TTL" not in tables[schema.DAILY]
        assert await ledger._run(lambda c: migrate(c, ledger.db, retention_days=0)) == schema.version_of(schema.COLUMNS)
    finally:
        await ledger.aclose()


async def test_archived_ledger_writes_both_and_reports_from_clickhouse(tmp_path: Path) -> None:
    settings = Settings(clickhouse_url=f"chdb://{tmp_path / 'engine'}", spool_dir=str(tmp_path / "spool"))
    assert stream_maxlen(settings) == 100_000 and stream_maxlen(Settings()) is None
    assert stream_maxlen(Settings(ledger_max_records=7, clickhouse_url="chdb://x")) == 7
    memory = MemoryLedger()
    ledger = buffered(settings, memory)
    assert isinstance(ledger, ArchivedLedger)
    assert (tmp_path / "spool" / "clickhouse").is_dir()
    batch = records(60, seed=11)
    try:
        await ledger.append(batch[:30])
        await ledger.append(batch[30:])
        await ledger.flush(wait=True)
        assert ledger.pending == 0 and len(memory) == 60
        assert len(await ledger.read(BASE - 1)) == 60
        since = BASE + 0.3 * DAY_S
        assert await ledger.totals(since, None, None, "model") == await memory.totals(since, None, None, "model")
    finally:
        await ledger.aclose()


def test_settings_read_the_clickhouse_variables() -> None:
    s = Settings.from_env({"GATEWAY_CLICKHOUSE_URL": "http://ch:8123/gw", "GATEWAY_CLICKHOUSE_RETENTION_DAYS": "90",
                           "GATEWAY_LEDGER_BUFFER_RECORDS": "5000"})
    assert (s.clickhouse_url, s.clickhouse_retention_days, s.ledger_buffer_records) == ("http://ch:8123/gw", 90, 5000)
    assert Settings.from_env(s.to_env()).clickhouse_url == "http://ch:8123/gw"
    with pytest.raises(ValueError, match="GATEWAY_CLICKHOUSE_RETENTION_DAYS"):
        Settings.from_env({"GATEWAY_CLICKHOUSE_RETENTION_DAYS": "-1"})


async def test_every_clickhouse_dashboard_query_runs_on_the_ledger_schema(ch: ClickHouseLedger) -> None:
    import json

    from conftest import ROOT
    batch = records(120, seed=12)
    await ch.append(batch)
    frm, to = f"toDateTime({int(BASE)}, 'UTC')", f"toDateTime({int(BASE + 7 * DAY_S)}, 'UTC')"
    boards = sorted((ROOT / "grafana" / "dashboards-clickhouse").glob("*.json"))
    queries = [(p["title"], t["rawSql"].replace("$__fromTime", frm).replace("$__toTime", to))
               for path in boards for p in json.loads(path.read_text())["panels"] for t in p["targets"]]
    assert len(queries) >= 5

    def run(client: object) -> dict[str, list[tuple[object, ...]]]:
        return {title: client.query(sql).result_rows for title, sql in queries}  # type: ignore[attr-defined]
    results = await ch._run(run)
    for title, rows in results.items():
        assert rows, f"panel {title!r} returned no rows"
    by_team = {row[0]: row for row in results["Spend by team"]}
    for team in {r.team for r in batch}:
        mine = [r for r in batch if r.team == team]
        assert by_team[team][1] == len(mine)
        assert round(by_team[team][4] * 1e9) == sum(r.cost_nano for r in mine)
    assert sum(row[2] for row in results["Spend by key"]) == len(batch)


async def test_reports_by_pairs_and_keys_agree_with_the_records(ch: ClickHouseLedger) -> None:
    """ClickHouse groups by two dimensions and by key itself; a ledger without those groupings (memory)
    answers the same report from its records."""
    import time

    from gateway.admin import ops as adminops
    now = time.time()
    batch = [record(i, now - 60 * i, random.Random(i)) for i in range(50)]
    await ch.append(batch)
    doc = await adminops.spend(ch, None, "1d", "team,model")
    assert doc["by"] == "team,model" and doc["total"]["requests"] == 50
    assert {(row["team"], row["model"]) for row in doc["rows"]} == {(r.team, r.model) for r in batch}
    assert "TEAM" in render(doc, "table") and "MODEL" in render(doc, "table")
    memory = MemoryLedger()
    await memory.append(batch)
    for by in ("key", "team,model", "user", "team,user"):   # user: from ClickHouse's daily rollup
        from_ch, from_records = await adminops.spend(ch, None, "1d", by), await adminops.spend(memory, None, "1d", by)
        assert from_ch["rows"] == from_records["rows"] and from_ch["total"] == from_records["total"]
    with pytest.raises(InvalidRequest):
        await adminops.spend(ch, None, "1d", "team,bogus")


@pytest.mark.e2e
def test_gateway_spend_reads_clickhouse_directly(tmp_path: Path, redis_port: int) -> None:
    import json
    import os
    import subprocess
    import sys
    import time

    from conftest import ROOT

    async def fill() -> list[LedgerRecord]:
        ledger = ClickHouseLedger(f"chdb://{tmp_path / 'engine'}")
        now = time.time()
        batch = [record(i, now - 30 * i, random.Random(i)) for i in range(40)]
        try:
            await ledger.append(batch)
        finally:
            await ledger.aclose()
        return batch
    batch = asyncio_run(fill())
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "GATEWAY_CLICKHOUSE_URL": f"chdb://{tmp_path / 'engine'}"}
    for by in ("team", "key", "team,model"):
        out = subprocess.run([sys.executable, "-m", "gateway", "spend", "--by", by, "--since", "1d", "--format",
                              "json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["total"]["requests"] == 40
        assert doc["total"]["cost_nano"] == sum(r.cost_nano for r in batch)
    bad = subprocess.run([sys.executable, "-m", "gateway", "spend", "--by", "prompt"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "by must be" in bad.stderr


def asyncio_run(coro: object) -> list[LedgerRecord]:
    import asyncio
    return asyncio.run(coro)  # type: ignore[arg-type, no-any-return]
