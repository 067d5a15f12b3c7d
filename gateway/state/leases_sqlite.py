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
record each request once. A dead process cannot settle, and a live one is never taken for dead (a
stalled worker keeps its holds, unlike a Redis lease), so a request is either settled by its worker
or swept, never both. Settled requests need nothing here: on SQLite a request's record is committed
with its settle. Where the owner cannot be judged (no ``/proc``, or another PID namespace or machine
sharing the file) no owner is written or judged, and a hold whose process died lapses after
``GATEWAY_RESERVATION_TTL_S`` as before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from pathlib import Path

import orjson

from gateway.state.budgets_sqlite import SqliteBudgetStore
from gateway.state.ledger import interrupted_record
from gateway.state.ledger_sqlite import SqliteLedger

log = logging.getLogger("gateway.state")
SWEEP_EVERY_S = 2.0


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
                 proc: Path = Path("/proc")) -> None:
        self.store = store
        self.ledger = ledger
        self.every_s = every_s
        self.proc = proc
        self.tag = namespace_tag(proc)
        self.swept = 0      # requests this process recorded as interrupted

    def dead(self) -> list[str]:
        """The owners of holds whose process is gone."""
        return [w for w in self.store.owners() if w != self.store.worker and is_dead(w, self.tag, self.proc)]

    def keep(self) -> int:
        """Sweep the dead processes' holds (one transaction, with whatever else is queued on the connection);
        how many requests were recorded as interrupted. A database error leaves them for the next round."""
        dead: list[str] = []
        try:
            dead = self.dead()
            if not dead:
                return 0
            with self.store.group.transaction() as c:
                taken = self.store.take(c, dead)
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
        log.warning("worker processes %s died: %d of their requests recorded as interrupted", dead, len(records))
        return len(records)
