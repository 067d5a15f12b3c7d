"""Budget and rate-limit accounting: plain data, the ``BudgetStore`` protocol and UTC period helpers.

Money is integer nano-USD. Before an upstream call the pipeline asks a store to
``reserve`` the request's worst-case cost against every applicable budget and to
consume RPM/TPM allowance, atomically and all-or-nothing (a refused request holds and
consumes nothing); afterwards it ``settle``s the actual cost and tokens, releasing the
rest at once. By default (``partial_reservations=True``) a budget admits while it has
headroom and the hold is capped at the tightest budget's headroom
(:attr:`Admission.reserved_nano`), so the last cents of a budget stay usable whatever
the request's max_tokens; with ``False`` the whole worst case must fit. Budgets live in
period buckets named by :func:`period_id` (the client computes it from the UTC date),
so a new period starts from an empty bucket with no reset job; ``total`` is one lifetime bucket and
``minute`` (the ``max_usd_per_minute`` brake) one sliding-window bucket whose holds drop out 60 s
after their reservation and are replaced, not released, by the actual cost at settle. Rate limits use a fixed
60-second window aligned to the store clock's minute. This module has no I/O; both
stores share the reply decoding below so they cannot drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any, Literal, Protocol, get_args

Period = Literal["daily", "weekly", "monthly", "total", "minute"]
PERIODS: tuple[str, ...] = get_args(Period)
SCOPES = ("team", "key", "user", "tag", "session")
CROSS_SCOPES = frozenset({"user", "tag", "session"})   # shared by every team: stored outside the team's keys


def home_of(team: str, scope: str) -> str:
    """The team a bucket or rate window is filed under: none for end users, tags and sessions (shared)."""
    return "" if scope in CROSS_SCOPES else team
SESSION_KEEP_S = 86_400          # a session's lifetime budget is forgotten a day after its last request
LIFETIME_KEEP_S = 10 * 366 * 86_400   # a user's or tag's lifetime budget: kept (renewed on every request)
MINUTE_KEEP_S = 120
MAX_AMOUNT = 2**53 - 1  # Lua numbers are doubles: every amount must stay exactly representable
KIND_NAMES = {1: "budget", 2: "rate_requests", 3: "rate_tokens", 4: "budget_soft"}
WINDOW_S = 60


class StateUnavailable(Exception):
    """The shared state backend (Redis) could not be reached or answered with an error."""


def _utc(now: datetime) -> datetime:
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def period_start(period: Period, now: datetime) -> datetime:
    """Start (UTC) of the period containing ``now``; naive datetimes are taken as UTC. ``total`` (a lifetime
    budget) starts at the epoch; ``minute`` (a spend-rate brake) at the UTC minute."""
    if period == "total":
        return datetime(1970, 1, 1, tzinfo=UTC)
    if period == "minute":
        return _utc(now).replace(second=0, microsecond=0)
    day = _utc(now).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        return day
    if period == "weekly":
        return day - timedelta(days=day.weekday())  # ISO week: Monday 00:00 UTC
    if period == "monthly":
        return day.replace(day=1)
    raise ValueError(f"unknown budget period {period!r}")


def period_end(period: Period, now: datetime) -> datetime:
    """Exclusive end (UTC) of the period containing ``now``: the next period's start."""
    start = period_start(period, now)
    if period == "total":
        return datetime(9999, 12, 31, tzinfo=UTC)
    if period == "minute":
        return start + timedelta(minutes=1)
    if period == "daily":
        return start + timedelta(days=1)
    if period == "weekly":
        return start + timedelta(days=7)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def period_id(period: Period, now: datetime) -> str:
    """Bucket name of the period containing ``now``: ``d20261123``, ``w2026-48`` (ISO year-week), ``m202611``,
    ``t`` (lifetime), ``w60`` (a spend-rate brake: a sliding 60-second window, one bucket)."""
    if period == "total":
        return "t"
    if period == "minute":
        return "w60"
    start = period_start(period, now)
    if period == "daily":
        return f"d{start.year:04d}{start.month:02d}{start.day:02d}"
    if period == "weekly":
        iso = start.isocalendar()
        return f"w{iso.year:04d}-{iso.week:02d}"
    return f"m{start.year:04d}{start.month:02d}"


@dataclass(frozen=True, slots=True)
class BudgetRule:
    scope: str  # "team", "key", "user", "tag" or "session"
    owner: str  # team name, key id, end user, tag or session id
    period: Period
    limit_nano: int
    soft_nano: int | None = None  # refuse as "budget_soft" once spent+reserved reached this (for downgrades)


@dataclass(frozen=True, slots=True)
class RateRule:
    scope: str  # one of SCOPES
    owner: str
    rpm: int | None
    tpm: int | None


