"""The spend ledger in the embedded SQLite database: every record, kept, plus exact per-day rollups.

Table ``ledger`` holds each :class:`LedgerRecord` as JSON with its ``ts``, team and model (indexed by
time, and by team then time); ``ledger_rollups`` holds the integer counters of
:func:`gateway.state.ledger.counters` per (UTC day, team, model), the split :class:`MemoryLedger`
keeps, so every grouping and team filter sums from it. A batch's records and its rollup increments
are stored in one transaction, together or not at all. ``totals`` takes the
whole UTC days of a range from the rollups and the partial days at its ends from the records; both
sum the same integers, so a report agrees with the records to the nano-dollar. Unlike the memory
window, no record is ever evicted: ``read`` sees the whole history.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from gateway.state.ledger import DAY_S, LedgerRecord, _Totals, counters, day_of
from gateway.state.sqlite_db import GroupCommit

log = logging.getLogger(__name__)
_PAGE = 5_000


class SqliteLedger:
    """``append`` stores a batch in a transaction of its own; ``queue`` adds records to the connection's
    :class:`GroupCommit` instead (the gateway's path: committed at the end of the loop iteration, with
    the settles of the same requests)."""

    def __init__(self, conn: sqlite3.Connection, owns_connection: bool = True, group: GroupCommit | None = None
                 ) -> None:
        self.conn = conn
        self._owns = owns_connection
        self._queued: list[LedgerRecord] = []
        self.group = group if group is not None else GroupCommit(conn)
        self.group.join(self)

    async def append(self, records: Sequence[LedgerRecord]) -> None:
        """Store a batch in one transaction (``sqlite3.OperationalError``, e.g. the lock not obtained in
        time, leaves nothing written; :class:`BufferedLedger` keeps the batch and retries it)."""
        if records:
            with self.group.transaction() as c:
                self._store(c, records)

    def queue(self, record: LedgerRecord) -> None:
        self._queued.append(record)
        self.group.touch()

    @property
    def queued(self) -> int:
        return len(self._queued)

    def write(self, c: sqlite3.Connection) -> None:
        self._store(c, self._queued)

    def store(self, c: sqlite3.Connection, records: Sequence[LedgerRecord]) -> None:
        """Store ``records`` in the caller's open transaction ``c`` (a dead worker's, with the holds they end)."""
        self._store(c, records)

    def committed(self) -> None:
        self._queued.clear()

    def failed(self, reason: BaseException) -> None:
        """The records stay queued for the next transaction."""

    def discard(self, reason: BaseException) -> None:
        log.error("ledger rejected %d records (%r): %s", len(self._queued), reason,
                  [r.to_json().decode() for r in self._queued])
        self._queued.clear()

    @staticmethod
    def _store(c: sqlite3.Connection, records: Sequence[LedgerRecord]) -> None:
        rollups: dict[tuple[int, str, str], Counter[str]] = {}
        rows = []
        for r in records:
            rows.append((r.ts, r.team, r.model, r.to_json()))
            row = rollups.setdefault((int(r.ts // DAY_S), r.team, r.model), Counter())
            for name, value in counters(r).items():
                row[name] += value
        c.executemany("INSERT INTO ledger (ts, team, model, record) VALUES (?, ?, ?, ?)", rows)
        c.executemany("INSERT INTO ledger_rollups (day, team, model, name, value) VALUES (?, ?, ?, ?, ?) "
                      "ON CONFLICT DO UPDATE SET value = value + excluded.value",
                      [(day, team, model, name, value) for (day, team, model), row in rollups.items()
                       for name, value in row.items() if value])

    def scan(self, since: float, until: float | None = None, team: str | None = None) -> Iterator[LedgerRecord]:
        """Records with ``since <= ts < until`` (and of ``team``), oldest first, a page at a time."""
        where, args = ["ts >= ?"], list[Any]([since])
        if until is not None:
            where.append("ts < ?")
            args.append(until)
        if team is not None:
            where.append("team = ?")
            args.append(team)
        last_ts, last_seq = float("-inf"), -1
        while True:
            rows = self.conn.execute(
                f"SELECT seq, ts, record FROM ledger WHERE {' AND '.join(where)} AND (ts > ? OR (ts = ? AND seq > ?)) "
                f"ORDER BY ts, seq LIMIT {_PAGE}", (*args, last_ts, last_ts, last_seq)).fetchall()
            for _seq, _ts, raw in rows:
                yield LedgerRecord.from_json(raw)
            if len(rows) < _PAGE:
                return
            last_seq, last_ts = int(rows[-1][0]), float(rows[-1][1])

    async def read(self, since: float, until: float | None = None, team: str | None = None) -> list[LedgerRecord]:
        return list(self.scan(since, until, team))

    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0])

    async def totals(self, since: float, until: float | None = None, team: str | None = None,
                     by: str = "team") -> list[dict[str, Any]]:
        totals = _Totals(by)
        first = -int(-since // DAY_S)                              # the first whole day in the range
        end = None if until is None else int(until // DAY_S)      # the day after the last whole one
        if end is not None and end <= first:                      # no whole day: all from the records
            records = list(self.scan(since, until, team))
        else:
            column = {"team": "team", "model": "model", "day": "day"}[by]
            where, args = ["day >= ?"], list[Any]([first])
            if end is not None:
                where.append("day < ?")
                args.append(end)
            if team is not None:
                where.append("team = ?")
                args.append(team)
            rows = self.conn.execute(f"SELECT {column}, name, SUM(value) FROM ledger_rollups "
                                     f"WHERE {' AND '.join(where)} GROUP BY {column}, name", args).fetchall()
            grouped: dict[str, dict[str, int]] = {}
            for key, name, value in rows:
                label = day_of(int(key) * DAY_S, "%Y-%m-%d") if by == "day" else str(key)
                grouped.setdefault(label, {})[str(name)] = int(value)
            for label, values in grouped.items():
                totals.add(label, values)
            records = list(self.scan(since, first * DAY_S, team))
            if end is not None:
                records += self.scan(end * DAY_S, until, team)
        for r in records:
            totals.add_record(r)
        return totals.result()

    async def aclose(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.group.commit()
        if self._owns:
            self.conn.close()
