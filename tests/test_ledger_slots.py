"""The buffered ledger writes per hash slot, and logs an outage without flooding the log (issue 11, items
11 and 12). In process: a fake per-slot ledger (one slot per team, each part applied once by its batch's
marker, as the Redis ledger's are) whose slots can be made unreachable, and a fake clock.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from collections.abc import Set as AbstractSet

import pytest
import redis

from gateway.state.ledger import BufferedLedger, LedgerRecord
from gateway.state.outage_log import OutageLog


def record(i: int, team: str) -> LedgerRecord:
    return LedgerRecord(request_id=f"{team}-{i}", ts=1_800_000_000.0 + i, team=team, key_id=None,
                        requested_model="m", model="m", deployment="d", provider="p", route="default",
                        input_tokens=10, output_tokens=i, cost_nano=1_000_003 * (i + 1))


class SlotLedger:
    """Each team's records in their own slot; a part is applied once per batch (its marker), like Redis."""

    def __init__(self) -> None:
        self.dead: set[str] = set()
        self.rows: dict[str, list[LedgerRecord]] = {}
        self.cost: Counter[str] = Counter()
        self.markers: set[tuple[str, tuple[str, ...]]] = set()
        self.attempts: Counter[str] = Counter()

    @staticmethod
    def slot(team: str) -> int:
        return sum(team.encode()) % 16_384

    async def append(self, records: Sequence[LedgerRecord]) -> None:   # the Ledger protocol (unused here)
        raise AssertionError("a slotted ledger is written per slot")

    async def append_parts(self, records: Sequence[LedgerRecord], skip: AbstractSet[int] = frozenset(),
                           down: dict[str, BaseException] | None = None
                           ) -> tuple[frozenset[int], dict[int, BaseException | None]]:
        teams = {r.team for r in records}
        batch = tuple(r.request_id for r in records)
        outcomes: dict[int, BaseException | None] = {}
        for team in teams:
            if self.slot(team) in skip:
                continue
            self.attempts[team] += 1
            if team in self.dead:
                outcomes[self.slot(team)] = redis.exceptions.ConnectionError("master down")
                continue
            if (team, batch) not in self.markers:
                self.markers.add((team, batch))
                mine = [r for r in records if r.team == team]
                self.rows.setdefault(team, []).extend(mine)
                self.cost[team] += sum(r.cost_nano for r in mine)
            outcomes[self.slot(team)] = None
        return frozenset(self.slot(t) for t in teams), outcomes


async def test_one_dead_slot_stalls_only_its_own_records() -> None:
    inner = SlotLedger()
    buf = BufferedLedger(inner)   # type: ignore[arg-type]
    teams = ("healthy-a", "dead-b", "healthy-c")
    batches = [[record(3 * b + j, teams[j]) for j in range(3)] for b in range(6)]
    await buf.append(batches[0])
    inner.dead.add("dead-b")
    for batch in batches[1:]:
        await buf.append(batch)
        await buf.flush()
    # the healthy teams' records of every batch are written; the dead slot's wait, and so do their batches
    for team in ("healthy-a", "healthy-c"):
        assert [r.request_id for r in inner.rows[team]] == [f"{team}-{3 * b + teams.index(team)}" for b in range(6)]
    assert [r.request_id for r in inner.rows["dead-b"]] == ["dead-b-1"]
    assert buf.pending == 15                        # 5 batches of 3 records not yet complete
    attempts = inner.attempts["dead-b"]
    await buf.flush()
    assert inner.attempts["dead-b"] == attempts + 1   # one failed try per pass, the rest wait behind it
    assert inner.attempts["healthy-a"] == 6           # written parts are not sent again
    inner.dead.clear()
    assert await buf.flush() == 15 and buf.pending == 0
    assert [r.request_id for r in inner.rows["dead-b"]] == [f"dead-b-{3 * b + 1}" for b in range(6)]  # in order
    want = {t: sum(r.cost_nano for b in batches for r in b if r.team == t) for t in teams}
    assert dict(inner.cost) == want                  # every record once: the sums are exact
    assert sum(len(v) for v in inner.rows.values()) == 18


class Clock:
    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t


def test_outage_log_says_it_once_then_every_period_then_resumed(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    out = OutageLog(logging.getLogger("test.outage"), "ledger write", every_s=30.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.outage"):
        for _ in range(100):                         # 10 s of 0.1 s retries
            out.failed(ConnectionError("down"), 7)
            clock.t += 0.1
        clock.t = 1_031.0
        out.failed(ConnectionError("down"), 9)      # 31 s in: one more line, with the count it stands for
        clock.t += 0.1
        out.failed(ConnectionError("down"), 9)
        clock.t = 1_040.0
        out.succeeded()
        out.succeeded()                              # nothing more to say
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "ledger write failed, 7 records waiting: ConnectionError('down')",
        "ledger write still failing after 31 s (99 failures not logged), 9 records waiting: ConnectionError('down')",
        "ledger writes resumed after 40 s and 102 failed attempts",
    ]


async def test_buffered_ledger_logs_an_outage_once_per_period(caplog: pytest.LogCaptureFixture) -> None:
    inner = SlotLedger()
    clock = Clock()
    buf = BufferedLedger(inner, clock=clock)   # type: ignore[arg-type]
    inner.dead.add("t")
    with caplog.at_level(logging.INFO, logger="gateway.state.ledger"):
        await buf.append([record(0, "t")])
        for _ in range(50):                          # 5 s of the background writer's 0.1 s retries
            clock.t += 0.1
            await buf.flush()
        inner.dead.clear()
        clock.t += 0.1
        await buf.flush()
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.state.ledger"]
    down = redis.exceptions.ConnectionError("master down")
    assert lines == [f"ledger write failed, 1 records waiting: {down!r}",
                     "ledger writes resumed after 5 s and 51 failed attempts"]
    assert buf.pending == 0 and inner.cost["t"] == 1_000_003
