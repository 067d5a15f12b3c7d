"""A :class:`BudgetStore` in the embedded SQLite database, shared by every worker on the machine.

The semantics are those of :mod:`gateway.state.budgets_memory` and the Redis script, operation for
operation: a reserve is all-or-nothing over every budget and rate window (the tightest budget
decides, a partial hold is capped at its headroom, soft thresholds refuse with ``budget_soft``, a
repeated reserve of a live or settled request is a no-op that reports the state); a settle releases
the whole hold, adds the actual cost once (a settled mark, kept by this process as in the memory
store, makes a second settle a no-op) and replaces the TPM estimate by the truth in the window the reserve counted it
in; a renew pushes a live hold's expiry; a hold not renewed lapses after the reservation TTL (at most
every ``lapse_every_s``, a transaction first releases the lapsed ones). Reserves, settles and the
ledger records of one event-loop iteration share one ``BEGIN IMMEDIATE`` transaction (the
connection's :class:`GroupCommit`, committed at the end of the iteration): the settles first, then
each reserve in arrival order, decided on what the ones before it wrote, so workers in other
processes see the batch whole and in order, the atomicity the Lua script gets from Redis, and a
request pays for a share of one commit instead of a transaction of its own. Within the batch each
bucket and rate window is read once and written once (:class:`_Batch` adds the holds, spend and
releases up in memory): a request's own statements are the INSERT of its hold's row and the
DELETE that releases it. A reserve returns
once that commit is done; a settle too, so it is on disk when it returns. Until then its hold
still counts, which can only refuse, never overspend. A request's id is its process's own: a
repeated reserve or settle can only come from the same process, which remembers its live holds
and settled ids (a hold's row is read back only for a repeat). Time is the wall
clock (one machine, one clock for every worker), injectable for tests. With a ``worker`` (this
process, :mod:`gateway.state.leases_sqlite`), a hold taken with an intent names its process and keeps
the intent in its row (the same INSERT), and :meth:`take` turns a dead process's holds into spend.
A request with no budget and no rate limit has nothing to count and touches no row. SQLite errors (the lock not obtained
within the busy timeout, a full disk) raise :class:`StateUnavailable`, as an unreachable Redis does:
the reserves of the failed transaction fail, its settles wait for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from gateway.state.budgets import (
    WINDOW_S,
    Admission,
    BudgetRule,
    BudgetUsage,
    Plan,
    ReserveRequest,
    StateUnavailable,
    admission_from_reply,
    check_amount,
    check_budget_rule,
    decide,
    decided_admission,
    home_of,
    period_id,
    plan,
)
from gateway.state.sqlite_db import GroupCommit

log = logging.getLogger(__name__)
_SWEEP_EVERY_S = 60.0
_MAX_SETTLED = 10_000    # a repeated settle comes right after the first: the newest ids suffice
_NO_LIMITS = (0, 0, 0, 0, -1, -1, -1, -1, -1, -1)   # the reply after (admitted, reserved): no refusal, no limits
_BUCKET = "team = ? AND scope = ? AND owner = ? AND period_id = ?"


@dataclass(slots=True)
class _Reserve:
    """A reserve waiting for its transaction, then its decision until the commit."""

    req: ReserveRequest
    plan: Plan
    future: asyncio.Future[Admission]
    intent: bytes | None = None     # the intent's JSON (worker leases), written with the hold
    admission: Admission | None = None


class _Batch:
    """The reserves of one transaction: each bucket and rate window is read once, the batch's holds
    are added up in memory (a reserve sees those of the reserves before it) and written at the end,
    one row per bucket, so a batch of n reserves costs a few statements plus one INSERT row each."""

    def __init__(self, store: SqliteBudgetStore, c: sqlite3.Connection, now: float) -> None:
        self.store, self.c, self.now = store, c, now
        self._used: dict[tuple[str, str, str, str], int] = {}      # bucket -> spent + reserved, holds included
        self._window: dict[tuple[str, str, str], int] = {}         # sliding window -> what it holds
        self.rates: dict[tuple[str, str, str], tuple[int, int]] = {}   # rate window -> (requests, tokens)
        self.dirty_rates: set[tuple[str, str, str]] = set()
        self.minute = 0
        self.held: dict[tuple[str, str, str, str], list[float]] = {}   # bucket -> [added hold, expires at]
        self.window_rows: list[tuple[str, str, str, str, int, float]] = []
        self.reservations: list[tuple[str, str, int, int, int, str, float, str, bytes | None]] = []
        self.holds: dict[tuple[str, str], int] = {}                # (team, id) -> hold taken in this batch
        self.spent: dict[tuple[str, str, str, str], list[float]] = {}  # bucket -> [cost, released, expires at]
        self.tokens: dict[tuple[str, str, str, int], int] = {}     # (rate window, minute) -> truth - estimates

    def used(self, key: tuple[str, str, str, str]) -> int:
        if key not in self._used:
            self._used[key] = self.store._used(self.c, key, self.now)
        return self._used[key]

    def window_used(self, key: tuple[str, str, str, str]) -> int:
        k = key[:3]
        if k not in self._window:
            self._window[k] = self.store._window_used(self.c, key, self.now)
        return self._window[k]

    def counts(self, key: tuple[str, str, str], minute: int) -> tuple[int, int]:
        if key not in self.rates:
            w = self.c.execute("SELECT minute, requests, tokens FROM rate_windows WHERE team = ? AND scope = ? "
                               "AND owner = ?", key).fetchone()
            self.rates[key] = (0, 0) if w is None or w[0] != minute else (int(w[1]), int(w[2]))
            self.minute = minute
        return self.rates[key]

    def hold(self, key: tuple[str, str, str, str], amount: int, expires_at: float) -> None:
        self._used[key] += amount
        acc = self.held.setdefault(key, [0, expires_at])
        acc[0] += amount
        acc[1] = max(acc[1], expires_at)

    def hold_window(self, key: tuple[str, str, str, str], rid: str, amount: int, expires_at: float) -> None:
        self._window[key[:3]] += amount
        self.window_rows.append((*key[:3], rid, amount, expires_at))

    def spend(self, key: tuple[str, str, str, str], cost: int, released: int, expires_at: float) -> None:
        acc = self.spent.setdefault(key, [0, 0, expires_at])
        acc[0] += cost
        acc[1] += released
        acc[2] = max(acc[2], expires_at)

    def flush_settles(self) -> None:
        """Write the settles' spend and releases (one row update per bucket) and their TPM corrections."""
        if self.spent:
            self.c.executemany(
                "INSERT INTO budget_buckets (team, scope, owner, period_id, spent, reserved, expires_at) "
                "VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6) ON CONFLICT DO UPDATE SET spent = spent + ?5, "
                "reserved = MAX(0, reserved - ?7), expires_at = MAX(expires_at, ?6)",
                [(*key, int(cost), expires, int(released)) for key, (cost, released, expires) in self.spent.items()])
            self.spent.clear()
        if self.tokens:
            self.c.executemany("UPDATE rate_windows SET tokens = MAX(0, tokens + ?) WHERE team = ? AND scope = ? "
                               "AND owner = ? AND minute = ?", [(d, *k) for k, d in self.tokens.items() if d])
            self.tokens.clear()

    def flush(self) -> None:
        """Write the batch's holds, rate counts and reservations, and forget what was read."""
        c = self.c
        if self.held:
            c.executemany("INSERT INTO budget_buckets (team, scope, owner, period_id, spent, reserved, expires_at) "
                          "VALUES (?, ?, ?, ?, 0, ?, ?) ON CONFLICT DO UPDATE SET reserved = reserved + "
                          "excluded.reserved, expires_at = MAX(expires_at, excluded.expires_at)",
                          [(*key, int(amount), expires) for key, (amount, expires) in self.held.items()])
        if self.window_rows:
            c.executemany("INSERT OR REPLACE INTO window_holds VALUES (?, ?, ?, ?, ?, ?)", self.window_rows)
        if self.dirty_rates:
            c.executemany("INSERT OR REPLACE INTO rate_windows VALUES (?, ?, ?, ?, ?, ?)",
                          [(*k, self.minute, *self.rates[k]) for k in self.dirty_rates])
        if self.reservations:
            c.executemany("INSERT INTO reservations (team, request_id, amount, minute, tokens, buckets, expires_at, "
                          "worker, intent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", self.reservations)
        self._used.clear()
        self._window.clear()
        self.rates.clear()
        self.dirty_rates.clear()
        self.held.clear()
        self.window_rows.clear()
        self.reservations.clear()


