"""The ledger's spool: batches of records that the shared ledger could not take yet, on local disk.

While Redis is unreachable, :class:`gateway.state.ledger.BufferedLedger` moves its queued batches
here instead of holding them in memory, so an outage of any length loses nothing to a full
buffer, and a worker that crashes during it loses nothing either. Each process appends to its own
file, ``<dir>/spool-<host>-<pid>-<random>.jsonl`` (one batch per line, the records' JSON, fsynced),
and holds an exclusive ``flock`` on it while alive. Batches are written back oldest first from a
read offset; once the whole file is written it is truncated. A file whose lock can be taken
belongs to a process that is gone: :meth:`Spool.adopt` moves its batches into this process's file
and removes it. Re-sending a batch is harmless: the Redis ledger applies each batch once, by a
marker derived from its records (kept a day), so a crash between a write and the offset moving on
never counts a record twice.

:class:`SettleSpool` does the same for the settles the budget store could not take (fail mode
``allow`` while Redis is down): each queued settle is appended to ``settles-<host>-<pid>-<random>.jsonl``
as it is queued (written through to the OS at once, so a killed process loses none; fsynced by the
background flush), the file is rewritten with what is left as the queue drains, and the next process
adopts a dead one's file and replays its settles. A settle replayed twice is harmless: the budget
store applies each request's settle once (its done marker outlives the reservation TTL).

:class:`IntentSpool` keeps the requests admitted unmetered (fail mode ``allow`` while the budget store
is unreachable: no hold, so no intent in Redis for a worker lease to sweep) from dying with their
process. Each has a line in ``intents-<host>-<pid>-<random>.jsonl`` (flocked like the others), keyed
by its hold id (the gateway's own, unique): ``I`` when it is admitted (its reservation and the fields
of the ledger record it would get, as a Redis intent has), written through to the OS before the
upstream call; ``F`` when it finishes (its final record and settle, written through before the record
can reach any ledger write); ``W`` once that record is written to the ledger or its spool (marked per
ledger batch, :attr:`~gateway.state.ledger.BufferedLedger.on_stored`); ``S`` once its settle is applied
or spooled. fsync is batched (the state's flush, every 0.1 s): a SIGKILL loses nothing the OS has.
The file is emptied when nothing is in flight, and rewritten (atomically, by rename) with only the
live lines when it has grown past :data:`REWRITE_BYTES`. The process that adopts a dead file
(:meth:`IntentSpool.adopt`, at start) gets, in file order: for an intent with no ``F``, an
``interrupted`` record (estimated, no tokens, charged the request's worst case: the hold it would have
taken, which is also the most the unmetered request could spend, since its output was capped as for a
hold) and a settle at that cost; for an ``F`` with no ``W`` its final record, and with no ``S`` its
settle. Every record carries its hold id as ``hold_id``: stable, so one dead file always gives the
same batch, and a batch re-sent after the adopter itself died is a no-op for the ledger's batch marker;
on one Redis with worker leases that id also retires the hold's ``gw:v2:open`` intent if the reserve
did land before its reply was lost (a record the lease sweep already wrote for it is left out instead,
:mod:`gateway.state.ledger`). Settles replayed twice are applied once (the store's done marker). The
one gap is a SIGKILL between a ledger write returning and its ``W`` marks being written (no await in
between): that record is written twice.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson

from gateway.state.budgets import BudgetRule, RateRule, ReserveRequest, reserve_request_from_dict
from gateway.state.ledger import LedgerRecord, interrupted_record


def dead_files(directory: Path, pattern: str, own: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """The complete lines of each spool file in ``directory`` whose process died (its lock is free), oldest
    name first, never ``own``. The file stays locked while the caller stores its lines, and is removed
    once the caller asks for the next one; a file another process adopted first is passed over."""
    for path in sorted(directory.glob(pattern)):
        if path == own:
            continue
        try:
            with open(path, "rb") as fh:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue   # its process is alive
                if os.fstat(fh.fileno()).st_nlink == 0:
                    continue   # adopted by another process between our open and our lock
                yield path, [line for line in fh if line.endswith(b"\n")]
                path.unlink()
        except FileNotFoundError:
            continue           # another process adopted it first


log = logging.getLogger(__name__)


def _encode(batch: Sequence[LedgerRecord]) -> bytes:
    return b"[" + b",".join(r.to_json() for r in batch) + b"]\n"


def _decode(line: bytes) -> list[LedgerRecord]:
    return [LedgerRecord.from_dict(item) for item in orjson.loads(line)]


def own_file(directory: str | Path, kind: str) -> tuple[Path, Path, IO[bytes]]:
    """(the directory, the path, the open file) of this process's new ``<kind>-<host>-<pid>-<random>.jsonl`` in
    ``directory`` (made if missing), held open and locked for the life of the process: a file whose lock can be
    taken belongs to a process that is gone."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}-{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}.jsonl"
    fh: IO[bytes] = open(path, "a+b")   # noqa: SIM115 - held open (and locked) for life
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return folder, path, fh


