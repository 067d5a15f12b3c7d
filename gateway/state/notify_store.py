"""Budget notification claims and the outbox of pending deliveries, in memory or in Redis.

:meth:`claim` decides, atomically across every worker and replica, which one sends the
notification of a (webhook, budget, period, threshold): the first claim wins and, in the same
atomic step, puts the delivery in the outbox, so a gateway that restarts before delivering
loses nothing (Redis keeps it). :meth:`take` leases due deliveries to one worker (another
worker does not take them for ``lease_s``); :meth:`done` removes a delivered one and
:meth:`retry` schedules the next attempt. All Redis keys share the ``{notify}`` hash tag, so
each script works on Redis Cluster. :class:`SqliteNotifyStore` does the same in one SQLite file
for the embedded deployment (every worker of one machine shares it; a restart keeps it).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.exceptions import RedisClusterException, RedisError

from gateway.state.budgets import StateUnavailable

PREFIX = "gw:v2:{notify}"
_ERRORS = (RedisError, RedisClusterException, OSError)

CLAIM = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
return 1
"""
TAKE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for i = 1, #ids do
  redis.call('ZADD', KEYS[1], ARGV[2], ids[i])
  out[#out + 1] = ids[i]
  out[#out + 1] = redis.call('HGET', KEYS[2], ids[i]) or ''
  out[#out + 1] = redis.call('HINCRBY', KEYS[3], ids[i], 1)
end
return out
"""
DONE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""


@dataclass(frozen=True, slots=True)
class Pending:
    id: str
    payload: bytes
    attempt: int   # 1 for the first delivery


class NotifyStore(Protocol):
    async def claim(self, claim_id: str, payload: bytes, keep_s: int) -> bool: ...

    async def take(self, lease_s: float, limit: int) -> list[Pending]: ...

    async def done(self, claim_id: str) -> None: ...

    async def retry(self, claim_id: str, at: float) -> None: ...


@dataclass
class MemoryNotifyStore:
    """One process: claims and outbox in memory (a restart forgets pending deliveries)."""

    clock: Callable[[], float] = time.time
    _claims: dict[str, float] = field(default_factory=dict)
    _due: dict[str, float] = field(default_factory=dict)
    _payloads: dict[str, bytes] = field(default_factory=dict)
    _attempts: dict[str, int] = field(default_factory=dict)

    async def claim(self, claim_id: str, payload: bytes, keep_s: int) -> bool:
        now = self.clock()
        if self._claims.get(claim_id, 0.0) > now:
            return False
        self._claims[claim_id] = now + keep_s
        self._due[claim_id], self._payloads[claim_id] = now, payload
        return True

    async def take(self, lease_s: float, limit: int) -> list[Pending]:
        now = self.clock()
        ids = sorted((at, cid) for cid, at in self._due.items() if at <= now)[:limit]
        out = []
        for _, cid in ids:
            self._due[cid] = now + lease_s
            self._attempts[cid] = self._attempts.get(cid, 0) + 1
            out.append(Pending(cid, self._payloads[cid], self._attempts[cid]))
        return out

    async def done(self, claim_id: str) -> None:
        for d in (self._due, self._payloads, self._attempts):
            d.pop(claim_id, None)

    async def retry(self, claim_id: str, at: float) -> None:
        if claim_id in self._due:
            self._due[claim_id] = at


class RedisNotifyStore:
    """Claims (``claim:<id>``, kept until the budget's period is over) and the outbox (a zset of due
    times, the payloads and attempt counts in hashes), shared by every worker and replica."""

    def __init__(self, client: Any) -> None:
        self._r = client
        self.outbox, self.payloads, self.attempts = f"{PREFIX}:outbox", f"{PREFIX}:payloads", f"{PREFIX}:attempts"

    async def _eval(self, script: str, keys: list[str], *args: Any) -> Any:
        try:
            return await self._r.eval(script, len(keys), *keys, *args)
        except _ERRORS as exc:
            raise StateUnavailable(f"notification store unavailable: {type(exc).__name__}: {exc}") from exc

    async def claim(self, claim_id: str, payload: bytes, keep_s: int) -> bool:
        return int(await self._eval(CLAIM, [f"{PREFIX}:claim:{claim_id}", self.outbox, self.payloads],
                                    claim_id, payload, max(1, keep_s), f"{time.time():.3f}")) == 1

    async def take(self, lease_s: float, limit: int) -> list[Pending]:
        now = time.time()
        reply = await self._eval(TAKE, [self.outbox, self.payloads, self.attempts], f"{now:.3f}",
                                 f"{now + lease_s:.3f}", limit)
        out = []
        for i in range(0, len(reply), 3):
            cid = reply[i].decode() if isinstance(reply[i], bytes) else str(reply[i])
            payload = reply[i + 1] if isinstance(reply[i + 1], bytes) else str(reply[i + 1]).encode()
            if payload:
                out.append(Pending(cid, payload, int(reply[i + 2])))
            else:                      # a payload lost (should not happen): nothing to send
                await self.done(cid)
        return out

    async def done(self, claim_id: str) -> None:
        await self._eval(DONE, [self.outbox, self.payloads, self.attempts], claim_id)

    async def retry(self, claim_id: str, at: float) -> None:
        try:
            await self._r.zadd(self.outbox, {claim_id: at}, xx=True)
        except _ERRORS as exc:
            raise StateUnavailable(f"notification store unavailable: {exc}") from exc


class SqliteNotifyStore:
    """Claims and outbox in a SQLite file: each operation is one ``BEGIN IMMEDIATE`` transaction, so
    the workers of one machine sharing the file claim and lease atomically, and pending deliveries
    survive a restart."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._db = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS notify_claims (id TEXT PRIMARY KEY, expires REAL NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS notify_outbox (id TEXT PRIMARY KEY, due REAL NOT NULL, "
                         "payload BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0)")

    def _tx(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = work(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return out
        except sqlite3.Error as exc:
            raise StateUnavailable(f"notification store unavailable: {exc}") from exc

    async def claim(self, claim_id: str, payload: bytes, keep_s: int) -> bool:
        now = self.clock()

        def work(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM notify_claims WHERE id = ? AND expires <= ?", (claim_id, now))
            if db.execute("INSERT OR IGNORE INTO notify_claims VALUES (?, ?)", (claim_id, now + keep_s)).rowcount != 1:
                return False
            db.execute("INSERT OR REPLACE INTO notify_outbox VALUES (?, ?, ?, 0)", (claim_id, now, payload))
            return True
        return bool(self._tx(work))

    async def take(self, lease_s: float, limit: int) -> list[Pending]:
        now = self.clock()

        def work(db: sqlite3.Connection) -> list[Pending]:
            rows = db.execute("SELECT id, payload, attempts FROM notify_outbox WHERE due <= ? ORDER BY due LIMIT ?",
                              (now, limit)).fetchall()
            for cid, _, _ in rows:
                db.execute("UPDATE notify_outbox SET due = ?, attempts = attempts + 1 WHERE id = ?",
                           (now + lease_s, cid))
            return [Pending(cid, bytes(payload), attempts + 1) for cid, payload, attempts in rows]
        return list(self._tx(work))

    async def done(self, claim_id: str) -> None:
        self._tx(lambda db: db.execute("DELETE FROM notify_outbox WHERE id = ?", (claim_id,)))

    async def retry(self, claim_id: str, at: float) -> None:
        self._tx(lambda db: db.execute("UPDATE notify_outbox SET due = ? WHERE id = ?", (at, claim_id)))

    def close(self) -> None:
        self._db.close()
