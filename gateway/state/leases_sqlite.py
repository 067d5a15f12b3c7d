"""Worker leases on the embedded SQLite state: a dead worker's holds end within seconds, as ``interrupted`` records.

Every worker of a machine shares ``gateway.db``, so a worker's lease is its process itself: the hold a
reserve takes with an intent names the process that took it (:func:`process_id`: the PID, the process's
start time in clock ticks since boot, and a tag of the boot and PID namespace) and keeps the intent (the
fields of the ledger record the request gets if its process dies), in the reserve's own INSERT, so it
costs no transaction. :meth:`SqliteLeases.keep`, run by every live worker's state task every
``every_s`` (2 s), reads the owners of the holds (a small table: requests in flight only) and finds
the dead ones: same boot and PID namespace, and no process of that PID with that start time alive (a
zombie counts as dead; a reused PID has another start time). One ``BEGIN IMMEDIATE`` transaction then
deletes their holds, charges each its whole hold (the worst case its budgets admitted, never more) and
writes its ledger record: status ``interrupted``, ``estimated`` set, the hold as cost, ``hold_id``
``swept:<hold>``. Only the transaction that deletes a row gets it, so two workers sweeping at once
record each request once. Within one boot and PID namespace a dead process cannot settle, and a live
one is never taken for dead (a stalled worker keeps its holds, unlike a Redis lease), so a request is
either settled by its worker or swept, never both. Settled requests need nothing here: on SQLite a
request's record is committed with its settle.

Processes in another PID namespace or on another host sharing the file cannot be judged by PID, so
every serving process also keeps a heartbeat row (``worker_heartbeats``: its process id -> the unix
time of its wall clock when it last wrote it), upserted by :meth:`SqliteLeases.keep` in one small
transaction every ``every_s`` (nothing per request) and deleted by :meth:`SqliteLeases.close` at a
clean shutdown. A hold whose owner is in another namespace is swept, by the same transaction and the
same ``interrupted`` record as above, once its owner's heartbeat is older than ``stale_s``
(``max(10 s, 5 x every_s)``: five missed beats), judged again inside that transaction so a beat
that lands meanwhile keeps the holds. An owner with no heartbeat row (a gateway from before schema
v5, or one that has not beaten yet) is not judged: its holds lapse after
``GATEWAY_RESERVATION_TTL_S`` as before, as do holds with no owner at all (no ``/proc``). The
hosts' wall clocks must agree to well within ``stale_s``. Unlike the PID judgement, a heartbeat can
be missed by a process that is alive but whose event loop stalled for ``stale_s`` (or whose host
was cut off from the file): its holds are then swept and charged in full, and its own settle, if it
comes later, is charged and recorded as well, so keep ``every_s`` well below any stall you expect.
Owners in this process's own namespace keep the PID judgement alone, whatever their heartbeat says.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from gateway.state.budgets_sqlite import SqliteBudgetStore
from gateway.state.ledger import interrupted_record
from gateway.state.ledger_sqlite import SqliteLedger

log = logging.getLogger("gateway.state")
SWEEP_EVERY_S = 2.0
MIN_STALE_S = 10.0          # a foreign owner's heartbeat older than max(this, 5 x every_s): taken for dead
FORGET_HEARTBEAT_S = 86_400  # a heartbeat row this old (a process killed with no holds) is dropped


def start_time(pid: int, proc: Path = Path("/proc")) -> str | None:
    """The start time (clock ticks since boot, field 22 of ``/proc/<pid>/stat``) of a live process, None if
    there is none (or only a zombie)."""
    try:
        stat = (proc / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    fields = stat.rsplit(b")", 1)[-1].split()   # after the command name, which may hold spaces and ")"
    if len(fields) < 20 or fields[0] in (b"Z", b"X", b"x"):
        return None
    return fields[19].decode()


def namespace_tag(proc: Path = Path("/proc")) -> str | None:
    """A tag of this boot and PID namespace: processes with the same tag see each other's PIDs. None
    without ``/proc``."""
    try:
        boot = (proc / "sys/kernel/random/boot_id").read_bytes().strip()
        ns = os.readlink(proc / "self/ns/pid").encode()
    except OSError:
        return None
    return hashlib.sha256(boot + b"|" + ns).hexdigest()[:12]


def process_id(pid: int | None = None, proc: Path = Path("/proc")) -> str:
    """``<namespace tag>:<pid>:<start time>`` of a process (this one by default), or "" where it cannot be
    told (then its holds carry no owner and lapse with the TTL)."""
    pid = os.getpid() if pid is None else pid
    tag, started = namespace_tag(proc), start_time(pid, proc)
    if tag is None or started is None:
        return ""
    return f"{tag}:{pid}:{started}"


def is_dead(worker: str, tag: str | None, proc: Path = Path("/proc")) -> bool:
    """Whether the process ``worker`` (a :func:`process_id`) is gone; False when it cannot be told from here."""
    parts = worker.split(":")
    if tag is None or len(parts) != 3 or parts[0] != tag or not parts[1].isdigit():
        return False
    return start_time(int(parts[1]), proc) != parts[2]


class SqliteLeases:
    """Sweeps the holds of dead worker processes into ``interrupted`` records (see the module docstring)."""

    def __init__(self, store: SqliteBudgetStore, ledger: SqliteLedger, every_s: float = SWEEP_EVERY_S,
                 proc: Path = Path("/proc"), clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.ledger = ledger
        self.every_s = every_s
        self.stale_s = max(MIN_STALE_S, 5 * every_s)
        self.proc = proc
        self.clock = clock          # wall clock, unix s: heartbeats are compared across hosts
        self.tag = namespace_tag(proc)
        self.swept = 0      # requests this process recorded as interrupted
        self._forgot = False        # old heartbeat rows dropped (once per process)

    def foreign(self, worker: str) -> bool:
        """Whether ``worker`` lives in another boot or PID namespace (or host): judged by its heartbeat."""
        return worker.split(":", 1)[0] != self.tag

    def dead(self) -> list[str]:
        """The owners of holds whose process is gone: by PID in this namespace, by a stale heartbeat in another."""
        owners = [w for w in self.store.owners() if w != self.store.worker]
        dead = [w for w in owners if not self.foreign(w) and is_dead(w, self.tag, self.proc)]
        foreign = [w for w in owners if self.foreign(w)]
        return dead + (self.stale(self.store.conn, foreign) if foreign else [])

    def stale(self, c: sqlite3.Connection, workers: list[str]) -> list[str]:
        """Those of ``workers`` whose heartbeat is older than ``stale_s`` (one with no row is not judged)."""
        marks = ",".join("?" * len(workers))
        rows = c.execute(f"SELECT worker FROM worker_heartbeats WHERE worker IN ({marks}) AND at < ?",
                         (*workers, self.clock() - self.stale_s)).fetchall()
        return [str(w) for (w,) in rows]

    def beat(self) -> None:
        """Write this process's heartbeat (one statement, in a transaction with whatever else is queued)."""
        with self.store.group.transaction() as c:
            c.execute("INSERT INTO worker_heartbeats (worker, at) VALUES (?, ?) "
                      "ON CONFLICT (worker) DO UPDATE SET at = excluded.at", (self.store.worker, self.clock()))
            if not self._forgot:
                c.execute("DELETE FROM worker_heartbeats WHERE at < ?", (self.clock() - FORGET_HEARTBEAT_S,))
                self._forgot = True

    def keep(self) -> int:
        """Beat, then sweep the dead processes' holds (one transaction, with whatever else is queued on the
        connection); how many requests were recorded as interrupted. A database error leaves them for the
        next round."""
        dead: list[str] = []
        try:
            self.beat()
            dead = self.dead()
            if not dead:
                return 0
            with self.store.group.transaction() as c:
                foreign = [w for w in dead if self.foreign(w)]
                if foreign:   # judged again under the write lock: a beat that landed meanwhile keeps its holds
                    fresh = set(foreign) - set(self.stale(c, foreign))
                    dead = [w for w in dead if w not in fresh]
                taken = self.store.take(c, dead)
                c.executemany("DELETE FROM worker_heartbeats WHERE worker = ?", [(w,) for w in dead])
                records = []
                for hold_id, amount, intent in taken:
                    if intent:
                        records.append(interrupted_record(orjson.loads(intent), hold_id, amount))
                    else:   # no intent to record: never charged without a record (the ledger stays the spend)
                        log.error("hold %s of a dead worker had no intent; %d nano-USD charged unrecorded",
                                  hold_id, amount)
                self.ledger.store(c, records)
        except sqlite3.Error as exc:
            log.warning("sweep of dead workers %s failed, retried later: %r", dead, exc)
            return 0
        self.swept += len(records)
        if records:
            log.warning("worker processes %s died: %d of their requests recorded as interrupted", dead, len(records))
        return len(records)

    def close(self) -> None:
        """A clean shutdown: this process's heartbeat row goes (its holds are settled by now)."""
        try:
            with self.store.group.transaction() as c:
                c.execute("DELETE FROM worker_heartbeats WHERE worker = ?", (self.store.worker,))
        except sqlite3.Error as exc:
            log.warning("heartbeat of %s not removed: %r", self.store.worker, exc)