class Spool:
    def __init__(self, directory: str | Path) -> None:
        self.dir, self.path, self._fh = own_file(directory, "spool")
        self._offset = 0          # the batches before it have been written to the ledger
        self._next_len = 0        # bytes of the line next_batch read last
        self.records = 0          # records spooled and not yet written

    def spill(self, batches: Sequence[Sequence[LedgerRecord]]) -> None:
        """Append ``batches`` (oldest first) durably."""
        if not batches:
            return
        self._fh.seek(0, os.SEEK_END)
        self._fh.write(b"".join(_encode(b) for b in batches))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.records += sum(len(b) for b in batches)

    def next_batch(self) -> list[LedgerRecord] | None:
        """The oldest batch not yet written, or None when the spool is empty."""
        self._fh.seek(self._offset)
        line = self._fh.readline()
        if not line.endswith(b"\n"):   # empty, or a torn last line (a crash mid-write): nothing more
            return None
        self._next_len = len(line)
        return _decode(line)

    def written(self, batch: Sequence[LedgerRecord]) -> None:
        """The batch :meth:`next_batch` returned is in the ledger: move on; truncate once all are."""
        self._offset += self._next_len
        self.records -= len(batch)
        if self._fh.seek(0, os.SEEK_END) <= self._offset:
            self._fh.truncate(0)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._offset, self.records = 0, 0

    def adopt(self) -> int:
        """Move the batches of dead processes' spool files into this one; returns how many records."""
        moved = 0
        for path, lines in dead_files(self.dir, "spool-*.jsonl", self.path):
            batches = [_decode(line) for line in lines]
            self.spill(batches)
            n = sum(len(b) for b in batches)
            moved += n
            if n:
                log.warning("adopted %d unwritten ledger records from %s", n, path.name)
        return moved

    def close(self) -> None:
        empty = self.records == 0
        self._fh.close()
        if empty:
            self.path.unlink(missing_ok=True)


Settle = tuple[ReserveRequest, int, int]   # the reservation, the actual cost (nano-USD) and tokens


def encode_settle(settle: Settle) -> bytes:
    req, cost, tokens = settle
    return orjson.dumps({"req": req, "cost": cost, "tokens": tokens}) + b"\n"


def decode_settle(line: bytes) -> Settle:
    data = orjson.loads(line)
    r = data["req"]
    req = ReserveRequest(r["request_id"], r["team"], r["cost_nano"], r["tokens"],
                         tuple(BudgetRule(**b) for b in r["budgets"]), tuple(RateRule(**x) for x in r["rates"]),
                         datetime.fromisoformat(r["now"]), r["min_cost_nano"], r["partial"])
    return req, int(data["cost"]), int(data["tokens"])