@dataclass(slots=True)
class ReserveRequest:   # a value: never changed once made (not frozen: made on every request, a frozen one costs ~3x)
    request_id: str
    team: str  # hash-tag owner: every key of this call lives under this team's tag
    cost_nano: int  # worst-case cost to reserve
    tokens: int  # estimated tokens (input + max output) for TPM
    budgets: tuple[BudgetRule, ...]
    rates: tuple[RateRule, ...]
    now: datetime  # for period ids only
    min_cost_nano: int = 0  # partial mode: the least hold worth admitting (e.g. input plus one output token)
    partial: bool = True  # False: the whole worst case must fit (a team that downgrades instead)


def reserve_request_from_dict(data: dict[str, Any]) -> ReserveRequest:
    """A :class:`ReserveRequest` back from its JSON form (``orjson.dumps`` of one): a dead worker's intent."""
    return ReserveRequest(
        request_id=str(data["request_id"]), team=str(data["team"]), cost_nano=int(data["cost_nano"]),
        tokens=int(data["tokens"]), budgets=tuple(BudgetRule(**b) for b in data["budgets"]),
        rates=tuple(RateRule(**r) for r in data["rates"]), now=datetime.fromisoformat(data["now"]),
        min_cost_nano=int(data.get("min_cost_nano", 0)), partial=bool(data.get("partial", True)))


@dataclass(frozen=True, slots=True)
class Refusal:
    kind: str  # "budget" | "budget_soft" | "rate_requests" | "rate_tokens"
    scope: str
    owner: str
    period: str | None  # budget period, or "minute"
    limit: int  # nano-USD for budgets, count for rates
    used: int  # spent+reserved (nano) or requests/tokens used in the window
    retry_after_s: int | None


@dataclass(slots=True)
class RateStatus:   # a value: never changed once made (not frozen: made on every request, a frozen one costs ~3x)
    """The tightest rate limit that applies, for the ``x-ratelimit-*`` headers (None: no such limit)."""

    limit_requests: int | None
    remaining_requests: int | None
    limit_tokens: int | None
    remaining_tokens: int | None


@dataclass(slots=True)
class Admission:   # a value: never changed once made (not frozen: made on every request, a frozen one costs ~3x)
    admitted: bool
    refusal: Refusal | None
    rate: RateStatus
    remaining_nano: int | None  # min over budgets of limit - spent - reserved after this call (>= 0); None: no budgets
    reserved_nano: int = 0  # held per budget: cost_nano, or less when capped to the headroom (partial mode)


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    scope: str
    owner: str
    period: Period
    period_id: str
    limit_nano: int
    spent_nano: int
    reserved_nano: int

    @property
    def remaining_nano(self) -> int:
        return max(0, self.limit_nano - self.spent_nano - self.reserved_nano)


class BudgetStore(Protocol):
    async def reserve(self, req: ReserveRequest) -> Admission: ...

    async def settle(self, req: ReserveRequest, actual_cost_nano: int, actual_tokens: int) -> bool | None:
        """Charge the actual cost and release the hold (exactly once per request id); a store that can tell
        returns False when the request was settled already."""
        ...

    async def renew(self, req: ReserveRequest) -> bool:
        """Extend a live hold by the reservation TTL from now; False if it was settled or has lapsed."""
        ...

    async def usage(self, team: str, budgets: Sequence[BudgetRule], now: datetime) -> list[BudgetUsage]: ...

    async def ping(self) -> bool: ...

    async def aclose(self) -> None: ...


def check_amount(name: str, value: int) -> None:
    if type(value) is not int or not 0 <= value <= MAX_AMOUNT:   # not a bool, nor an int subclass
        raise ValueError(f"{name} must be an int in [0, 2**53), got {value!r}")


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated request: duplicate rules merged (tightest wins) and rules without any limit dropped."""

    budgets: tuple[BudgetRule, ...]
    rates: tuple[RateRule, ...]
    period_ids: tuple[str, ...]  # one per budget
    period_ends: tuple[int, ...]  # one per budget, unix seconds
    keeps: tuple[int | None, ...] = ()  # one per budget: keep its bucket this long after now (None: the grace)
    windows_ms: tuple[int, ...] = ()  # one per budget: > 0 for a sliding-window bucket (the minute brake)

    def expire_at(self, i: int, now: float, grace: int) -> int:
        """When budget ``i``'s bucket may be forgotten (unix seconds): a calendar period's end plus the
        store's grace; a lifetime or minute bucket ``keeps[i]`` after this request."""
        keep = self.keeps[i]
        if keep is None:
            return int(max(self.period_ends[i] + grace, now + grace))
        return int(now) + keep

    def arg_pair(self, i: int, grace: int) -> tuple[int, int]:
        """(expire-at floor, keep seconds) for the Lua script, which takes max(floor, server now + keep)."""
        keep = self.keeps[i]
        return (self.period_ends[i] + grace, grace) if keep is None else (0, keep)


