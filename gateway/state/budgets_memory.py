"""In-process :class:`BudgetStore` with the same semantics as the Redis script, for one process.

Every operation runs without awaiting, so on one asyncio loop each call is atomic
just like the Lua script. Time comes from an injectable wall clock (unix seconds,
default ``time.time``): it aligns the fixed 60-second rate windows to the minute
and expires reservations whose owner never settled them after ``reservation_ttl_s``.
Buckets and windows of end users, tags and sessions are shared by every team (filed under
no team), those of teams and keys under their team, as in Redis. Expired reservations,
settled-ids, rate windows and old period buckets are dropped lazily; the reserve reply is
decoded by the same code as the Redis store's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from gateway.state.budgets import (
    WINDOW_S,
    Admission,
    BudgetRule,
    BudgetUsage,
    Plan,
    ReserveRequest,
    check_amount,
    check_budget_rule,
    decide,
    decided_admission,
    home_of,
    period_id,
    plan,
)

_SWEEP_EVERY_S = 60.0
_MAX_SETTLED = 10_000    # a repeated settle comes right after the first: the newest ids suffice


@dataclass(slots=True)
class _Bucket:
    spent: int = 0
    reserved: int = 0
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # request id -> (amount, expires at)
    expires_at: float = 0.0

    def purge(self, now: float) -> None:
        for rid in [rid for rid, (_, exp) in self.holds.items() if exp <= now]:
            self.reserved -= self.holds.pop(rid)[0]


@dataclass(slots=True)
class _Window:
    minute: int
    requests: int
    tokens: int


@dataclass(frozen=True, slots=True)
class _Record:
    amount: int
    minute: int
    tokens: int
    expires_at: float


class MemoryBudgetStore:
    """Budgets and rate limits in this process (tests, single-worker deployments)."""

    def __init__(self, reservation_ttl_s: float = 600, *, clock: Callable[[], float] = time.time,
                 settled_ttl_s: float | None = None, bucket_grace_s: int = 7 * 86_400,
                 partial_reservations: bool = True) -> None:
        if reservation_ttl_s <= 0:
            raise ValueError("reservation_ttl_s must be > 0")
        self.reservation_ttl_s = reservation_ttl_s
        # one process has no lost replies: a second settle can only come while the request is alive
        self.settled_ttl_s = max(settled_ttl_s or reservation_ttl_s, reservation_ttl_s)
        self.bucket_grace_s = bucket_grace_s
        self.partial_reservations = partial_reservations
        self._clock = clock
        self._buckets: dict[tuple[str, str, str, str], _Bucket] = {}  # (team, scope, owner, period id)
        self._windows: dict[tuple[str, str, str], _Window] = {}  # (team, scope, owner)
        self._records: dict[tuple[str, str], _Record] = {}  # (team, request id)
        self._settled: dict[tuple[str, str], float] = {}  # (team, request id) -> forget at
        self._next_sweep = 0.0

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_EVERY_S
        minute = int(now // WINDOW_S)
        self._records = {k: r for k, r in self._records.items() if r.expires_at > now}
        self._settled = {k: t for k, t in self._settled.items() if t > now}
        self._windows = {k: w for k, w in self._windows.items() if w.minute >= minute - 1}
        self._buckets = {k: b for k, b in self._buckets.items() if b.expires_at > now}

    def _bucket(self, team: str, rule: BudgetRule, pid: str, expires_at: float, now: float) -> _Bucket:
        key = (home_of(team, rule.scope), rule.scope, rule.owner, pid)
        bucket = self._buckets.get(key)
        if bucket is None or bucket.expires_at <= now:
            bucket = self._buckets[key] = _Bucket()
        bucket.expires_at = max(bucket.expires_at, expires_at)
        bucket.purge(now)
        return bucket

    def _buckets_of(self, team: str, p: Plan, now: float) -> list[_Bucket]:
        return [self._bucket(team, b, pid, p.expire_at(i, now, self.bucket_grace_s), now)
                for i, (b, pid) in enumerate(zip(p.budgets, p.period_ids, strict=True))]

    def _window(self, team: str, scope: str, owner: str, minute: int) -> tuple[int, int]:
        w = self._windows.get((home_of(team, scope), scope, owner))
        return (0, 0) if w is None or w.minute != minute else (w.requests, w.tokens)

    async def reserve(self, req: ReserveRequest) -> Admission:
        p = plan(req)
        now = self._clock()
        self._sweep(now)
        minute, retry_window = int(now // WINDOW_S), WINDOW_S - int(now) % WINDOW_S
        rec_key = (req.team, req.request_id)
        record = self._records.get(rec_key)
        if record is not None and record.expires_at <= now:
            record = None
        dup = record is not None or self._settled.get(rec_key, 0.0) > now
        amount = req.cost_nano if not dup else (record.amount if record is not None else 0)

        buckets = self._buckets_of(req.team, p, now)
        used = [b.spent + b.reserved for b in buckets]
        counts = [self._window(req.team, r.scope, r.owner, minute) for r in p.rates]
        d = decide(req, p, used, counts, dup, amount, self.partial_reservations, retry_window)
        added = d.kind == 0 and not dup
        if added:
            for bucket, win_ms in zip(buckets, p.windows_ms, strict=True):
                if d.amount > 0:
                    bucket.reserved += d.amount
                    bucket.holds[req.request_id] = (d.amount,
                                                    now + (win_ms / 1000 if win_ms else self.reservation_ttl_s))
            for r, (nreq, ntok) in zip(p.rates, counts, strict=True):
                self._windows[(home_of(req.team, r.scope), r.scope, r.owner)] = _Window(
                    minute, nreq + 1, ntok + req.tokens)
            self._records[rec_key] = _Record(d.amount, minute, req.tokens, now + self.reservation_ttl_s)
        return decided_admission(req, p, d, used, counts, added)

    async def settle(self, req: ReserveRequest, actual_cost_nano: int, actual_tokens: int) -> None:
        p = plan(req)
        check_amount("actual_cost_nano", actual_cost_nano)
        check_amount("actual_tokens", actual_tokens)
        now = self._clock()
        self._sweep(now)
        key = (req.team, req.request_id)
        if self._settled.get(key, 0.0) > now:
            return
        self._settled[key] = now + self.settled_ttl_s
        if len(self._settled) > _MAX_SETTLED:         # bounded memory under any request rate: oldest first
            del self._settled[next(iter(self._settled))]
        record = self._records.pop(key, None)
        if record is not None and record.expires_at <= now:
            record = None
        for bucket, win_ms in zip(self._buckets_of(req.team, p, now), p.windows_ms, strict=True):
            if win_ms:     # a sliding window: the hold becomes the actual cost, and drops out with its window
                kept = bucket.holds.get(req.request_id)
                if kept is not None:
                    bucket.reserved += actual_cost_nano - kept[0]
                    bucket.holds[req.request_id] = (actual_cost_nano, kept[1])
                elif actual_cost_nano > 0:
                    bucket.reserved += actual_cost_nano
                    bucket.holds[req.request_id] = (actual_cost_nano, now + win_ms / 1000)
                continue
            held = bucket.holds.pop(req.request_id, None)
            if held is not None:
                bucket.reserved -= held[0]
            bucket.spent += actual_cost_nano
        if record is not None:
            for r in p.rates:
                w = self._windows.get((home_of(req.team, r.scope), r.scope, r.owner))
                if w is not None and w.minute == record.minute:
                    w.tokens = max(0, w.tokens + actual_tokens - record.tokens)

    async def renew(self, req: ReserveRequest) -> bool:
        p = plan(req)
        now = self._clock()
        key = (req.team, req.request_id)
        record = self._records.get(key)
        if record is None or record.expires_at <= now:
            return False
        expires = now + self.reservation_ttl_s
        self._records[key] = _Record(record.amount, record.minute, record.tokens, expires)
        for rule, pid, win_ms in zip(p.budgets, p.period_ids, p.windows_ms, strict=True):
            if win_ms:     # a window hold never outlives its window
                continue
            bucket = self._buckets.get((home_of(req.team, rule.scope), rule.scope, rule.owner, pid))
            held = bucket.holds.get(req.request_id) if bucket is not None else None
            if bucket is not None and held is not None and held[1] > now:
                bucket.holds[req.request_id] = (held[0], expires)
        return True

    async def usage(self, team: str, budgets: Sequence[BudgetRule], now: datetime) -> list[BudgetUsage]:
        clock_now = self._clock()
        out = []
        for rule in budgets:
            check_budget_rule(rule)
            pid = period_id(rule.period, now)
            bucket = self._buckets.get((home_of(team, rule.scope), rule.scope, rule.owner, pid))
            spent = reserved = 0
            if bucket is not None and bucket.expires_at > clock_now:
                bucket.purge(clock_now)
                spent, reserved = bucket.spent, bucket.reserved
            out.append(BudgetUsage(rule.scope, rule.owner, rule.period, pid, rule.limit_nano, spent, reserved))
        return out

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None