class SettleSpool:
    def __init__(self, directory: str | Path) -> None:
        self.dir, self.path, self._fh = own_file(directory, "settles")
        self.entries = 0
        self._dirty = False

    def add(self, settles: Sequence[Settle]) -> None:
        """Append settles; in the OS's hands when this returns (a killed process loses none)."""
        if settles:
            self._fh.seek(0, os.SEEK_END)
            self._fh.write(b"".join(encode_settle(s) for s in settles))
            self._fh.flush()
            self.entries += len(settles)
            self._dirty = True

    def rewrite(self, left: Sequence[Settle]) -> None:
        """The queue has drained down to ``left``: keep only those (durably)."""
        self._fh.truncate(0)
        self.entries = 0
        self.add(left)
        self.sync(force=True)

    def sync(self, force: bool = False) -> None:
        if self._dirty or force:
            os.fsync(self._fh.fileno())
            self._dirty = False

    def adopt(self) -> list[Settle]:
        """The settles of dead processes' files, moved into this one (oldest file first)."""
        adopted: list[Settle] = []
        for path, lines in dead_files(self.dir, "settles-*.jsonl", self.path):
            settles = [decode_settle(line) for line in lines]
            self.add(settles)
            self.sync()
            if settles:
                log.warning("adopted %d unapplied settles from %s", len(settles), path.name)
            adopted += settles
        return adopted

    def close(self) -> None:
        """Close; the file goes if nothing is left in it, else it waits for the next process."""
        empty = self.entries == 0
        if not empty:
            self.sync()
        self._fh.close()
        if empty:
            self.path.unlink(missing_ok=True)


REWRITE_BYTES = 4 * 1024 * 1024   # an intents file past this, mostly finished lines, is rewritten with the live ones


class _Finishing:
    """A finished unmetered request whose record or settle is not yet safe."""

    __slots__ = ("lines", "written", "settled")

    def __init__(self, lines: bytes, written: bool) -> None:
        self.lines = lines          # its I and F lines (kept for a rewrite)
        self.written = written      # its record reached the ledger or the ledger spool (or it has none)
        self.settled = False        # its settle was applied or spooled


def intent_records(lines: Sequence[bytes]) -> tuple[list[LedgerRecord], list[Settle]]:
    """What a dead process's intents file still owes, in file order: the records to write and the settles to
    replay (see the module docstring). The same lines always give the same records."""
    intents: dict[str, tuple[ReserveRequest, dict[str, Any]]] = {}
    finals: dict[str, tuple[int, int, dict[str, Any] | None]] = {}
    written: set[str] = set()
    settled: set[str] = set()
    for line in lines:
        kind, (raw_hold, _, payload) = line[:1], line[1:].rstrip(b"\n").partition(b" ")
        try:
            key = raw_hold.decode()
            if kind == b"I":
                data = orjson.loads(payload)
                intents[key] = (reserve_request_from_dict(data["q"]), data["r"])
            elif kind == b"F":
                data = orjson.loads(payload)
                finals[key] = (int(data["c"]), int(data["t"]), data["r"])
            elif kind == b"W":
                written.add(key)
            elif kind == b"S":
                settled.add(key)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("unreadable intent line skipped (%r): %r", exc, line[:200])
    records: list[LedgerRecord] = []
    settles: list[Settle] = []
    for hold, (req, fields) in intents.items():
        final = finals.get(hold)
        if final is None:   # it never finished: charged its worst case, recorded as interrupted
            record = interrupted_record(fields, hold, req.cost_nano)
            record.hold_id = hold
            records.append(record)
            settles.append((req, req.cost_nano, 0))
            continue
        cost, tokens, data = final
        if data is not None and hold not in written:
            records.append(LedgerRecord.from_dict(data))
        if hold not in settled:
            settles.append((req, cost, tokens))
    return records, settles


