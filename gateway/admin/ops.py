"""The operations behind the admin API and the ``keys``/``spend`` commands, on any state stores.

``/admin/*`` (embedded or Redis state) and the CLI talking to Redis directly call the same
functions here, so a key is validated, shown and revoked the same way on every path:
:func:`key_request` checks a creation request strictly (unknown fields, types, ranges;
errors are 400s naming the field), :func:`key_view` is the public form of a key (never
its secret), :func:`team_views` reports each policy team's budgets (limit, spent,
reserved, remaining per period) and :func:`spend` builds the ledger report of
:mod:`gateway.admin.spend_report`. Store failures (Redis unreachable) are translated here,
at the one place these operations call the stores, into 503 ``state_unavailable``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, cast

from redis.exceptions import RedisClusterException, RedisError

from gateway.admin.spend_report import (
    FILTERS,
    build_report,
    from_rollups,
    group_records,
    iso,
    matches,
    parse_by,
    parse_since,
    top_rows,
    usd,
)
from gateway.budgets.rules import DEFAULT_OUTPUT_CAP, budget_rules
from gateway.errors import InvalidRequest, NotFound, state_unavailable
from gateway.policy import LimitTable, TeamSpec
from gateway.state.budgets import MAX_AMOUNT, BudgetStore, BudgetUsage, StateUnavailable, period_end
from gateway.state.keys import KEY_PERIODS, KeyRecord, KeyStore
from gateway.state.ledger import Ledger

KEY_FIELDS = ("team", "name", "budget_usd", "budget_period", "rpm", "tpm", "expires_in_days", "max_usd_per_minute")
MAX_NAME = 200
MAX_EXPIRY_DAYS = 36_600
DAY_S = 86_400


@contextlib.contextmanager
def state_errors(what: str = "Key, budget and ledger state") -> Iterator[None]:
    """Turn a store failure (Redis down, refused, timed out) into a 503 the caller can show."""
    try:
        yield
    except (StateUnavailable, RedisError, RedisClusterException, OSError) as exc:
        raise state_unavailable(exc, what) from exc


@dataclass(frozen=True, slots=True)
class KeyRequest:
    team: str
    name: str = ""
    budget_usd: str | None = None
    budget_period: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    expires_in_days: float | None = None
    max_usd_per_minute: str | None = None


def _bad(param: str, message: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, code=code, param=param)


def _text(body: Mapping[str, Any], name: str, limit: int, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _bad(name, f"'{name}' is required.", "missing_field")
        return None
    if not isinstance(value, str):
        raise _bad(name, f"'{name}' must be a string, got {value!r}.", "invalid_type")
    value = value.strip()
    if required and not value:
        raise _bad(name, f"'{name}' must not be empty.")
    if len(value) > limit or not value.isprintable():
        raise _bad(name, f"'{name}' must be printable text of at most {limit} characters.")
    return value


def _positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_AMOUNT:
        raise _bad(name, f"'{name}' must be a positive integer, got {value!r}.")
    return value


def _budget(value: Any, name: str = "budget_usd") -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _bad(name, f"'{name}' must be a USD amount, got {value!r}.", "invalid_type")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise _bad(name, f"'{name}' must be a USD amount such as 20 or 0.50, got {value!r}.") from None
    top = MAX_AMOUNT // 10**9
    if not amount.is_finite() or not 0 <= amount <= top or amount != amount.quantize(Decimal("1e-9")):
        raise _bad(name, f"'{name}' must be from 0 to {top} USD with at most 9 decimals, got {value!r}.")
    return str(amount)


def key_request(body: Any) -> KeyRequest:
    """A validated key-creation request from a JSON body (or the CLI's flags as a dict)."""
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object with at least 'team'.", code="invalid_json")
    unknown = sorted(set(body) - set(KEY_FIELDS))
    if unknown:
        raise _bad(unknown[0], f"Unknown field '{unknown[0]}'; expected: {', '.join(KEY_FIELDS)}.", "unknown_field")
    team = cast(str, _text(body, "team", 128, required=True))
    budget_usd = _budget(body.get("budget_usd"))
    period = _text(body, "budget_period", 16)
    if period is not None and period not in KEY_PERIODS:
        raise _bad("budget_period", f"'budget_period' must be one of {', '.join(KEY_PERIODS)}, got {period!r}.")
    if period is not None and budget_usd is None:
        raise _bad("budget_period", "'budget_period' needs 'budget_usd'.")
    days = body.get("expires_in_days")
    if days is not None and (isinstance(days, bool) or not isinstance(days, int | float)
                             or not 0 < days <= MAX_EXPIRY_DAYS):
        raise _bad("expires_in_days", f"'expires_in_days' must be a number of days from 0 (exclusive) "
                                      f"to {MAX_EXPIRY_DAYS}, got {days!r}.")
    return KeyRequest(team=team, name=_text(body, "name", MAX_NAME) or "", budget_usd=budget_usd,
                      budget_period=period or ("monthly" if budget_usd is not None else None),
                      rpm=_positive_int(body, "rpm"), tpm=_positive_int(body, "tpm"),
                      expires_in_days=float(days) if days is not None else None,
                      max_usd_per_minute=_budget(body.get("max_usd_per_minute"), "max_usd_per_minute"))


def _iso(ts: float | None) -> str | None:
    return None if ts is None else iso(ts)


def key_status(record: KeyRecord, now: float) -> str:
    if record.revoked_at is not None and record.revoked_at <= now:
        return "revoked"
    return "active" if record.active(now) else "expired"


def key_view(record: KeyRecord, now: float) -> dict[str, Any]:
    """A key as the admin API and the CLI show it: everything but the secret (only its first 8 characters)."""
    return {"id": record.id, "object": "key", "team": record.team, "name": record.name,
            "status": key_status(record, now), "prefix": record.prefix, "created_at": iso(record.created_at),
            "expires_at": _iso(record.expires_at), "revoked_at": _iso(record.revoked_at),
            "budget_usd": record.budget_usd, "budget_period": record.budget_period,
            "rpm": record.rpm, "tpm": record.tpm, "max_usd_per_minute": record.max_usd_per_minute}


async def create_key(store: KeyStore, req: KeyRequest, known_teams: Collection[str] | None) -> dict[str, Any]:
    """Create the key; the reply carries the secret, which is never shown again. ``known_teams``
    (the policy teams, when known) adds a warning for a team the policies do not define."""
    now = time.time()
    expires = now + req.expires_in_days * DAY_S if req.expires_in_days is not None else None
    try:
        with state_errors():
            record, secret = await store.create(req.team, req.name, expires_at=expires, budget_usd=req.budget_usd,
                                                budget_period=req.budget_period, rpm=req.rpm, tpm=req.tpm,
                                                max_usd_per_minute=req.max_usd_per_minute)
    except ValueError as exc:   # the store's own checks, should the ones above ever miss a case
        raise InvalidRequest(f"Invalid key: {exc}", code="invalid_value") from None
    warnings = []
    if known_teams is not None and req.team not in known_teams:
        warnings.append(f"team '{req.team}' is not defined in the policies: it has no team budget, rate limit "
                        f"or model restriction (only this key's own limits apply)")
    if req.tpm is not None and req.tpm < DEFAULT_OUTPUT_CAP:
        warnings.append(f"tpm {req.tpm} is below one default request ({DEFAULT_OUTPUT_CAP} output tokens when a "
                        f"request sets no max_tokens): such requests are capped to the tokens left in the minute")
    return {"key": key_view(record, now), "secret": secret, "warnings": warnings}


async def list_keys(store: KeyStore, team: str | None) -> list[dict[str, Any]]:
    now = time.time()
    with state_errors():
        records = await store.list(team)
    return [key_view(r, now) for r in records]


async def revoke_key(store: KeyStore, key_id: str) -> dict[str, Any]:
    """Revoke a key; ``revoked`` says whether this call did it (False: it was already revoked)."""
    with state_errors():
        record = await store.get(key_id)
        if record is None:
            raise NotFound(f"No key with id '{key_id}'.", code="key_not_found", param="id")
        revoked = await store.revoke(key_id)
        record = await store.get(key_id) or record
    return {"revoked": revoked, "key": key_view(record, time.time())}


async def limit_views(table: LimitTable, budgets: BudgetStore, name: str | None = None,
                      now: datetime | None = None) -> dict[str, Any]:
    """The ``users``, ``tags`` or ``sessions`` policy with each named entry's budgets (limit, spent,
    reserved, remaining per period, the minute brake as period ``minute``); with ``name``, only that
    one, under its own entry or the section's default (an end user or session the policy does not name)."""
    now = now or datetime.now(UTC)
    if name is not None:
        name = name.strip()
        if not name or len(name) > 256 or not name.isprintable():
            raise _bad("name", "name must be a printable string of 1 to 256 characters")
    names = [name] if name is not None else sorted(table.entries)
    out = []
    for owner in names:
        limits = table.get(owner)
        if limits is None:
            raise NotFound(f"No {table.scope} limits apply to {owner!r} (no entry and no default).",
                           code=f"{table.scope}_not_found", param="name")
        rules = budget_rules(TeamSpec("-"), None, False, ((table.scope, owner, limits),))
        with state_errors("The budget store"):
            usage = await budgets.usage("-", rules, now)
        out.append({"name": owner, "object": table.scope, "from_default": owner not in table.entries,
                    "budgets": [_budget_view(None, u, now) for u in usage], "rpm": limits.rpm, "tpm": limits.tpm,
                    "max_usd_per_minute": usd(limits.max_usd_per_minute_nano)
                    if limits.max_usd_per_minute_nano is not None else None})
    default = None
    if table.default is not None:
        d = table.default
        default = {"budgets": [{"period": b.period, "limit_usd": usd(b.limit_nano)} for b in d.budgets],
                   "rpm": d.rpm, "tpm": d.tpm, "max_usd_per_minute": usd(d.max_usd_per_minute_nano)
                   if d.max_usd_per_minute_nano is not None else None}
    return {"object": "list", "data": out, "default": default}


def _budget_view(team: TeamSpec | None, u: BudgetUsage, now: datetime) -> dict[str, Any]:
    used = u.spent_nano + u.reserved_nano
    return {"period": u.period, "period_id": u.period_id, "period_ends": iso(period_end(u.period, now).timestamp()),
            "limit_usd": usd(u.limit_nano), "spent_usd": usd(u.spent_nano), "reserved_usd": usd(u.reserved_nano),
            "remaining_usd": usd(u.remaining_nano), "limit_nano": u.limit_nano, "spent_nano": u.spent_nano,
            "reserved_nano": u.reserved_nano, "remaining_nano": u.remaining_nano,
            "used_fraction": round(used / u.limit_nano, 6) if u.limit_nano else (1.0 if used else 0.0),
            "soft_alert_reached": used >= u.limit_nano * (team.soft_alert if team is not None else 0.8)}


async def team_views(teams: Sequence[TeamSpec], budgets: BudgetStore, now: datetime | None = None
                     ) -> list[dict[str, Any]]:
    """Each team's settings and, per budget period, limit, spent, reserved and remaining (nano and USD)."""
    now = now or datetime.now(UTC)
    out = []
    for team in teams:
        with state_errors("The budget store"):
            usage = await budgets.usage(team.name, budget_rules(team, None), now)
        out.append({"name": team.name, "object": "team", "budgets": [_budget_view(team, u, now) for u in usage],
                    "on_exceed": team.on_exceed, "downgrade_to": team.downgrade_to, "soft_alert": team.soft_alert,
                    "rpm": team.rpm, "tpm": team.tpm,
                    "allowed_models": sorted(team.allowed_models) if team.allowed_models is not None else None})
    return out


def spend_params(team: str | None, since: str, by: str, now: float) -> tuple[str | None, float, str]:
    """Validated report parameters: (team or None, since as unix time, group by)."""
    try:
        start = parse_since(since, now)
    except ValueError as exc:
        raise _bad("since", str(exc)) from None
    try:
        parse_by(by)
    except ValueError as exc:
        raise _bad("by", str(exc)) from None
    return (team.strip() or None) if team else None, start, by


def spend_filters(filters: Mapping[str, str | None] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in (filters or {}).items():
        if name not in FILTERS:
            raise _bad(name, f"unknown filter {name!r}; filters are {', '.join(FILTERS)}")
        if value is not None and value.strip():
            if len(value) > 256 or not value.isprintable():
                raise _bad(name, f"{name} must be a printable string of at most 256 characters")
            out[name] = value.strip()
    return out


async def spend(ledger: Ledger, team: str | None, since: str, by: str,
                filters: Mapping[str, str | None] | None = None, top: int | None = None) -> dict[str, Any]:
    """The spend report document over the ledger's records from ``since`` until now: from the rollups
    when they can answer (by team, model or day without filters), else from the records."""
    now = time.time()
    team, start, by = spend_params(team, since, by, now)
    dims, wanted = parse_by(by), spend_filters(filters)
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise _bad("top", f"top must be a positive integer, got {top!r}")
    notes: list[str] = []
    with state_errors("The spend ledger"):
        rows = None
        total = None
        if from_rollups(dims, wanted):
            rows = await ledger.totals(start, None, team, dims[0])
        elif not wanted and dims[0] not in ("tag", "session", "endpoint", "route", "deployment") \
                and (len(dims) == 1 or dims[1] not in ("tag", "session", "endpoint", "route", "deployment")):
            try:   # a ledger that groups by these itself (ClickHouse: key, user, provider, pairs)
                rows = await ledger.totals(start, None, team, ",".join(dims))
            except ValueError:
                rows = None
        if rows is None:
            records = [r for r in await ledger.read(start, None, team) if matches(r, wanted)]
            rows, total = group_records(records, dims)
            if not wanted:   # the records must hold what the rollups counted, else some were not kept
                rolled = await ledger.totals(start, None, team, "team")
                counted, kept = sum(int(row["cost_nano"]) for row in rolled), int(total["cost_nano"])
                if counted != kept or len(records) != sum(int(row["requests"]) for row in rolled):
                    notes.append(f"the window is larger than the ledger keeps records for: these rows cover "
                                 f"${usd(kept)} of the ${usd(counted)} spent (see gateway spend --by team)")
    if top is not None:
        rows = top_rows(list(rows), top, dims)
    return build_report(rows, by=by, team=team, since=start, until=now, total=total, filters=wanted, notes=notes)
