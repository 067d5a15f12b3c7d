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
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO

import orjson

from gateway.state.budgets import BudgetRule, RateRule, ReserveRequest
from gateway.state.ledger import LedgerRecord


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


class Spool:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"spool-{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}.jsonl"
        self.path = self.dir / name
        self._fh: IO[bytes] = open(self.path, "a+b")   # noqa: SIM115 - held open (and locked) for life
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
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
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"settles-{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}.jsonl"
        self._fh: IO[bytes] = open(self.path, "a+b")   # noqa: SIM115 - held open (and locked) for life
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
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