class IntentSpool:
    """This process's intents file: requests admitted unmetered, until their record and settle are safe."""

    def __init__(self, directory: str | Path) -> None:
        self.dir, self.path, self._fh = own_file(directory, "intents")
        self.open: dict[str, bytes] = {}   # hold id -> its I line: admitted, not finished
        self._finishing: dict[str, _Finishing] = {}
        self._size = 0
        self._dirty = False

    @property
    def live(self) -> int:
        """Requests whose intent is not done yet (in flight, or finished with their record or settle unsafe)."""
        return len(self.open) + len(self._finishing)

    def _append(self, data: bytes) -> None:
        self._fh.seek(0, os.SEEK_END)
        self._fh.write(data)
        self._fh.flush()   # in the OS's hands: a killed process loses none
        self._size += len(data)
        self._dirty = True

    def begin(self, req: ReserveRequest, fields: dict[str, Any]) -> None:
        """A request admitted unmetered: its reservation and its would-be record's ``fields``, before its upstream
        call."""
        line = b"I" + req.request_id.encode() + b" " + orjson.dumps({"q": req, "r": fields}) + b"\n"
        self._append(line)
        self.open[req.request_id] = line

    def finish(self, hold: str, record: LedgerRecord | None, cost_nano: int, tokens: int) -> None:
        """It finished: its final record (None: written elsewhere) and settle, before the record is queued."""
        line = b"F" + hold.encode() + b" " + orjson.dumps({"c": cost_nano, "t": tokens, "r": record}) + b"\n"
        self._append(line)
        self._finishing[hold] = _Finishing(self.open.pop(hold, b"") + line, record is None)

    def settled(self, hold: str) -> None:
        """Its settle was applied, or queued in the settle spool."""
        entry = self._finishing.get(hold)
        if entry is not None and not entry.settled:
            entry.settled = True
            self._append(b"S" + hold.encode() + b"\n")
            if entry.written:
                del self._finishing[hold]

    def stored(self, records: Sequence[LedgerRecord]) -> None:
        """``records`` were written to the ledger or its spool (the ledger's ``on_stored``); nothing to do, at
        the cost of one check, unless unmetered requests are finishing."""
        if not self._finishing:
            return
        marks = []
        for r in records:
            entry = self._finishing.get(r.hold_id) if r.hold_id else None
            if entry is not None and not entry.written:
                entry.written = True
                marks.append(b"W" + r.hold_id.encode() + b"\n")
                if entry.settled:
                    del self._finishing[r.hold_id]
        if marks:
            self._append(b"".join(marks))

    def sync(self) -> None:
        """The state's flush: empty the file when nothing is live, rewrite it when it grew large, else fsync."""
        if not self.live:
            if self._size:
                self._fh.truncate(0)
                os.fsync(self._fh.fileno())
                self._size, self._dirty = 0, False
            return
        if self._size > REWRITE_BYTES:
            data = self._lines()
            if len(data) * 4 < self._size:   # mostly done lines: keep the live ones only
                self._rewrite(data)
                return
        if self._dirty:
            os.fsync(self._fh.fileno())
            self._dirty = False

    def _lines(self) -> bytes:
        out = list(self.open.values())
        for hold, entry in self._finishing.items():
            out.append(entry.lines)
            if entry.written:
                out.append(b"W" + hold.encode() + b"\n")
            if entry.settled:
                out.append(b"S" + hold.encode() + b"\n")
        return b"".join(out)

    def _rewrite(self, data: bytes) -> None:
        """Only the live lines, ``data``, in a new file locked before it replaces this one (an adopter that opened
        the old one finds it unlinked and passes over it)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        fh: IO[bytes] = open(tmp, "w+b")   # noqa: SIM115 - becomes this spool's file
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._fh.close()
        self._fh, self._size, self._dirty = fh, len(data), False

    def adopt(self, keep: Callable[[list[LedgerRecord], list[Settle]], None]) -> int:
        """For each dead process's intents file (oldest first): what it still owes handed to ``keep``, which must
        store it durably before returning (the file is removed after); returns how many records."""
        n = 0
        for path, lines in dead_files(self.dir, "intents-*.jsonl", self.path):
            records, settles = intent_records(lines)
            if records or settles:
                keep(records, settles)
                interrupted = sum(r.status == "interrupted" for r in records)
                log.warning("adopted %s: %d requests admitted unmetered owed a record (%d interrupted), %d a "
                            "settle", path.name, len(records), interrupted, len(settles))
            n += len(records)
        return n

    def close(self) -> None:
        """Close; the file goes unless a request in it is still live (then the next process adopts it)."""
        live = self.live
        if live:
            log.error("closing with %d unmetered requests unfinished or unwritten: left for the next process", live)
            os.fsync(self._fh.fileno())
        self._fh.close()
        if not live:
            self.path.unlink(missing_ok=True)
