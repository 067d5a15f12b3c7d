"""The spend report: one document built from ledger totals, rendered as JSON, CSV or a text table.

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

from gateway.state.ledger import SAVINGS_SOURCES

FORMATS = ("table", "csv", "json")
# what a report may be grouped by: any ledger answers GROUP_BY (team, model, day); the ClickHouse
# ledger also key and provider, and any comma-separated list of them ("team,model")
REPORT_BY = ("team", "key", "model", "provider", "day")
MEDIA_TYPES = {"json": "application/json", "csv": "text/csv; charset=utf-8", "table": "text/plain; charset=utf-8"}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_MAX_BACK_S = 20 * 366 * 86_400
NANO = 10**9


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
                 until: float) -> dict[str, Any]:
    """The report document from :meth:`Ledger.totals` rows (sorted by key), with a total row."""
    check_by(by)
    total: dict[str, Any] = {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_nano": 0,
                             "baseline_nano": 0, "savings_nano": dict.fromkeys(SAVINGS_SOURCES, 0)}
    for row in rows:
        for name in ("requests", "input_tokens", "output_tokens", "cost_nano", "baseline_nano"):
            total[name] += int(row[name])
        for source in SAVINGS_SOURCES:
            total["savings_nano"][source] += int(row["savings_nano"].get(source, 0))
    return {"object": "spend_report", "by": by, "team": team, "since": iso(since), "until": iso(until),
            "rows": [{by: row["key"]} | _money(row) for row in rows], "total": _money(total)}


def render(report: dict[str, Any], fmt: str) -> str:
    """The report as ``json``, ``csv`` (one line per row, no total) or an aligned text ``table``."""
    check_choice("format", fmt, FORMATS)
    if fmt == "json":
        return orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n"
    by = report["by"]
    columns = [by, "requests", "input_tokens", "output_tokens", "cost_usd", "baseline_usd", "savings_usd",
               *(f"savings_{s}_usd" for s in SAVINGS_SOURCES)]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in report["rows"]:
            writer.writerow([row[by], row["requests"], row["input_tokens"], row["output_tokens"], row["cost_usd"],
                             row["baseline_usd"], row["savings_usd"],
                             *(usd(row["savings_by_source_nano"][s]) for s in SAVINGS_SOURCES)])
        return out.getvalue()
    return _table(report)


def _table(report: dict[str, Any]) -> str:
    by = report["by"]
    header = [by.upper(), "REQUESTS", "INPUT TOK", "OUTPUT TOK", "COST USD", "BASELINE USD", "SAVED USD"]
    lines = [[str(row[by]), str(row["requests"]), str(row["input_tokens"]), str(row["output_tokens"]),
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
    return "\n".join(body) + "\n"
