"""The spend report: one document built from ledger totals, rendered as JSON, CSV or a text table.

By team, model or day (one at a time, no filter) the ledger's per-day rollups answer; by key, end
user, tag, session, provider, deployment, route or endpoint, by two dimensions at once
(``team,user``) or with a ``key``/``user``/``tag``/``session`` filter, :func:`group_records` sums the
ledger records themselves. Every breakdown adds up to the total to the nano-dollar, except by tag
(a request with two tags counts under each, untagged ones under ``(none)``; the report says so);
``top`` keeps the N costliest rows and sums the rest into ``(other)``.

``/admin/spend`` and ``gateway spend`` both go through :func:`build_report` and
:func:`render`, so the two cannot drift. Money stays integer nano-USD up to the
last step; every USD figure is printed exactly (``usd``: no float, at least two
decimals, up to nine). Savings are baseline minus actual cost, in total and per
attributed source. :func:`parse_since` reads the report window's start: a
duration back from now (``30m``, ``24h``, ``7d``, ``2w``) or an ISO date or time
(UTC unless it says otherwise).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.state.ledger import GROUP_BY, NONE, SAVINGS_SOURCES, LedgerRecord, counters, day_of

FORMATS = ("table", "csv", "json")
# what a report may be grouped by: any ledger answers GROUP_BY (team, model, day); the ClickHouse
# ledger also key and provider, and any comma-separated list of them ("team,model")
REPORT_BY = ("team", "key", "model", "provider", "day")
MEDIA_TYPES = {"json": "application/json", "csv": "text/csv; charset=utf-8", "table": "text/plain; charset=utf-8"}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_MAX_BACK_S = 20 * 366 * 86_400
NANO = 10**9
DIMENSIONS = ("team", "key", "user", "tag", "session", "model", "provider", "deployment", "route", "endpoint",
              "day")
OTHER = "(other)"
TAG_NOTE = ("by tag: a request with several tags counts under each of them and an untagged one under (none), "
            "so the rows may add up to more than the total")
FILTERS = ("key", "user", "tag", "session")


def parse_by(text: str) -> tuple[str, ...]:
    """``team`` or ``team,user``: one or two dimensions; ValueError naming the choices otherwise."""
    dims = tuple(d.strip() for d in text.split(","))
    if not 1 <= len(dims) <= 2 or len(set(dims)) != len(dims):
        raise ValueError(f"by takes one dimension or two separated by a comma, got {text!r}")
    for d in dims:
        check_choice("by", d, DIMENSIONS)
    return dims


def from_rollups(dims: tuple[str, ...], filters: dict[str, str]) -> bool:
    """Whether the ledger's per-day rollups can answer: one of their dimensions and no record filter."""
    return len(dims) == 1 and dims[0] in GROUP_BY and not filters


def _values(r: LedgerRecord, dim: str) -> tuple[str, ...]:
    if dim == "tag":
        return r.tags or (NONE,)
    if dim == "day":
        return (day_of(r.ts, "%Y-%m-%d"),)
    value = {"team": r.team, "key": r.key_id, "user": r.user, "session": r.session, "model": r.model,
             "provider": r.provider, "deployment": r.deployment, "route": r.route, "endpoint": r.endpoint}[dim]
    return (value or NONE,)


def matches(r: LedgerRecord, filters: dict[str, str]) -> bool:
    for name, want in filters.items():
        if name == "tag":
            if want not in r.tags:
                return False
        elif (r.key_id if name == "key" else getattr(r, name)) != want:
            return False
    return True


def _row(key: Any, row: dict[str, int]) -> dict[str, Any]:
    return {"key": key, "requests": row.get("requests", 0), "cost_nano": row.get("cost_nano", 0),
            "baseline_nano": row.get("baseline_nano", 0), "input_tokens": row.get("input_tokens", 0),
            "output_tokens": row.get("output_tokens", 0),
            "savings_nano": {src: row.get("savings_" + src, 0) for src in SAVINGS_SOURCES}}


