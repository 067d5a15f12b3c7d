"""A :class:`BudgetStore` in the embedded SQLite database, shared by every worker on the machine.

The semantics are those of :mod:`gateway.state.budgets_memory` and the Redis script, operation for
operation: a reserve is all-or-nothing over every budget and rate window (the tightest budget
decides, a partial hold is capped at its headroom, soft thresholds refuse with ``budget_soft``, a
repeated reserve of a live or settled request is a no-op that reports the state); a settle releases
the whole hold, adds the actual cost once (a ``settled`` mark makes a second settle a no-op) and
replaces the TPM estimate by the truth in the window the reserve counted it in; a renew pushes a
live hold's expiry; a hold not renewed lapses after the reservation TTL. Each operation is one
``BEGIN IMMEDIATE`` transaction, so workers in other processes see it whole and in order: that is
the atomicity the Lua script gets from Redis. A bucket's ``reserved`` is the sum of its live holds
(no counter to drift). Time is the wall clock (one machine, one clock for every worker), injectable
for tests. A request with no budget and no rate limit has nothing to count and touches no row.
SQLite errors (the lock not obtained within the busy timeout, a full disk) raise
:class:`StateUnavailable`, as an unreachable Redis does.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime

from gateway.state.budgets import (
    WINDOW_S,
    Admission,
    BudgetRule,
    BudgetUsage,
    ReserveRequest,
    StateUnavailable,
    admission_from_reply,
    check_amount,
    check_budget_rule,
    period_id,
    plan,
)

_SWEEP_EVERY_S = 60.0
_NO_LIMITS = (0, 0, 0, 0, -1, -1, -1, -1, -1, -1)   # the reply after (admitted, reserved): no refusal, no limits


class SqliteBudgetStore:
    """Budgets and rate limits in SQLite (``conn`` from :func:`gateway.state.sqlite_db.connect`)."""

    def __init__(self, conn: sqlite3.Connection, reservation_ttl_s: float = 900, *,
                 clock: Callable[[], float] = time.time, bucket_grace_s: int = 7 * 86_400,
                 partial_reservations: bool = True, owns_connection: bool = True) -> None:
        if reservation_ttl_s <= 0:
            raise ValueError("reservation_ttl_s must be > 0")
        self.conn = conn
        self.reservation_ttl_s = reservation_ttl_s
        self.bucket_grace_s = bucket_grace_s
        self.partial_reservations = partial_reservations
        self._clock = clock
        self._owns = owns_connection
        self._next_sweep = 0.0

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        c = self.conn
        try:
            c.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StateUnavailable(f"budget database: {exc}") from exc
        try:
            yield c
            c.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                c.execute("ROLLBACK")
            raise StateUnavailable(f"budget database: {exc}") from exc
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                c.execute("ROLLBACK")
            raise

    def _sweep(self, c: sqlite3.Connection, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_EVERY_S
        c.execute("DELETE FROM reservations WHERE expires_at <= ?", (now,))
        c.execute("DELETE FROM settled WHERE expires_at <= ?", (now,))
        c.execute("DELETE FROM rate_windows WHERE minute < ?", (int(now // WINDOW_S) - 1,))
        c.execute("DELETE FROM budget_holds WHERE expires_at <= ?", (now,))
        c.execute("DELETE FROM budget_holds WHERE (team, scope, owner, period_id) IN (SELECT team, scope, owner, "
                  "period_id FROM budget_buckets WHERE expires_at <= ?)", (now,))
        c.execute("DELETE FROM budget_buckets WHERE expires_at <= ?", (now,))

    @staticmethod
    def _used(c: sqlite3.Connection, key: tuple[str, str, str, str], now: float) -> tuple[int, int]:
        """(spent, reserved) of a bucket after dropping its lapsed holds (and the bucket, once expired)."""
        row = c.execute("SELECT spent, expires_at FROM budget_buckets WHERE team = ? AND scope = ? AND owner = ? "
                        "AND period_id = ?", key).fetchone()
        spent = 0
        if row is not None and row[1] <= now:
            c.execute("DELETE FROM budget_buckets WHERE team = ? AND scope = ? AND owner = ? AND period_id = ?", key)
            c.execute("DELETE FROM budget_holds WHERE team = ? AND scope = ? AND owner = ? AND period_id = ?", key)
        elif row is not None:
            spent = int(row[0])
        c.execute("DELETE FROM budget_holds WHERE team = ? AND scope = ? AND owner = ? AND period_id = ? "
                  "AND expires_at <= ?", (*key, now))
        held = c.execute("SELECT COALESCE(SUM(amount), 0) FROM budget_holds WHERE team = ? AND scope = ? "
                         "AND owner = ? AND period_id = ?", key).fetchone()
        return spent, int(held[0])

    def _expiry(self, end: int, now: float) -> float:
        return float(max(end + self.bucket_grace_s, now + self.bucket_grace_s))

    async def reserve(self, req: ReserveRequest) -> Admission:
        p = plan(req)
        if not p.budgets and not p.rates:
            return admission_from_reply(p, (1, req.cost_nano, *_NO_LIMITS))
        now = self._clock()
        minute, retry_window = int(now // WINDOW_S), WINDOW_S - int(now) % WINDOW_S
        team, rid = req.team, req.request_id
        with self._write() as c:
            self._sweep(c, now)
            rec = c.execute("SELECT amount FROM reservations WHERE team = ? AND request_id = ? AND expires_at > ?",
                            (team, rid, now)).fetchone()
            done = c.execute("SELECT 1 FROM settled WHERE team = ? AND request_id = ? AND expires_at > ?",
                             (team, rid, now)).fetchone()
            dup = rec is not None or done is not None
            amount = req.cost_nano if not dup else (int(rec[0]) if rec is not None else 0)

            kind = idx = limit = used_ = 0
            retry = -1
            keys = [(team, b.scope, b.owner, pid) for b, pid in zip(p.budgets, p.period_ids, strict=True)]
            used = [sum(self._used(c, k, now)) for k in keys]
            heads = [rule.limit_nano - u for rule, u in zip(p.budgets, used, strict=True)]
            soft = [i for i, (rule, u) in enumerate(zip(p.budgets, used, strict=True))
                    if rule.soft_nano is not None and u >= rule.soft_nano]
            if soft and not dup:
                si = soft[0]
                kind, idx, limit, used_ = 4, si + 1, p.budgets[si].soft_nano or 0, used[si]
            elif heads and not dup:
                bi = heads.index(min(heads))
                if req.cost_nano > heads[bi]:
                    least = max(1, min(req.min_cost_nano, req.cost_nano))
                    if self.partial_reservations and req.partial and heads[bi] >= least:
                        amount = heads[bi]
                    else:
                        kind, idx, limit, used_ = 1, bi + 1, p.budgets[bi].limit_nano, used[bi]

            counts = []
            for r in p.rates:
                w = c.execute("SELECT minute, requests, tokens FROM rate_windows WHERE team = ? AND scope = ? "
                              "AND owner = ?", (team, r.scope, r.owner)).fetchone()
                counts.append((0, 0) if w is None or w[0] != minute else (int(w[1]), int(w[2])))
            if kind == 0 and not dup:
                for j, (r, (nreq, _)) in enumerate(zip(p.rates, counts, strict=True), 1):
                    if r.rpm is not None and nreq + 1 > r.rpm and (idx == 0 or r.rpm - nreq < limit - used_):
                        kind, idx, limit, used_, retry = 2, j, r.rpm, nreq, retry_window
                if kind == 0:
                    for j, (r, (_, ntok)) in enumerate(zip(p.rates, counts, strict=True), 1):
                        if r.tpm is not None and ntok + req.tokens > r.tpm and \
                                (idx == 0 or r.tpm - ntok < limit - used_):
                            kind, idx, limit, used_ = 3, j, r.tpm, ntok
                            retry = -1 if req.tokens > r.tpm else retry_window

            admitted = kind == 0
            add_n = add_r = add_t = 0
            if admitted and not dup:
                add_n, add_r, add_t = amount, 1, req.tokens
                expires = now + self.reservation_ttl_s
                for key, end in zip(keys, p.period_ends, strict=True):
                    if amount > 0:
                        c.execute("INSERT OR REPLACE INTO budget_holds VALUES (?, ?, ?, ?, ?, ?, ?)",
                                  (*key, rid, amount, expires))
                    c.execute("INSERT INTO budget_buckets (team, scope, owner, period_id, spent, expires_at) "
                              "VALUES (?, ?, ?, ?, 0, ?) ON CONFLICT DO UPDATE SET expires_at = "
                              "MAX(expires_at, excluded.expires_at)", (*key, self._expiry(end, now)))
                for r, (nreq, ntok) in zip(p.rates, counts, strict=True):
                    c.execute("INSERT OR REPLACE INTO rate_windows VALUES (?, ?, ?, ?, ?, ?)",
                              (team, r.scope, r.owner, minute, nreq + 1, ntok + req.tokens))
                c.execute("INSERT OR REPLACE INTO reservations VALUES (?, ?, ?, ?, ?, ?)",
                          (team, rid, amount, minute, req.tokens, expires))

        lim_r = rem_r = lim_t = rem_t = -1
        for r, (nreq, ntok) in zip(p.rates, counts, strict=True):
            if r.rpm is not None and (lim_r < 0 or r.rpm - nreq - add_r < rem_r):
                lim_r, rem_r = r.rpm, r.rpm - nreq - add_r
            if r.tpm is not None and (lim_t < 0 or r.tpm - ntok - add_t < rem_t):
                lim_t, rem_t = r.tpm, r.tpm - ntok - add_t
        rem_n = min((h - add_n for h in heads), default=-1)
        reply = (int(admitted), amount if admitted else 0, kind, idx, limit, used_, retry,
                 lim_r, rem_r, lim_t, rem_t, rem_n)
        return admission_from_reply(p, reply)

    async def settle(self, req: ReserveRequest, actual_cost_nano: int, actual_tokens: int) -> None:
        p = plan(req)
        check_amount("actual_cost_nano", actual_cost_nano)
        check_amount("actual_tokens", actual_tokens)
        if not p.budgets and not p.rates:
            return
        now = self._clock()
        team, rid = req.team, req.request_id
        with self._write() as c:
            if c.execute("SELECT 1 FROM settled WHERE team = ? AND request_id = ? AND expires_at > ?",
                         (team, rid, now)).fetchone():
                return
            c.execute("INSERT OR REPLACE INTO settled VALUES (?, ?, ?)", (team, rid, now + self.reservation_ttl_s))
            rec = c.execute("SELECT minute, tokens, expires_at FROM reservations WHERE team = ? AND request_id = ?",
                            (team, rid)).fetchone()
            c.execute("DELETE FROM reservations WHERE team = ? AND request_id = ?", (team, rid))
            for rule, pid, end in zip(p.budgets, p.period_ids, p.period_ends, strict=True):
                key = (team, rule.scope, rule.owner, pid)
                self._used(c, key, now)
                c.execute("DELETE FROM budget_holds WHERE team = ? AND scope = ? AND owner = ? AND period_id = ? "
                          "AND request_id = ?", (*key, rid))
                c.execute("INSERT INTO budget_buckets (team, scope, owner, period_id, spent, expires_at) "
                          "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET spent = spent + excluded.spent, "
                          "expires_at = MAX(expires_at, excluded.expires_at)",
                          (*key, actual_cost_nano, self._expiry(end, now)))
            if rec is not None and rec[2] > now:
                for r in p.rates:
                    c.execute("UPDATE rate_windows SET tokens = MAX(0, tokens + ? - ?) WHERE team = ? AND scope = ? "
                              "AND owner = ? AND minute = ?", (actual_tokens, rec[1], team, r.scope, r.owner, rec[0]))

    async def renew(self, req: ReserveRequest) -> bool:
        p = plan(req)
        if not p.budgets and not p.rates:
            return True   # nothing was held, nothing can lapse
        now = self._clock()
        expires = now + self.reservation_ttl_s
        with self._write() as c:
            cur = c.execute("UPDATE reservations SET expires_at = ? WHERE team = ? AND request_id = ? "
                            "AND expires_at > ?", (expires, req.team, req.request_id, now))
            if cur.rowcount == 0:
                return False
            for rule, pid in zip(p.budgets, p.period_ids, strict=True):
                c.execute("UPDATE budget_holds SET expires_at = ? WHERE team = ? AND scope = ? AND owner = ? "
                          "AND period_id = ? AND request_id = ? AND expires_at > ?",
                          (expires, req.team, rule.scope, rule.owner, pid, req.request_id, now))
        return True

    async def usage(self, team: str, budgets: Sequence[BudgetRule], now: datetime) -> list[BudgetUsage]:
        clock_now = self._clock()
        out = []
        for rule in budgets:
            check_budget_rule(rule)
        try:
            self.conn.execute("BEGIN")   # one snapshot for every rule
            try:
                for rule in budgets:
                    pid = period_id(rule.period, now)
                    key = (team, rule.scope, rule.owner, pid)
                    row = self.conn.execute("SELECT spent FROM budget_buckets WHERE team = ? AND scope = ? AND "
                                            "owner = ? AND period_id = ? AND expires_at > ?", (*key, clock_now)
                                            ).fetchone()
                    held = self.conn.execute("SELECT COALESCE(SUM(amount), 0) FROM budget_holds WHERE team = ? AND "
                                             "scope = ? AND owner = ? AND period_id = ? AND expires_at > ?",
                                             (*key, clock_now)).fetchone()
                    spent = int(row[0]) if row is not None else 0
                    reserved = int(held[0]) if row is not None else 0
                    out.append(BudgetUsage(rule.scope, rule.owner, rule.period, pid, rule.limit_nano, spent,
                                           reserved))
            finally:
                self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StateUnavailable(f"budget database: {exc}") from exc
        return out

    async def ping(self) -> bool:
        try:
            self.conn.execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return True

    async def aclose(self) -> None:
        if self._owns:
            self.conn.close()
