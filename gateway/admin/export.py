"""``gateway ledger export`` and ``/admin/ledger/export``: the ledger's records, one per line, as CSV or JSONL.

Both paths call :func:`export` on whatever ledger the state has (SQLite: the whole history; Redis:
the stream; memory: the newest records the process keeps), over ``since <= ts < until``, oldest
first. JSONL is each record exactly as stored (every field, ``savings`` per source in nano-USD).
CSV has one column per field, ``savings`` as a compact JSON object, plus ``time`` (ISO 8601, UTC)
first and ``cost_usd`` (exact, from ``cost_nano``) after ``cost_nano``, so a spreadsheet needs no
conversion; money stays integer nano-USD throughout. The output is rendered a chunk at a time
(:func:`export_chunks`), and on SQLite read a page at a time, so a long history is never held whole.
"""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import AsyncIterator, Iterable, Iterator
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


def render_chunks(records: Iterable[LedgerRecord], fmt: str, chunk: int = 1_000) -> Iterator[str]:
    """The rendering, ``chunk`` records at a time (a long history is never held as one string)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if fmt == "csv":
        writer.writerow(COLUMNS)
    n = 0
    for r in records:
        if fmt == "jsonl":
            buf.write(r.to_json().decode() + "\n")
        else:
            writer.writerow(_row(r))
        n += 1
        if n % chunk == 0:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    if buf.tell():
        yield buf.getvalue()


def render(records: Iterable[LedgerRecord], fmt: str) -> str:
    return "".join(render_chunks(records, fmt))


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
    return "".join([chunk async for chunk in export_chunks(ledger, team, since, until, fmt)])


async def export_chunks(ledger: Ledger, team: str | None, since: str, until: str | None, fmt: str
                        ) -> AsyncIterator[str]:
    """:func:`export` a chunk at a time; on SQLite the records are read a page at a time too."""
    start, end = export_params(since, until, fmt, time.time())
    team = (team.strip() or None) if team else None
    scan = getattr(ledger, "scan", None)   # SqliteLedger: the whole history, paged
    with state_errors("The spend ledger"):
        records: Iterable[LedgerRecord] = scan(start, end, team) if scan is not None else \
            await ledger.read(start, end, team)
        for chunk in render_chunks(records, fmt):
            yield chunk
            await asyncio.sleep(0)   # in the gateway's process: let requests through between chunks