def check_budget_rule(rule: BudgetRule) -> None:
    if rule.scope not in SCOPES:
        raise ValueError(f"budget scope must be one of {SCOPES}, got {rule.scope!r}")
    if rule.period not in PERIODS:
        raise ValueError(f"unknown budget period {rule.period!r}")
    check_amount("limit_nano", rule.limit_nano)
    if rule.soft_nano is not None:
        check_amount("soft_nano", rule.soft_nano)


def plan(req: ReserveRequest) -> Plan:
    """Validate ``req`` (ValueError on bad input) and compute the bucket names both stores use."""
    return _plan(req.budgets, req.rates, check_request(req))


def check_request(req: ReserveRequest) -> date:
    """Validate ``req``'s own values (ValueError on bad input); the UTC day its plan is for."""
    if not req.request_id:
        raise ValueError("request_id must not be empty")
    check_amount("cost_nano", req.cost_nano)
    check_amount("tokens", req.tokens)
    check_amount("min_cost_nano", req.min_cost_nano)
    return _utc(req.now).date()


class PlanBook:
    """:func:`plan` for requests whose rules are the very tuples an earlier request had (the pipeline hands
    out one tuple per set of rules): the plan, and what a store makes of it (``extra``: key names, script
    arguments), found by identity instead of hashing every rule per call. An entry keeps its rule tuples,
    so an id in a name is never another object's. At most ``limit`` entries (then it starts over)."""

    __slots__ = ("_made", "limit")

    def __init__(self, limit: int = 4096) -> None:
        self._made: dict[tuple[int, int, date, str], tuple[Any, Any, Plan, Any]] = {}
        self.limit = limit

    def get(self, req: ReserveRequest, extra: Any = None) -> tuple[Plan, Any]:
        """(the plan of ``req``, what ``extra(plan, team)`` made of it for ``req.team``, once per team)."""
        name = (id(req.budgets), id(req.rates), check_request(req), req.team)
        made = self._made.get(name)
        if made is None:
            if len(self._made) >= self.limit:
                self._made.clear()
            p = _plan(req.budgets, req.rates, name[2])
            made = self._made[name] = (req.budgets, req.rates, p, extra(p, req.team) if extra is not None else None)
        return made[2], made[3]


def keep_of(rule: BudgetRule) -> int | None:
    if rule.period == "minute":
        return MINUTE_KEEP_S
    if rule.period == "total":
        return SESSION_KEEP_S if rule.scope == "session" else LIFETIME_KEEP_S
    return None


@lru_cache(maxsize=4096)
def _plan(rules: tuple[BudgetRule, ...], rate_rules: tuple[RateRule, ...], day: date) -> Plan:
    """The rules' part of :func:`plan`: the same for every request of a key on one UTC day, so memoised."""
    now = datetime(day.year, day.month, day.day, tzinfo=UTC)
    budgets: dict[tuple[str, str, str], BudgetRule] = {}
    for b in rules:
        check_budget_rule(b)
        k = (b.scope, b.owner, b.period)
        if k not in budgets or b.limit_nano < budgets[k].limit_nano:
            budgets[k] = b
    rates: dict[tuple[str, str], RateRule] = {}
    for r in rate_rules:
        if r.scope not in SCOPES:
            raise ValueError(f"rate scope must be one of {SCOPES}, got {r.scope!r}")
        for name, v in (("rpm", r.rpm), ("tpm", r.tpm)):
            if v is not None:
                check_amount(name, v)
        old = rates.get((r.scope, r.owner))
        if old is not None:
            r = RateRule(r.scope, r.owner, _tighter(old.rpm, r.rpm), _tighter(old.tpm, r.tpm))
        rates[(r.scope, r.owner)] = r
    bs = tuple(budgets.values())
    return Plan(
        budgets=bs,
        rates=tuple(r for r in rates.values() if r.rpm is not None or r.tpm is not None),
        period_ids=tuple(period_id(b.period, now) for b in bs),
        period_ends=tuple(int(period_end(b.period, now).timestamp()) for b in bs),
        keeps=tuple(keep_of(b) for b in bs),
        windows_ms=tuple(WINDOW_S * 1000 if b.period == "minute" else 0 for b in bs),
    )


