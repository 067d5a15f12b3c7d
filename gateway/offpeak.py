"""Off-peak windows: when a provider's discounted hours (DeepSeek's, in litellm's map) are open.

This module owns the reading of a map entry's ``off_peak_pricing`` schedule:
flat ``hours_utc`` windows that apply every day, and ``windows`` rules whose
``hours_utc`` apply only on their ``weekdays`` (ISO 1 = Monday … 7 = Sunday, or
names), read on the calendar of ``weekday_timezone`` (UTC by default). A window
``"HH:MM-HH:MM"`` includes its start and excludes its end, may wrap past
midnight, and covers the whole day when start equals end. Malformed windows and
rules are skipped, never raised: the map is upstream data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_DAYS = {"mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6, "sun": 7}
_ALL_DAYS = frozenset(range(1, 8))

Window = tuple[time, time]


@dataclass(frozen=True, slots=True)
class OffPeak:
    """The open hours of an off-peak schedule: (weekdays, windows) rules, weekdays on ``calendar``."""

    rules: tuple[tuple[frozenset[int], tuple[Window, ...]], ...]
    calendar: str = "UTC"

    def open_at(self, moment: datetime) -> bool:
        utc = moment.astimezone(UTC) if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
        now, day = utc.time(), utc.astimezone(_zone(self.calendar)).isoweekday()
        return any(day in days and any(_inside(now, w) for w in windows) for days, windows in self.rules)


def _inside(now: time, window: Window) -> bool:
    start, end = window
    if start < end:
        return start <= now < end
    return now >= start or now < end          # wraps past midnight; start == end is the whole day


def _zone(name: str) -> tzinfo:
    if name == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ValueError, ZoneInfoNotFoundError):
        return UTC


def parse_off_peak(block: Any) -> OffPeak | None:
    """The schedule of an ``off_peak_pricing`` block, or None when it opens no window at all."""
    if not isinstance(block, Mapping):
        return None
    rules: list[tuple[frozenset[int], tuple[Window, ...]]] = []
    flat = _windows(block.get("hours_utc"))
    if flat:
        rules.append((_ALL_DAYS, flat))
    raw_rules = block.get("windows")
    if isinstance(raw_rules, Sequence) and not isinstance(raw_rules, str):
        for rule in raw_rules:
            if not isinstance(rule, Mapping):
                continue
            windows, days = _windows(rule.get("hours_utc")), _weekdays(rule.get("weekdays"))
            if windows and days:
                rules.append((days, windows))
    if not rules:
        return None
    zone = block.get("weekday_timezone")
    calendar = zone.strip() if isinstance(zone, str) and zone.strip() else "UTC"
    return OffPeak(tuple(rules), calendar)


def _windows(value: Any) -> tuple[Window, ...]:
    items = (value,) if isinstance(value, str) else value if isinstance(value, Sequence) else ()
    out = []
    for item in items:
        if not isinstance(item, str) or item.count("-") != 1:
            continue
        start, end = (_clock(part) for part in item.split("-"))
        if start is not None and end is not None:
            out.append((start, end))
    return tuple(out)


def _clock(text: str) -> time | None:
    try:
        return datetime.strptime(text.strip(), "%H:%M").time()
    except ValueError:
        return None


def _weekdays(value: Any) -> frozenset[int]:
    if value is None:
        return _ALL_DAYS
    if isinstance(value, str) or not isinstance(value, Sequence):
        return frozenset()
    days = set()
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool) and 1 <= item <= 7:
            days.add(item)
        elif isinstance(item, str) and item.strip().lower()[:3] in _DAYS:
            days.add(_DAYS[item.strip().lower()[:3]])
    return frozenset(days)
