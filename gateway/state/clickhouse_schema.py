"""The ClickHouse ledger's schema, from one list of columns, and its forward migrations.

:data:`COLUMNS` is the one place a ledger column is declared: its ClickHouse type, how a
:class:`~gateway.state.ledger.LedgerRecord` fills it, whether it is a rollup dimension, and the
schema version that added it. The tables and the migrations are derived from it:

- ``ledger_records``: one row per record, a MergeTree partitioned by month, ordered by
  (team, ts, request_id), with a TTL of the configured retention and an insert deduplication
  window (a retried batch, same ``insert_deduplication_token``, is stored once);
- ``ledger_daily``: a SummingMergeTree of the counters per day and dimension (team, key, model,
  provider, and later user and tag), filled by the materialized view ``ledger_daily_mv``;
- ``schema_version``: one row per applied migration.

Adding a field (say ``user``) is one change: a :class:`Column` with ``since=2`` (``dimension=True``
to roll up by it). Version 2 is then derived: ``ADD COLUMN`` on the records, and for a dimension
``ADD COLUMN`` plus ``MODIFY ORDER BY`` on the rollup and the view re-created to group by it.
A multi-valued field (``tags``, an ``Array(String)``) is a plain column here; rolling up by tag
needs a rollup table of its own (``arrayJoin`` repeats a request's counters under each of its
tags, so those sums must never be added across tags), one more migration step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.state.ledger import SAVINGS_SOURCES, LedgerRecord

RECORDS = "ledger_records"
DAILY = "ledger_daily"
DAILY_MV = "ledger_daily_mv"
VERSIONS = "schema_version"
DEDUP_WINDOW = 10_000   # the last inserted blocks whose token a retry is checked against


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str
    value: Callable[[LedgerRecord], Any]
    dimension: bool = False   # a key of the daily rollup
    counter: bool = False     # summed into the daily rollup
    since: int = 1            # the schema version that added it


def _attr(name: str) -> Callable[[LedgerRecord], Any]:
    return lambda r: getattr(r, name)


def _saving(source: str) -> Callable[[LedgerRecord], Any]:
    return lambda r: int(r.savings.get(source, 0))


_LC = "LowCardinality(String)"
COLUMNS: tuple[Column, ...] = (
    Column("request_id", "String", _attr("request_id")),
    Column("ts", "DateTime64(6, 'UTC')", _attr("ts")),
    Column("team", _LC, _attr("team"), dimension=True),
    Column("key_id", "String", lambda r: r.key_id or "", dimension=True),
    Column("requested_model", _LC, _attr("requested_model")),
    Column("model", _LC, _attr("model"), dimension=True),
    Column("deployment", _LC, _attr("deployment")),
    Column("provider", _LC, _attr("provider"), dimension=True),
    Column("route", _LC, _attr("route")),
    Column("input_tokens", "Int64", _attr("input_tokens"), counter=True),
    Column("output_tokens", "Int64", _attr("output_tokens"), counter=True),
    Column("cached_input_tokens", "Int64", _attr("cached_input_tokens")),
    Column("cache_write_tokens", "Int64", _attr("cache_write_tokens")),
    Column("reasoning_tokens", "Int64", _attr("reasoning_tokens")),
    Column("cost_nano", "Int64", _attr("cost_nano"), counter=True),
    Column("baseline_nano", "Int64", _attr("baseline_nano"), counter=True),
    *(Column(f"savings_{s}", "Int64", _saving(s), counter=True) for s in SAVINGS_SOURCES),
    Column("latency_ms", "Float64", _attr("latency_ms")),
    Column("ttft_ms", "Nullable(Float64)", _attr("ttft_ms")),
    Column("status", _LC, _attr("status")),
    Column("cache", _LC, _attr("cache")),
    Column("compressed", "Bool", _attr("compressed")),
    Column("compression_saved_tokens", "Int64", _attr("compression_saved_tokens")),
    Column("estimated", "Bool", _attr("estimated")),
    Column("stream", "Bool", _attr("stream")),
    # attribution (version 2): the end user is a rollup dimension; tags repeat a request's cost under each
    # tag, so they stay on the records (a by-tag report reads them)
    Column("endpoint", _LC, _attr("endpoint"), since=2),
    Column("user", "String", lambda r: r.user or "", dimension=True, since=2),
    Column("tags", "Array(String)", lambda r: list(r.tags), since=2),
    Column("session", "String", lambda r: r.session or "", since=2),
    Column("agent", "String", lambda r: r.agent or "", since=2),
    Column("parent_agent", "String", lambda r: r.parent_agent or "", since=2),
    Column("overrun", "Bool", _attr("overrun"), since=2),
    Column("hold_id", "String", _attr("hold_id"), since=3),   # the budget hold a worker lease tracked
)
# Fields a column stores under another shape (savings: one column per source).
STORED_ELSEWHERE = frozenset({"savings"})


def version_of(columns: Sequence[Column]) -> int:
    return max(c.since for c in columns)


def _upto(columns: Sequence[Column], version: int) -> list[Column]:
    return [c for c in columns if c.since <= version]


def _ttl(expr: str, days: int) -> str:
    return f"TTL {expr} + INTERVAL {days} DAY" if days else ""


def _mv(db: str, columns: Sequence[Column]) -> str:
    dims = [c.name for c in columns if c.dimension]
    sums = [f"sum({c.name}) AS {c.name}" for c in columns if c.counter]
    return (f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{DAILY_MV} TO {db}.{DAILY} AS "
            f"SELECT toDate(ts) AS day, {', '.join(dims)}, toUInt64(count()) AS requests, {', '.join(sums)} "
            f"FROM {db}.{RECORDS} GROUP BY day, {', '.join(dims)}")


def _create(db: str, columns: Sequence[Column], retention_days: int) -> list[str]:
    dims = [c for c in columns if c.dimension]
    sums = [c for c in columns if c.counter]
    records = ", ".join(f"{c.name} {c.type}" for c in columns)
    daily = ", ".join(["day Date", *(f"{c.name} {c.type}" for c in dims), "requests UInt64",
                       *(f"{c.name} {c.type}" for c in sums)])
    return [
        f"CREATE TABLE IF NOT EXISTS {db}.{RECORDS} ({records}) ENGINE = MergeTree "
        f"PARTITION BY toYYYYMM(ts) ORDER BY (team, ts, request_id) {_ttl('toDateTime(ts)', retention_days)} "
        f"SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}",
        f"CREATE TABLE IF NOT EXISTS {db}.{DAILY} ({daily}) ENGINE = SummingMergeTree "
        f"PARTITION BY toYYYYMM(day) ORDER BY (day, {', '.join(c.name for c in dims)}) "
        f"{_ttl('day', retention_days)} SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}",
        _mv(db, columns),
    ]


def _added(db: str, columns: Sequence[Column], version: int) -> list[str]:
    new = [c for c in columns if c.since == version]
    now = _upto(columns, version)
    out = [f"ALTER TABLE {db}.{RECORDS} ADD COLUMN IF NOT EXISTS {c.name} {c.type}" for c in new]
    rolled = [c for c in new if c.dimension or c.counter]
    if rolled:
        changes = [f"ADD COLUMN {c.name} {c.type}" for c in rolled]
        if any(c.dimension for c in new):   # a new column joins the sorting key in the ALTER that adds it
            changes.append(f"MODIFY ORDER BY ({', '.join(['day', *(c.name for c in now if c.dimension)])})")
        out.append(f"ALTER TABLE {db}.{DAILY} {', '.join(changes)}")
        out += [f"DROP VIEW IF EXISTS {db}.{DAILY_MV}", _mv(db, now)]
    return out


def migrations(db: str, columns: Sequence[Column] = COLUMNS, retention_days: int = 400) -> list[list[str]]:
    """The statements of each schema version in order: ``migrations(...)[v - 1]`` takes v - 1 to v."""
    out = [_create(db, _upto(columns, 1), retention_days)]
    for version in range(2, version_of(columns) + 1):
        out.append(_added(db, columns, version))
    return out


def versions_table(db: str) -> str:
    return (f"CREATE TABLE IF NOT EXISTS {db}.{VERSIONS} (version UInt32, applied_at DateTime DEFAULT now()) "
            f"ENGINE = MergeTree ORDER BY version")


def retention_statements(db: str, days: int) -> list[str]:
    """Set (or remove, ``days`` 0) the TTL of both tables to the configured retention."""
    if not days:
        return [f"ALTER TABLE {db}.{RECORDS} REMOVE TTL", f"ALTER TABLE {db}.{DAILY} REMOVE TTL"]
    return [f"ALTER TABLE {db}.{RECORDS} MODIFY TTL toDateTime(ts) + INTERVAL {days} DAY",
            f"ALTER TABLE {db}.{DAILY} MODIFY TTL day + INTERVAL {days} DAY"]
