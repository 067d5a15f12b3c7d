"""The spend ledger in ClickHouse (``GATEWAY_CLICKHOUSE_URL``), through ``clickhouse-connect``.

:class:`ClickHouseLedger` is a :class:`~gateway.state.ledger.Ledger`: ``append`` inserts a batch
in one INSERT whose ``insert_deduplication_token`` is a hash of the batch's records, so a batch
retried after an ambiguous failure is stored once; ``totals`` sums the daily rollup
(:mod:`gateway.state.clickhouse_schema`) for whole UTC days and the records for the partial days
at either end, so it equals the other ledgers' totals to the nano-dollar; ``read`` returns records.
The schema is created and migrated forward on first use. The URL is a server's
(``http[s]://user:password@host:8123/database``) or the engine in process, ``chdb:///path`` (on
disk) or ``chdb://memory``. chdb opens a path in one process at a time, so processes sharing one
(the workers of ``gateway serve``, the ``gateway spend`` command) take turns under a file lock
(``<path>.lock``): each keeps the engine open while it writes and lets go after ``hold_s`` idle.
Failures that may pass (server unreachable, engine busy, too many parts) raise
:class:`ConnectionError`, which :class:`~gateway.state.ledger.BufferedLedger` retries (the batch
waits in memory or in the disk spool); anything else is the batch's fault. ``clickhouse_connect``
is imported only here, and only when a ClickHouse URL is configured.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

from gateway.state import clickhouse_schema as schema
from gateway.state.ledger import DAY_S, NONE, SAVINGS_SOURCES, LedgerRecord

log = logging.getLogger(__name__)
T = TypeVar("T")

# dimension name in a report -> (expression on the rollup, expression on the records)
DIMENSIONS = {
    "team": ("team", "team"),
    "key": ("key_id", "key_id"),
    "user": ("user", "user"),
    "model": ("model", "model"),
    "provider": ("provider", "provider"),
    "day": ("toString(day)", "toString(toDate(ts))"),
}
_COUNTERS = ("requests", "cost_nano", "baseline_nano", "input_tokens", "output_tokens",
             *(f"savings_{s}" for s in SAVINGS_SOURCES))
# server error codes worth a retry: timeouts, overload, read-only, too many parts, network, keeper
_TRANSIENT = {159, 164, 202, 203, 209, 210, 236, 241, 242, 252, 319, 425, 999}
_CODE = re.compile(r"Code: (\d+)")


def dimensions(by: str) -> list[str]:
    """The report dimensions of ``by`` (``team``, ``model,day``, ...); ValueError on an unknown one."""
    dims = [d.strip() for d in by.split(",")]
    bad = [d for d in dims if d not in DIMENSIONS]
    if bad or not dims or len(set(dims)) != len(dims):
        raise ValueError(f"by must be a comma-separated list of {', '.join(DIMENSIONS)}, got {by!r}")
    return dims


def batch_token(records: Sequence[LedgerRecord]) -> str:
    """The insert deduplication token of a batch: the same records give the same token."""
    return hashlib.sha256(b"\n".join(r.to_json() for r in records)).hexdigest()


def insert_settings(token: str) -> dict[str, Any]:
    """An insert stored once per token, in the records and (the same block skipped) in the rollup."""
    return {"insert_deduplication_token": token, "deduplicate_blocks_in_dependent_materialized_views": 1}


def _transient(exc: BaseException) -> bool:
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError, StreamFailureError

    if isinstance(exc, OperationalError | StreamFailureError | OSError):
        return True
    match = _CODE.search(str(exc))
    return isinstance(exc, DatabaseError) and match is not None and int(match.group(1)) in _TRANSIENT


class _Connection:
    """One client, opened on first use; for a chdb path, under the path's file lock and closed
    after ``hold_s`` without use, so that other processes get their turn."""

    def __init__(self, url: str, hold_s: float, wait_s: float) -> None:
        parsed = urlparse(url)
        self.url = url
        self.chdb = parsed.scheme == "chdb"
        location = parsed.path if self.chdb and not parsed.netloc else ""
        self.lock_path = os.path.realpath(location) + ".lock" if location else None
        self.hold_s, self.wait_s = hold_s, wait_s
        self._client: Any = None
        self._lock_fh: IO[bytes] | None = None
        self._mutex = threading.Lock()
        self._last_use = 0.0
        self._timer: threading.Timer | None = None
        self.on_open: Callable[[Any], None] | None = None

    def run(self, fn: Callable[[Any], T]) -> T:
        with self._mutex:
            try:
                return fn(self._open())
            except Exception as exc:
                if _transient(exc):
                    self._close()
                    raise ConnectionError(f"ClickHouse at {self.safe_url} unavailable: {exc}") from exc
                raise
            finally:
                self._last_use = time.monotonic()
                self._arm()

    @property
    def safe_url(self) -> str:
        parsed = urlparse(self.url)
        return parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl()

    def _open(self) -> Any:
        if self._client is not None:
            return self._client
        import clickhouse_connect

        if self.lock_path is not None:
            self._lock_fh = self._take_lock(self.lock_path)
        try:
            client = clickhouse_connect.get_client(dsn=self.url)
            if self.on_open is not None:
                self.on_open(client)
        except Exception as exc:
            self._release_lock()
            if isinstance(exc, ConnectionError):
                raise
            raise ConnectionError(f"cannot open ClickHouse at {self.safe_url}: {exc}") from exc
        self._client = client
        return client

    def _take_lock(self, path: str) -> IO[bytes]:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fh = open(path, "a+b")   # noqa: SIM115 - held while the engine is open
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fh
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.close()
                    raise TimeoutError(f"the chdb engine at {path[:-5]} is held by another process") from None
                time.sleep(0.02)

    def _release_lock(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()   # closing drops the flock
            self._lock_fh = None

    def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:   # closing a broken client must not hide the error that broke it
                log.debug("closing the ClickHouse client: %r", exc)
        self._release_lock()

    def _arm(self) -> None:
        if not self.chdb or self.lock_path is None or self._client is None:
            return   # a server connection (or an in-memory engine) stays open
        if self._timer is None or not self._timer.is_alive():
            self._timer = threading.Timer(self.hold_s, self._idle)
            self._timer.daemon = True
            self._timer.start()

    def _idle(self) -> None:
        with self._mutex:
            self._timer = None
            if time.monotonic() - self._last_use >= self.hold_s * 0.99:
                self._close()
            else:
                self._arm()

    def close(self) -> None:
        with self._mutex:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._close()


class ClickHouseLedger:
    """The ledger in ClickHouse; see the module docstring. ``retention_days`` (0: keep for ever) is the
    TTL of records and rollups, applied when the schema is opened."""

    def __init__(self, url: str, *, retention_days: int = 400, columns: Sequence[schema.Column] = schema.COLUMNS,
                 hold_s: float = 1.0, wait_s: float = 5.0) -> None:
        if urlparse(url).scheme not in ("http", "https", "chdb", "clickhouse", "clickhouses"):
            raise ValueError(f"GATEWAY_CLICKHOUSE_URL must be http(s)://host:port/database or chdb:///path, "
                             f"got {url!r}")
        if retention_days < 0:
            raise ValueError(f"retention_days must be 0 or more, got {retention_days}")
        self.retention_days = retention_days
        self.columns = tuple(columns)
        self.names = [c.name for c in self.columns]
        self.db = "default"
        self._conn = _Connection(url, hold_s, wait_s)
        self._conn.on_open = self._ensure_schema
        self._schema_ready = False

    # ------------------------------------------------------------------ schema
    def _ensure_schema(self, client: Any) -> None:
        self.db = str(client.command("SELECT currentDatabase()"))
        if self._schema_ready:
            return
        migrate(client, self.db, self.columns, self.retention_days)
        self._schema_ready = True

    async def schema_version(self) -> int:
        return await self._run(lambda c: current_version(c, self.db))

    async def _run(self, fn: Callable[[Any], T]) -> T:
        return await asyncio.to_thread(self._conn.run, fn)

    # ------------------------------------------------------------------ writes
    def rows(self, records: Sequence[LedgerRecord]) -> list[list[Any]]:
        out = []
        for r in records:
            row = [c.value(r) for c in self.columns]
            row[1] = datetime.fromtimestamp(r.ts, UTC)
            out.append(row)
        return out

    async def append(self, records: Sequence[LedgerRecord]) -> None:
        if not records:
            return
        rows, token = self.rows(records), batch_token(records)
        await self._run(lambda c: c.insert(f"{self.db}.{schema.RECORDS}", rows, column_names=self.names,
                                           settings=insert_settings(token)))

    # ------------------------------------------------------------------ reads
    async def read(self, since: float, until: float | None = None, team: str | None = None) -> list[LedgerRecord]:
        where, params = _where("ts", since, until, team)
        sql = f"SELECT {', '.join(self.names)} FROM {self.db}.{schema.RECORDS} WHERE {where} ORDER BY ts"
        result = await self._run(lambda c: c.query(sql, parameters=params).result_rows)
        return [self._record(row) for row in result]

    def _record(self, row: Sequence[Any]) -> LedgerRecord:
        data = dict(zip(self.names, row, strict=True))
        data["ts"] = data["ts"].replace(tzinfo=UTC).timestamp() if isinstance(data["ts"], datetime) else data["ts"]
        data["key_id"] = data["key_id"] or None
        data["savings"] = {s: int(data.pop(f"savings_{s}")) for s in SAVINGS_SOURCES if data.get(f"savings_{s}")}
        return LedgerRecord.from_dict(data)

    async def totals(self, since: float, until: float | None = None, team: str | None = None,
                     by: str = "team") -> list[dict[str, Any]]:
        """Rows like :meth:`MemoryLedger.totals`; ``by`` may also be ``key``, ``provider`` or a comma list
        (the row's ``key`` is then the tuple of the values)."""
        dims = dimensions(by)
        first = -int(-since // DAY_S)                             # the first whole UTC day in the range
        end = None if until is None else int(until // DAY_S)     # the day after the last whole one
        queries: list[tuple[str, dict[str, Any]]] = []
        if end is not None and end <= first:
            queries.append(self._records_query(dims, since, until, team))
        else:
            queries.append(self._daily_query(dims, first, end, team))
            if since < first * DAY_S:
                queries.append(self._records_query(dims, since, first * DAY_S, team))
            if end is not None and until is not None and end * DAY_S < until:
                queries.append(self._records_query(dims, end * DAY_S, until, team))

        def run(client: Any) -> list[Sequence[Any]]:
            return [row for sql, params in queries for row in client.query(sql, parameters=params).result_rows]

        rows: dict[Any, Counter[str]] = {}
        for row in await self._run(run):
            values = tuple(str(v) or NONE for v in row[:len(dims)])   # no key, user, ...: as the records say
            key: Any = values if len(dims) > 1 else values[0]
            acc = rows.setdefault(key, Counter())
            for name, value in zip(_COUNTERS, row[len(dims):], strict=True):
                acc[name] += int(value)
        return [{"key": key, "requests": r["requests"], "cost_nano": r["cost_nano"],
                 "baseline_nano": r["baseline_nano"],
                 "savings_nano": {s: r[f"savings_{s}"] for s in SAVINGS_SOURCES},
                 "input_tokens": r["input_tokens"], "output_tokens": r["output_tokens"]}
                for key, r in sorted(rows.items())]

    def _daily_query(self, dims: list[str], first: int, end: int | None, team: str | None
                     ) -> tuple[str, dict[str, Any]]:
        params: dict[str, Any] = {"first": first}
        where = "day >= toDate(%(first)s)"   # Date from an integer: days since the epoch
        if end is not None:
            where += " AND day < toDate(%(end)s)"
            params["end"] = end
        if team is not None:
            where += " AND team = %(team)s"
            params["team"] = team
        keys = [f"{DIMENSIONS[d][0]} AS d{i}" for i, d in enumerate(dims)]
        sums = [f"toInt64(sum({name}))" for name in _COUNTERS]
        sql = (f"SELECT {', '.join(keys + sums)} FROM {self.db}.{schema.DAILY} WHERE {where} "
               f"GROUP BY {', '.join(f'd{i}' for i in range(len(dims)))}")
        return sql, params

    def _records_query(self, dims: list[str], since: float, until: float | None, team: str | None
                       ) -> tuple[str, dict[str, Any]]:
        where, params = _where("ts", since, until, team)
        keys = [f"{DIMENSIONS[d][1]} AS d{i}" for i, d in enumerate(dims)]
        sums = ["toInt64(count())", *(f"toInt64(sum({name}))" for name in _COUNTERS[1:])]
        sql = (f"SELECT {', '.join(keys + sums)} FROM {self.db}.{schema.RECORDS} WHERE {where} "
               f"GROUP BY {', '.join(f'd{i}' for i in range(len(dims)))}")
        return sql, params

    async def aclose(self) -> None:
        await asyncio.to_thread(self._conn.close)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(ts: float) -> int:
    """``ts`` in whole microseconds, rounded as the ``datetime`` a record's ``ts`` is stored as."""
    return (datetime.fromtimestamp(ts, UTC) - _EPOCH) // timedelta(microseconds=1)


def _where(column: str, since: float, until: float | None, team: str | None) -> tuple[str, dict[str, Any]]:
    where = f"{column} >= fromUnixTimestamp64Micro(toInt64(%(since)s), 'UTC')"
    params: dict[str, Any] = {"since": _micros(since)}
    if until is not None:
        where += f" AND {column} < fromUnixTimestamp64Micro(toInt64(%(until)s), 'UTC')"
        params["until"] = _micros(until)
    if team is not None:
        where += " AND team = %(team)s"
        params["team"] = team
    return where, params


def current_version(client: Any, db: str) -> int:
    client.command(schema.versions_table(db))
    return int(client.command(f"SELECT max(version) FROM {db}.{schema.VERSIONS}") or 0)


def migrate(client: Any, db: str, columns: Sequence[schema.Column] = schema.COLUMNS,
            retention_days: int = 400) -> int:
    """Apply the schema versions after the database's (each recorded in ``schema_version``) and set the
    retention; returns the version now in force. A database newer than this code is left alone."""
    version = current_version(client, db)
    steps = schema.migrations(db, columns, retention_days)
    for number, statements in enumerate(steps, start=1):
        if number <= version:
            continue
        for sql in statements:
            client.command(sql)
        client.command(f"INSERT INTO {db}.{schema.VERSIONS} (version) VALUES ({number})")
        log.info("ClickHouse ledger schema migrated to version %d", number)
    if version > len(steps):
        log.warning("ClickHouse ledger schema is at version %d, newer than this gateway's %d", version, len(steps))
    _apply_retention(client, db, retention_days)
    return max(version, len(steps))


def _apply_retention(client: Any, db: str, days: int) -> None:
    query = ("SELECT engine_full FROM system.tables WHERE database = %(db)s AND name = %(name)s")
    engine = str(client.query(query, parameters={"db": db, "name": schema.RECORDS}).result_rows[0][0])
    current = re.search(r"toIntervalDay\((\d+)\)|INTERVAL (\d+) DAY", engine)
    have = int(next(g for g in current.groups() if g)) if current else 0
    if have != days:
        for sql in schema.retention_statements(db, days):
            client.command(sql, settings={"materialize_ttl_after_modify": 0})
        log.info("ClickHouse ledger retention set to %s", f"{days} days" if days else "for ever")