def _tighter(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


@dataclass(slots=True)
class Decision:
    """What a Python budget store decided for one reserve (the Lua script decides the same way)."""

    amount: int          # the hold per budget: the worst case, or the headroom in partial mode
    kind: int = 0        # 0 admitted, 1 budget, 2 requests per minute, 3 tokens per minute, 4 soft threshold
    idx: int = 0         # 1-based index of the refusing budget or rate rule
    limit: int = 0
    used: int = 0
    retry: int = -1


def decide(req: ReserveRequest, p: Plan, used: Sequence[int], counts: Sequence[tuple[int, int]], dup: bool,
           amount: int, partial_reservations: bool, retry_window: int) -> Decision:
    """The admission rules shared by the memory and SQLite stores: ``used`` is spent + reserved per budget,
    ``counts`` (requests, tokens) per rate rule in this minute, ``dup`` a repeated reserve of a live hold."""
    d = Decision(amount)
    if dup:
        return d
    heads = [rule.limit_nano - u for rule, u in zip(p.budgets, used, strict=True)]
    soft = [i for i, (rule, u) in enumerate(zip(p.budgets, used, strict=True))
            if rule.soft_nano is not None and u >= rule.soft_nano]
    if soft:
        si = soft[0]
        d.kind, d.idx, d.limit, d.used = 4, si + 1, p.budgets[si].soft_nano or 0, used[si]
    elif heads:
        bi = heads.index(min(heads))
        if req.cost_nano > heads[bi]:
            least = max(1, min(req.min_cost_nano, req.cost_nano))
            if partial_reservations and req.partial and heads[bi] >= least:
                d.amount = heads[bi]
            else:
                d.kind, d.idx, d.limit, d.used = 1, bi + 1, p.budgets[bi].limit_nano, used[bi]
    if d.kind == 0:
        for j, (r, (nreq, _)) in enumerate(zip(p.rates, counts, strict=True), 1):
            if r.rpm is not None and nreq + 1 > r.rpm and (d.idx == 0 or r.rpm - nreq < d.limit - d.used):
                d.kind, d.idx, d.limit, d.used, d.retry = 2, j, r.rpm, nreq, retry_window
        if d.kind == 0:
            for j, (r, (_, ntok)) in enumerate(zip(p.rates, counts, strict=True), 1):
                if r.tpm is not None and ntok + req.tokens > r.tpm and (d.idx == 0 or r.tpm - ntok < d.limit - d.used):
                    d.kind, d.idx, d.limit, d.used = 3, j, r.tpm, ntok
                    d.retry = -1 if req.tokens > r.tpm else retry_window
    return d


def decided_admission(req: ReserveRequest, p: Plan, d: Decision, used: Sequence[int],
                      counts: Sequence[tuple[int, int]], added: bool) -> Admission:
    """The admission a Python store reports for decision ``d`` (``added``: this call took the hold)."""
    add_n, add_r, add_t = (d.amount, 1, req.tokens) if added else (0, 0, 0)
    lim_r = rem_r = lim_t = rem_t = -1
    for r, (nreq, ntok) in zip(p.rates, counts, strict=True):
        if r.rpm is not None and (lim_r < 0 or r.rpm - nreq - add_r < rem_r):
            lim_r, rem_r = r.rpm, r.rpm - nreq - add_r
        if r.tpm is not None and (lim_t < 0 or r.tpm - ntok - add_t < rem_t):
            lim_t, rem_t = r.tpm, r.tpm - ntok - add_t
    rem_n = min((rule.limit_nano - u - add_n for rule, u in zip(p.budgets, used, strict=True)), default=-1)
    admitted = d.kind == 0
    return admission_from_reply(p, (int(admitted), d.amount if admitted else 0, d.kind, d.idx, d.limit, d.used,
                                    d.retry, lim_r, rem_r, lim_t, rem_t, rem_n))


def admission_from_reply(p: Plan, reply: Sequence[int]) -> Admission:
    """Decode the reserve reply shared by both stores.

    ``[admitted, reserved, kind, index, limit, used, retry_after, limit_req, remaining_req,
    limit_tok, remaining_tok, remaining_nano]``; ``-1`` means "none", ``index`` is 1-based
    into ``p.budgets`` (kind 1) or ``p.rates`` (kinds 2 and 3).
    """
    admitted, reserved, kind, idx, limit, used, retry, lim_r, rem_r, lim_t, rem_t, rem_n = map(int, reply)
    refusal = None
    if not admitted:
        if kind in (1, 4):
            b = p.budgets[idx - 1]
            refusal = Refusal(KIND_NAMES[kind], b.scope, b.owner, b.period, limit, used, None)
        else:
            r = p.rates[idx - 1]
            refusal = Refusal(KIND_NAMES[kind], r.scope, r.owner, "minute", limit, used, retry if retry >= 0 else None)
    rate = RateStatus(
        limit_requests=lim_r if lim_r >= 0 else None,
        remaining_requests=max(0, rem_r) if lim_r >= 0 else None,
        limit_tokens=lim_t if lim_t >= 0 else None,
        remaining_tokens=max(0, rem_t) if lim_t >= 0 else None,
    )
    return Admission(bool(admitted), refusal, rate, max(0, rem_n) if p.budgets else None, reserved)