def group_records(records: Sequence[LedgerRecord], dims: tuple[str, ...]) -> tuple[list[dict[str, Any]],
                                                                                     dict[str, Any]]:
    """(rows keyed by a tuple of the dimensions' values, sorted; the total) over ``records``, exactly:
    integer sums of :func:`gateway.state.ledger.counters`. A record with two tags is in two tag rows,
    and once in the total."""
    rows: dict[tuple[str, ...], dict[str, int]] = {}
    total: dict[str, int] = {}
    for r in records:
        values = counters(r)
        for name, v in values.items():
            total[name] = total.get(name, 0) + v
        keys: list[tuple[str, ...]] = [()]
        for dim in dims:
            keys = [k + (v,) for k in keys for v in _values(r, dim)]
        for k in keys:
            row = rows.setdefault(k, {})
            for name, v in values.items():
                row[name] = row.get(name, 0) + v
    return [_row(k, rows[k]) for k in sorted(rows)], _row(None, total)


def top_rows(rows: list[dict[str, Any]], top: int, dims: tuple[str, ...]) -> list[dict[str, Any]]:
    """The ``top`` rows by cost, the rest summed into one ``(other)`` row, so the rows still add up."""
    if top <= 0 or len(rows) <= top:
        return rows
    ranked = sorted(rows, key=lambda row: (-int(row["cost_nano"]), str(row["key"])))
    kept, rest = ranked[:top], ranked[top:]
    other: dict[str, Any] = {"key": (OTHER,) * len(dims) if isinstance(rows[0]["key"], tuple) else OTHER,
                             "savings_nano": dict.fromkeys(SAVINGS_SOURCES, 0)}
    for name in ("requests", "cost_nano", "baseline_nano", "input_tokens", "output_tokens"):
        other[name] = sum(int(row[name]) for row in rest)
    for src in SAVINGS_SOURCES:
        other["savings_nano"][src] = sum(int(row["savings_nano"].get(src, 0)) for row in rest)
    return [*kept, other]


def usd(nano: int) -> str:
    """Integer nano-USD as an exact decimal string: ``0.05``, ``1.00``, ``0.000123456``, ``-0.10``."""
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO)
    digits = f"{frac:09d}".rstrip("0")
    return f"{sign}{whole}.{digits.ljust(2, '0')}"


def parse_since(text: str, now: float) -> float:
    """Unix time of ``text``: ``<n><s|m|h|d|w>`` before ``now``, or an ISO date/time. ValueError otherwise."""
    raw = text.strip()
    unit = _UNITS.get(raw[-1:].lower())
    if unit is not None and raw[:-1].isdigit():
        back = int(raw[:-1]) * unit
        if back > _MAX_BACK_S:
            raise ValueError(f"since: {raw!r} reaches back more than 20 years")
        return now - back
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"since must be a duration such as 30m, 24h, 7d or 2w, or an ISO date such as "
                         f"2026-01-31, got {text!r}") from None
    return (when.replace(tzinfo=UTC) if when.tzinfo is None else when).timestamp()


def check_by(by: str) -> str:
    """``by`` if it is one of :data:`REPORT_BY` or a comma-separated list of them; ValueError otherwise."""
    parts = by.split(",")
    if not all(p in REPORT_BY for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"by must be one of {', '.join(REPORT_BY)} or a comma-separated list of them "
                         f"(key, provider and lists need GATEWAY_CLICKHOUSE_URL), got {by!r}")
    return by


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _money(row: dict[str, Any]) -> dict[str, Any]:
    cost, baseline = int(row["cost_nano"]), int(row["baseline_nano"])
    by_source = {s: int(row["savings_nano"].get(s, 0)) for s in SAVINGS_SOURCES}
    return {"requests": int(row["requests"]), "input_tokens": int(row["input_tokens"]),
            "output_tokens": int(row["output_tokens"]),
            "cost_nano": cost, "cost_usd": usd(cost), "baseline_nano": baseline, "baseline_usd": usd(baseline),
            "savings_nano": baseline - cost, "savings_usd": usd(baseline - cost),
            "savings_by_source_nano": by_source}