class SqliteBudgetStore:
    """Budgets and rate limits in SQLite (``conn`` from :func:`gateway.state.sqlite_db.connect`)."""

    def __init__(self, conn: sqlite3.Connection, reservation_ttl_s: float = 900, *,
                 clock: Callable[[], float] = time.time, bucket_grace_s: int = 7 * 86_400,
                 partial_reservations: bool = True, group: GroupCommit | None = None,
                 owns_connection: bool = True, worker: str = "") -> None:
        if reservation_ttl_s <= 0:
            raise ValueError("reservation_ttl_s must be > 0")
        self.conn = conn
        self.reservation_ttl_s = reservation_ttl_s
        self.bucket_grace_s = bucket_grace_s
        self.partial_reservations = partial_reservations
        self._clock = clock
        self._owns = owns_connection
        self.worker = worker    # this process (leases_sqlite.process_id), written with each hold that has an intent
        self._next_sweep = 0.0
        self._next_lapse = 0.0
        self.lapse_every_s = min(1.0, reservation_ttl_s / 4)   # a lapsed hold counts at most this much longer
        self._settles: list[tuple[ReserveRequest, Plan, int, int]] = []
        self._reserves: list[_Reserve] = []     # waiting for the next transaction
        self._decided: list[_Reserve] = []      # decided in the transaction being written
        # Settled marks and live holds live in this process: a request is reserved and settled by one
        # process (its id is this process's own), so a repeat can only come from here (as in the memory store).
        self._settled: dict[tuple[str, str], float] = {}   # (team, request id) -> forget at
        self._holds: set[tuple[str, str]] = set()           # (team, request id) of this process's holds
        self.group = group if group is not None else GroupCommit(conn)
        self.group.join(self)

    # ------------------------------------------------------------------ queued writes (GroupCommit)
    @property
    def queued(self) -> int:
        return len(self._settles) + len(self._reserves)

    def write(self, c: sqlite3.Connection) -> None:
        """The queued settles, then the queued reserves in arrival order, each decided on what the ones
        before it wrote: one transaction, so other processes see the batch whole."""
        now = self._clock()
        self._decided.clear()
        self._lapse(c, now)
        self._sweep(c, now)
        batch = _Batch(self, c, now)
        for req, p, cost, tokens in self._settles:
            self._settle(batch, req, p, cost, tokens)
        batch.flush_settles()
        for r in self._reserves:
            if not r.future.done():   # its caller gave up before the transaction: nothing to decide
                r.admission = self._reserve(batch, r.req, r.plan, r.intent)
                self._decided.append(r)
        batch.flush()

    def committed(self) -> None:
        self._settles.clear()
        self._reserves.clear()
        decided, self._decided = self._decided, []
        for r in decided:   # write() skipped the ones whose caller was gone: nothing ran since
            assert r.admission is not None
            r.future.set_result(r.admission)

    def failed(self, reason: BaseException) -> None:
        """The transaction was rolled back: the settles wait for the next one, the reserves fail now (a
        request does not wait for the database; the fail mode decides)."""
        self._decided.clear()
        reserves, self._reserves = self._reserves, []
        exc = StateUnavailable(f"budget database: {reason}")
        for r in reserves:
            if not r.future.done():
                r.future.set_exception(exc)

    def discard(self, reason: BaseException) -> None:
        log.error("dropped %d settles and %d reserves that could not be written (%r): %s", len(self._settles),
                  len(self._reserves), reason, [(r.request_id, cost) for r, _, cost, _ in self._settles])
        self._settles.clear()
        self._decided.clear()
        reserves, self._reserves = self._reserves, []
        for r in reserves:
            if not r.future.done():
                r.future.set_exception(reason)

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            with self.group.transaction() as c:
                yield c
        except sqlite3.Error as exc:
            raise StateUnavailable(f"budget database: {exc}") from exc

    def _sweep(self, c: sqlite3.Connection, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_EVERY_S
        self._settled = {k: t for k, t in self._settled.items() if t > now}
        c.execute("DELETE FROM rate_windows WHERE minute < ?", (int(now // WINDOW_S) - 1,))
        c.execute("DELETE FROM budget_buckets WHERE expires_at <= ?", (now,))
        c.execute("DELETE FROM window_holds WHERE expires_at <= ?", (now,))

    def _lapse(self, c: sqlite3.Connection, now: float, force: bool = False) -> None:
        """Release the holds not settled nor renewed in time (their worker died, or never settled). The
        table holds only requests in flight and is scanned every ``lapse_every_s`` at most."""
        if now < self._next_lapse and not force:
            return
        self._next_lapse = now + self.lapse_every_s
        lapsed = c.execute("DELETE FROM reservations WHERE expires_at <= ? RETURNING team, request_id, amount, "
                           "buckets", (now,)).fetchall()
        for team, rid, amount, buckets in lapsed:
            self._holds.discard((team, rid))
            self._release(c, team, amount, buckets)

    @staticmethod
    def _release(c: sqlite3.Connection, team: str, amount: int, buckets: str) -> None:
        """Take a deleted hold's amount off each of its buckets."""
        if amount:
            c.executemany(f"UPDATE budget_buckets SET reserved = MAX(0, reserved - ?) WHERE {_BUCKET}",
                          [(amount, *(b if len(b) == 4 else (team, *b))) for b in orjson.loads(buckets)])

    @staticmethod
    def _used(c: sqlite3.Connection, key: tuple[str, str, str, str], now: float) -> int:
        """spent + reserved of a bucket (0 once expired: a new period starts from an empty bucket)."""
        row = c.execute(f"SELECT spent + reserved, expires_at FROM budget_buckets WHERE {_BUCKET}", key).fetchone()
        if row is None:
            return 0
        if row[1] <= now:
            c.execute(f"DELETE FROM budget_buckets WHERE {_BUCKET}", key)
            return 0
        return int(row[0])

    @staticmethod
    def _window_used(c: sqlite3.Connection, key: tuple[str, str, str, str], now: float) -> int:
        """What a sliding-window bucket holds now: the holds and costs of its last 60 s."""
        row = c.execute("SELECT COALESCE(SUM(amount), 0) FROM window_holds WHERE team = ? AND scope = ? AND "
                        "owner = ? AND expires_at > ?", (*key[:3], now)).fetchone()
        return int(row[0])

    @staticmethod
    def _keys(team: str, p: Plan) -> list[tuple[str, str, str, str]]:
        return [(home_of(team, b.scope), b.scope, b.owner, pid) for b, pid in zip(p.budgets, p.period_ids, strict=True)]

    @staticmethod
    def _held(keys: list[tuple[str, str, str, str]], p: Plan) -> str:
        """The ``buckets`` column of a hold: the keys of its calendar buckets (window holds have rows of their own)."""
        return orjson.dumps([k for k, w in zip(keys, p.windows_ms, strict=True) if not w]).decode()

    # ------------------------------------------------------------------ BudgetStore
    async def reserve(self, req: ReserveRequest, intent: Callable[[], dict[str, Any]] | None = None) -> Admission:
        """Decided in the next transaction on the connection (at the end of this event-loop iteration, with
        every other reserve, settle and ledger record queued in it), committed when this returns. With a
        ``worker`` and an ``intent`` (the fields of the ledger record the request gets if its process dies,
        made here, before the transaction, so as not to lengthen its lock), the hold's row names this process
        and keeps the intent."""
        p = plan(req)
        if not p.budgets and not p.rates:
            return admission_from_reply(p, (1, req.cost_nano, *_NO_LIMITS))
        blob = orjson.dumps(intent()) if intent is not None and self.worker else None
        r = _Reserve(req, p, asyncio.get_running_loop().create_future(), blob)
        self._reserves.append(r)
        self.group.touch(now=True)
        return await r.future

    def _reserve(self, b: _Batch, req: ReserveRequest, p: Plan, intent: bytes | None = None) -> Admission:
        """One reserve of the batch, decided on the rows as the reserves before it in the batch left them."""
        c, now = b.c, b.now
        minute, retry_window = int(now // WINDOW_S), WINDOW_S - int(now) % WINDOW_S
        team, rid = req.team, req.request_id
        rec = None
        if (team, rid) in b.holds:   # repeated within the batch
            rec = (b.holds[(team, rid)], "", now + self.reservation_ttl_s)
        elif (team, rid) in self._holds:   # a repeated reserve: is its hold still there?
            rec = c.execute("SELECT amount, buckets, expires_at FROM reservations WHERE team = ? AND "
                            "request_id = ?", (team, rid)).fetchone()
            if rec is None:
                self._holds.discard((team, rid))   # released by another process's lapse
            elif rec[2] <= now:   # its own lapsed hold, not yet released by _lapse
                b.flush()         # the rows it releases from are read again after
                c.execute("DELETE FROM reservations WHERE team = ? AND request_id = ?", (team, rid))
                self._release(c, team, rec[0], rec[1])
                self._holds.discard((team, rid))
                rec = None
        dup = rec is not None or self._settled.get((team, rid), 0.0) > now
        amount = req.cost_nano if not dup else (int(rec[0]) if rec is not None else 0)

        keys = self._keys(team, p)
        windowed = [w > 0 for w in p.windows_ms]
        used = [b.window_used(k) if w else b.used(k) for k, w in zip(keys, windowed, strict=True)]
        rates = [(home_of(team, r.scope), r.scope, r.owner) for r in p.rates]
        counts = [b.counts(k, minute) for k in rates]
        d = decide(req, p, used, counts, dup, amount, self.partial_reservations, retry_window)
        added = d.kind == 0 and not dup
        if added:
            amount = d.amount
            for i, key in enumerate(keys):
                if windowed[i]:
                    b.hold_window(key, rid, amount, now + p.windows_ms[i] / 1000)
                else:
                    b.hold(key, amount, float(p.expire_at(i, now, self.bucket_grace_s)))
            for k, (nreq, ntok) in zip(rates, counts, strict=True):
                b.rates[k] = (nreq + 1, ntok + req.tokens)
                b.dirty_rates.add(k)
            # a plain INSERT: the id is this process's own, so no row of it can exist (a clash rolls back)
            b.reservations.append((team, rid, amount, minute, req.tokens, self._held(keys, p),
                                   now + self.reservation_ttl_s, self.worker if intent is not None else "", intent))
            b.holds[(team, rid)] = amount
            self._holds.add((team, rid))
        return decided_admission(req, p, d, used, counts, added)

    async def settle(self, req: ReserveRequest, actual_cost_nano: int, actual_tokens: int) -> None:
        """Check the settle, queue it and wait for the group commit that carries it (see the module
        docstring): it is on disk when this returns. StateUnavailable if that commit failed; the settle
        then stays queued for the next transaction. A repeated settle is a no-op."""
        p = plan(req)
        check_amount("actual_cost_nano", actual_cost_nano)
        check_amount("actual_tokens", actual_tokens)
        if not p.budgets and not p.rates:
            return
        if not self._queue_settle(req, p, actual_cost_nano, actual_tokens):
            return
        try:
            await self.group.wait()
        except sqlite3.Error as exc:
            raise StateUnavailable(f"budget database: {exc}") from exc

    def _queue_settle(self, req: ReserveRequest, p: Plan, cost: int, tokens: int) -> bool:
        """Queue a settle unless the request was settled already; False then."""
        key, now = (req.team, req.request_id), self._clock()
        if self._settled.get(key, 0.0) > now:
            return False
        self._settled[key] = now + self.reservation_ttl_s
        if len(self._settled) > _MAX_SETTLED:         # bounded memory under any request rate: oldest first
            del self._settled[next(iter(self._settled))]
        self._settles.append((req, p, cost, tokens))
        return True

    def _settle(self, b: _Batch, req: ReserveRequest, p: Plan, cost: int, tokens: int) -> None:
        """One settle of the batch: its hold's row deleted now, its spend and releases added up in ``b``."""
        c, now = b.c, b.now
        team, rid = req.team, req.request_id
        self._holds.discard((team, rid))
        # the whole hold is released (lapsed or not: exactly once, by whoever deletes its row)
        rec = c.execute("DELETE FROM reservations WHERE team = ? AND request_id = ? RETURNING amount, minute, "
                        "tokens, buckets, expires_at", (team, rid)).fetchone()
        keys = self._keys(team, p)
        amount = 0
        if rec is not None:
            if rec[3] == self._held(keys, p):   # held where it is spent: one row update per bucket for both
                amount = int(rec[0])
            else:
                self._release(c, team, rec[0], rec[3])
        for i, key in enumerate(keys):
            if not p.windows_ms[i]:
                b.spend(key, cost, amount, float(p.expire_at(i, now, self.bucket_grace_s)))
            else:   # a sliding window: the hold becomes the actual cost, and drops out with it
                cur = c.execute("UPDATE window_holds SET amount = ? WHERE team = ? AND scope = ? AND owner = ? AND "
                                "request_id = ?", (cost, *key[:3], rid))
                if cur.rowcount == 0 and cost > 0:
                    c.execute("INSERT OR REPLACE INTO window_holds VALUES (?, ?, ?, ?, ?, ?)",
                              (*key[:3], rid, cost, now + p.windows_ms[i] / 1000))
        if rec is not None and rec[4] > now:   # TPM: replace the estimate by the truth
            for r in p.rates:
                k = (home_of(team, r.scope), r.scope, r.owner, int(rec[1]))
                b.tokens[k] = b.tokens.get(k, 0) + tokens - int(rec[2])

    def owners(self) -> list[str]:
        """The worker processes that hold reservations with an intent (a read, outside any transaction)."""
        rows = self.conn.execute("SELECT DISTINCT worker FROM reservations WHERE worker != ''").fetchall()
        return [str(w) for (w,) in rows]

    def take(self, c: sqlite3.Connection, workers: Sequence[str]) -> list[tuple[str, int, bytes]]:
        """In the open transaction ``c``: delete the holds of dead ``workers`` and charge each its whole
        amount (the worst case its budgets admitted, never more): spent up and reserved down on its calendar
        buckets; a sliding window keeps the hold as its cost. (hold id, amount, intent) of each: exactly once
        even when two processes take at once, since only the transaction that deletes a row returns it."""
        taken: list[tuple[str, int, bytes]] = []
        for worker in workers:
            rows = c.execute("DELETE FROM reservations WHERE worker = ? RETURNING team, request_id, amount, buckets, "
                             "intent", (worker,)).fetchall()
            for team, rid, amount, buckets, intent in rows:
                self._holds.discard((team, rid))
                if amount:
                    c.executemany(f"UPDATE budget_buckets SET spent = spent + ?, reserved = MAX(0, reserved - ?) "
                                  f"WHERE {_BUCKET}", [(int(amount), int(amount), *(k if len(k) == 4 else (team, *k)))
                                                       for k in orjson.loads(buckets)])
                taken.append((str(rid), int(amount), bytes(intent or b"")))
        return taken

    async def renew(self, req: ReserveRequest) -> bool:
        p = plan(req)
        if not p.budgets and not p.rates:
            return True   # nothing was held, nothing can lapse
        now = self._clock()
        with self._write() as c:
            cur = c.execute("UPDATE reservations SET expires_at = ? WHERE team = ? AND request_id = ? AND "
                            "expires_at > ?", (now + self.reservation_ttl_s, req.team, req.request_id, now))
            return cur.rowcount > 0

    async def usage(self, team: str, budgets: Sequence[BudgetRule], now: datetime) -> list[BudgetUsage]:
        for rule in budgets:
            check_budget_rule(rule)
        clock_now = self._clock()
        out = []
        with self._write() as c:   # a write: it applies queued settles and releases lapsed holds first
            self._lapse(c, clock_now, force=True)
            for rule in budgets:
                pid = period_id(rule.period, now)
                key = (home_of(team, rule.scope), rule.scope, rule.owner, pid)
                if rule.period == "minute":
                    spent, reserved = 0, self._window_used(c, key, clock_now)
                    out.append(BudgetUsage(rule.scope, rule.owner, rule.period, pid, rule.limit_nano, spent, reserved))
                    continue
                row = c.execute(f"SELECT spent, reserved FROM budget_buckets WHERE {_BUCKET} AND expires_at > ?",
                                (*key, clock_now)).fetchone()
                spent, reserved = (int(row[0]), int(row[1])) if row is not None else (0, 0)
                out.append(BudgetUsage(rule.scope, rule.owner, rule.period, pid, rule.limit_nano, spent, reserved))
        return out

    def flush(self) -> None:
        """Commit the queued settles now (StateUnavailable if the database cannot take them yet)."""
        try:
            self.group.commit()
        except sqlite3.Error as exc:
            raise StateUnavailable(f"budget database: {exc}") from exc

    async def ping(self) -> bool:
        try:
            self.conn.execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return True

    async def aclose(self) -> None:
        with contextlib.suppress(StateUnavailable):
            self.flush()
        if self._settles:
            log.error("closing with %d settles unwritten", len(self._settles))
        if self._owns:
            self.conn.close()
