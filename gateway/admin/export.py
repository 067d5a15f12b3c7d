"""``gateway ledger export`` and ``/admin/ledger/export``: the ledger's records, one per line, as CSV or JSONL.

Both paths call :func:`export` on whatever ledger the state has (SQLite: the whole history; Redis:
the stream; memory: the newest records the process keeps), over ``since <= ts < until``, oldest
first. JSONL is each record exactly as stored (every field, ``savings`` per source in nano-USD).
CSV has one column per field, ``savings`` as a compact JSON object, plus ``time`` (ISO 8601, UTC)
first and ``cost_usd`` (exact, from ``cost_nano``) after ``cost_nano``, so a spreadsheet needs no
conversion; money stays integer nano-USD throughout.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

import orjson

from gateway.admin.ops import state_errors
from gateway.admin.spend_report import iso, parse_since, usd
from gateway.errors import InvalidRequest
from gateway.state.ledger import Ledger, LedgerRecord

EXPORT_FORMATS = ("csv", "jsonl")
EXPORT_MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}
FIELDS = tuple(f.name for f in fields(LedgerRecord))
COLUMNS = ("time", *(n for name in FIELDS for n in ((name, "cost_usd") if name == "cost_nano" else (name,))))


def _row(r: LedgerRecord) -> list[Any]:
    out: list[Any] = [iso(r.ts)]
    for name in FIELDS:
        value = getattr(r, name)
        if name == "savings":
            value = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        elif value is None:
            value = ""
        out.append(value)
        if name == "cost_nano":
            out.append(usd(r.cost_nano))
    return out


def render(records: Iterable[LedgerRecord], fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(r.to_json().decode() + "\n" for r in records)
    if fmt != "csv":
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(_row(r) for r in records)
    return buf.getvalue()


def export_params(since: str, until: str | None, fmt: str, now: float) -> tuple[float, float | None]:
    """Validated (since, until) as unix times; errors are 400s naming the parameter."""
    if fmt not in EXPORT_FORMATS:
        raise InvalidRequest(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}",
                             code="invalid_value", param="format")
    bounds = []
    for name, text in (("since", since), ("until", until)):
        try:
            bounds.append(None if text is None else parse_since(text, now))
        except ValueError as exc:
            raise InvalidRequest(str(exc).replace("since", name, 1), code="invalid_value", param=name) from None
    start, end = bounds
    assert start is not None
    if end is not None and end <= start:
        raise InvalidRequest("until must be later than since", code="invalid_value", param="until")
    return start, end


async def export(ledger: Ledger, team: str | None, since: str, until: str | None, fmt: str) -> str:
    """The records of ``team`` (None: every team) from ``since`` to ``until`` (None: now), rendered."""
    start, end = export_params(since, until, fmt, time.time())
    with state_errors("The spend ledger"):
        records = await ledger.read(start, end, (team.strip() or None) if team else None)
    return render(records, fmt)