def build_report(rows: Sequence[dict[str, Any]], *, by: str, team: str | None, since: float,
                 until: float, total: dict[str, Any] | None = None, filters: dict[str, str] | None = None,
                 notes: Sequence[str] = ()) -> dict[str, Any]:
    """The report document from :meth:`Ledger.totals` or :func:`group_records` rows, with a total row
    (the rows' sum unless given: by tag, a request counts in several rows but once in the total).
    ``by`` is one dimension or two (``team,user``); a row's key is then a tuple."""
    dims = parse_by(by)
    if total is None:
        total = {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_nano": 0,
                 "baseline_nano": 0, "savings_nano": dict.fromkeys(SAVINGS_SOURCES, 0)}
        for row in rows:
            for name in ("requests", "input_tokens", "output_tokens", "cost_nano", "baseline_nano"):
                total[name] += int(row[name])
            for source in SAVINGS_SOURCES:
                total["savings_nano"][source] += int(row["savings_nano"].get(source, 0))

    def named(key: Any) -> dict[str, Any]:
        values = key if isinstance(key, tuple) else (key,)
        return dict(zip(dims, values, strict=True))

    doc: dict[str, Any] = {"object": "spend_report", "by": by, "team": team, "since": iso(since), "until": iso(until),
           "rows": [named(row["key"]) | _money(row) for row in rows], "total": _money(total)}
    if filters:
        doc["filters"] = dict(filters)
    all_notes = ([TAG_NOTE] if "tag" in dims else []) + list(notes)
    if all_notes:
        doc["notes"] = all_notes
    return doc


def render(report: dict[str, Any], fmt: str) -> str:
    """The report as ``json``, ``csv`` (one line per row, no total) or an aligned text ``table``."""
    check_choice("format", fmt, FORMATS)
    if fmt == "json":
        return orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n"
    dims = parse_by(report["by"])
    columns = [*dims, "requests", "input_tokens", "output_tokens", "cost_usd", "baseline_usd", "savings_usd",
               *(f"savings_{s}_usd" for s in SAVINGS_SOURCES)]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in report["rows"]:
            writer.writerow([*(row[d] for d in dims), row["requests"], row["input_tokens"], row["output_tokens"],
                             row["cost_usd"],
                             row["baseline_usd"], row["savings_usd"],
                             *(usd(row["savings_by_source_nano"][s]) for s in SAVINGS_SOURCES)])
        return out.getvalue()
    return _table(report)


def _table(report: dict[str, Any]) -> str:
    by = report["by"]
    dims = parse_by(by)
    header = [" / ".join(d.upper() for d in dims), "REQUESTS", "INPUT TOK", "OUTPUT TOK", "COST USD",
              "BASELINE USD", "SAVED USD"]
    lines = [[" / ".join(str(row[d]) for d in dims), str(row["requests"]), str(row["input_tokens"]),
              str(row["output_tokens"]),
              row["cost_usd"], row["baseline_usd"], row["savings_usd"]] for row in report["rows"]]
    t = report["total"]
    lines.append(["TOTAL", str(t["requests"]), str(t["input_tokens"]), str(t["output_tokens"]), t["cost_usd"],
                  t["baseline_usd"], t["savings_usd"]])
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                             strict=True)))

    scope = f"team {report['team']}" if report["team"] else "all teams"
    title = f"Spend by {by}, {scope}, {report['since']} to {report['until']}"
    saved = [f"{s} {usd(n)}" for s, n in t["savings_by_source_nano"].items() if n]
    body = [title, fmt(header), *(fmt(r) for r in lines[:-1]), "-" * len(fmt(header)), fmt(lines[-1])]
    if saved:
        body.append("savings by source (USD): " + ", ".join(saved))
    if report.get("filters"):
        body.append("filters: " + ", ".join(f"{k}={v}" for k, v in report["filters"].items()))
    body.extend(f"note: {n}" for n in report.get("notes", ()))
    return "\n".join(body) + "\n"
