"""Virtual keys in the embedded SQLite database (table ``keys``: id, the secret's SHA-256, team, the
record as JSON), for every worker on the machine and for ``gateway keys`` run beside them. The
secret is never stored: :func:`gateway.state.keys.hash_secret` is the only way in, as on Redis.
Every call is one statement or one ``BEGIN IMMEDIATE`` transaction; SQLite errors become
:class:`StateUnavailable`.
"""

from __future__ import annotations

import builtins
import contextlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal

from gateway.state.budgets import StateUnavailable
from gateway.state.keys import KeyRecord, _new_record, hash_secret, new_secret


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise StateUnavailable(f"key database: {exc}") from exc


class SqliteKeyStore:
    def __init__(self, conn: sqlite3.Connection, owns_connection: bool = True) -> None:
        self.conn = conn
        self._owns = owns_connection

    async def create(self, team: str, name: str, *, expires_at: float | None = None,
                     budget_usd: str | Decimal | None = None, budget_period: str | None = None,
                     rpm: int | None = None, tpm: int | None = None,
                     max_usd_per_minute: str | Decimal | None = None) -> tuple[KeyRecord, str]:
        for _ in range(5):  # a 48-bit id or 256-bit secret colliding is a near-impossible retry
            secret = new_secret()
            record = _new_record(team, name, secret, expires_at, budget_usd, budget_period, rpm, tpm,
                                 max_usd_per_minute)
            try:
                with _errors():
                    self.conn.execute("INSERT INTO keys (id, hash, team, record) VALUES (?, ?, ?, ?)",
                                      (record.id, hash_secret(secret), record.team, record.to_json().decode()))
            except StateUnavailable as exc:
                if isinstance(exc.__cause__, sqlite3.IntegrityError):
                    continue
                raise
            return record, secret
        raise RuntimeError("could not allocate a unique key id")

    async def lookup(self, secret: str) -> KeyRecord | None:
        with _errors():
            row = self.conn.execute("SELECT record FROM keys WHERE hash = ?", (hash_secret(secret),)).fetchone()
        return None if row is None else KeyRecord.from_json(row[0])

    async def get(self, key_id: str) -> KeyRecord | None:
        with _errors():
            row = self.conn.execute("SELECT record FROM keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else KeyRecord.from_json(row[0])

    async def list(self, team: str | None = None) -> builtins.list[KeyRecord]:
        with _errors():
            if team is None:
                rows = self.conn.execute("SELECT record FROM keys").fetchall()
            else:
                rows = self.conn.execute("SELECT record FROM keys WHERE team = ?", (team,)).fetchall()
        return sorted((KeyRecord.from_json(r[0]) for r in rows), key=lambda r: (r.created_at, r.id))

    async def revoke(self, key_id: str) -> bool:
        c = self.conn
        with _errors():
            c.execute("BEGIN IMMEDIATE")
            try:
                row = c.execute("SELECT record FROM keys WHERE id = ?", (key_id,)).fetchone()
                record = None if row is None else KeyRecord.from_json(row[0])
                if record is None or record.revoked_at is not None:
                    c.execute("COMMIT")
                    return False
                c.execute("UPDATE keys SET record = ? WHERE id = ?",
                          (replace(record, revoked_at=time.time()).to_json().decode(), key_id))
                c.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    c.execute("ROLLBACK")
                raise
        return True

    async def has_keys(self) -> bool:
        with _errors():
            return self.conn.execute("SELECT EXISTS (SELECT 1 FROM keys)").fetchone()[0] == 1

    async def aclose(self) -> None:
        if self._owns:
            self.conn.close()
