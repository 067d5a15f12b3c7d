"""Worker leases on one Redis: a dead worker's holds end within seconds and its requests still reach the ledger.

Each worker holds a short lease (``GATEWAY_WORKER_LEASE_S``, 10 s by default) in ``gw:v2:workers``,
renewed by every reserve call and by :meth:`Leases.keep` every third of the lease. The reserve call
of an admitted request also writes its intent into ``gw:v2:open`` (hold id -> the reservation and
the ledger record it would get), in the same script call as the hold; its settle call replaces the
intent by the final record, which stays there until the ledger batch writing it lands (that batch
removes it, :class:`~gateway.state.ledger.RedisLedger`). So when a worker dies (SIGKILL, OOM, a
lost machine), everything its ledger and budget still owed is in Redis. :meth:`Leases.keep` (run by
every live worker's state task, on any replica) renews this worker's lease, learns the workers whose
lease ran out, and sweeps each of them under a lock (``gw:v2:sweep:<worker>``, so one worker does it):
every open intent is settled at its full hold (the worst case the budget admitted, never more) and
becomes a ledger record with status ``interrupted`` and ``estimated`` set; every settled request's
unwritten record is taken over (marked swept) and written as it was. The sweep's batch and the dead
worker's own (a worker that was only stalled) check the same entry atomically, so each record is
written once; a swept record leaves a tombstone for a day (so a dead worker's spool, adopted by a
later process, cannot write it again either); the worker is forgotten once nothing of it is left,
unless it renewed its lease meanwhile. Requests admitted unmetered while Redis was down have no
entry here; their intents wait in the spool (:class:`~gateway.state.spool.IntentSpool`), and their
records carry the hold id as an own claim, so a reserve that landed though its reply was lost is
recorded once: by that record (which retires the ``I`` entry) or by this sweep (the record is left out).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import orjson
from redis.exceptions import RedisError

from gateway.state.budgets import ReserveRequest, StateUnavailable, reserve_request_from_dict
from gateway.state.budgets_redis import OPEN_KEY, PREFIX, SCRIPT_VERSION, RedisBudgetStore
from gateway.state.ledger import SWEPT, LedgerRecord, interrupted_record

log = logging.getLogger("gateway.state")
SWEEP_LOCK_S = 30        # a sweeper that dies mid-sweep leaves the dead worker to the next one after this
MAX_SCAN = 1_000_000     # open entries read per sweep, at most
TOMBSTONE_S = 86_400     # a record the sweep wrote stays marked this long (a dead worker's spool adopted late)
_ERRORS = (StateUnavailable, RedisError, OSError)


def new_worker_id() -> str:
    """A worker id unique across processes and machines sharing one Redis."""
    return f"{os.getpid()}-{os.urandom(6).hex()}"


def parse_entry(raw: bytes) -> tuple[str, str, int, bytes]:
    """(kind ``I``/``R``/``S``/``W``, worker, held nano-USD (intents only, else 0), JSON (a tombstone: its
    server time, unix s)) of a ``gw:v2:open`` value."""
    kind, rest = raw[:1].decode(), raw[1:]
    worker, _, tail = rest.partition(b" ")
    if kind == "I":
        held, _, tail = tail.partition(b" ")
        return kind, worker.decode(), int(held), tail
    return kind, worker.decode(), 0, tail


class Leases:
    """This worker's lease and the sweep of dead workers' open requests (one Redis, not a cluster)."""

    def __init__(self, store: RedisBudgetStore, redis: Any) -> None:
        assert store.worker is not None
        self.store = store
        self.redis = redis            # the general client: the sweep lock and HSCAN
        self.worker = store.worker
        self.every_s = store.lease_ms / 3000
        self.swept = 0                # intents this worker turned into interrupted records

    @staticmethod
    def intent(req: ReserveRequest, record: dict[str, Any]) -> bytes:
        """What the reserve call stores with the hold: the reservation (to settle it) and the fields of the
        record to write (:class:`LedgerRecord`'s, the others keep their defaults)."""
        return orjson.dumps({"q": req, "r": record})

    async def keep(self) -> list[LedgerRecord]:
        """Renew this worker's lease and sweep the workers whose lease ran out; the records to write."""
        try:
            dead = [w for w in await self.store.lease() if w != self.worker]
        except StateUnavailable as exc:
            log.warning("worker lease not renewed: %s", exc)
            return []
        records: list[LedgerRecord] = []
        for worker in dead:
            try:
                records += await self.sweep(worker)
            except _ERRORS as exc:
                log.warning("sweep of dead worker %s failed, retried later: %r", worker, exc)
        return records

    async def _entries(self, worker: str) -> list[tuple[str, bytes]]:
        """The open entries of ``worker``: (hold id, value)."""
        out: list[tuple[str, bytes]] = []
        seen = 0
        async for field, value in self.redis.hscan_iter(OPEN_KEY, count=1000):
            seen += 1
            if seen > MAX_SCAN:
                break
            if parse_entry(value)[1] == worker:
                out.append((field.decode() if isinstance(field, bytes) else str(field), value))
        return out

    async def sweep(self, worker: str) -> list[LedgerRecord]:
        """Under the worker's sweep lock: settle each open intent at its hold and collect every record
        still to write; forget the worker once nothing of it is left."""
        lock = f"{PREFIX}:{SCRIPT_VERSION}:sweep:{worker}"
        if not await self.redis.set(lock, self.worker, nx=True, px=SWEEP_LOCK_S * 1000):
            return []
        entries = await self._entries(worker)
        if all(value[:1] == b"W" for _, value in entries):   # nothing left to write, only tombstones
            now = int((await self.redis.time())[0])
            written = {hold_id: int(parse_entry(value)[3] or 0) for hold_id, value in entries}
            old = [hold_id for hold_id, at in written.items() if at <= now - TOMBSTONE_S]
            if old:
                await self.redis.hdel(OPEN_KEY, *old)
            if len(old) == len(written):                   # none left: forget the worker
                await self.store.retire(worker)
            else:                                          # not taken for dead again until the next one is due
                await self.store.park(worker, min(at for at in written.values() if at > now - TOMBSTONE_S)
                                      + TOMBSTONE_S + 1)
            return []
        records: list[LedgerRecord] = []
        for hold_id, value in entries:
            kind, _, held, raw = parse_entry(value)
            if kind == "S":          # swept or taken over before (by a sweeper since gone): still to write
                record = LedgerRecord.from_json(raw)
                record.hold_id = SWEPT + hold_id
                records.append(record)
            elif kind == "R":        # settled, its record unwritten: taken over (its worker's late batch is left out)
                if await self.store.claim(hold_id, worker) == 1:
                    record = LedgerRecord.from_json(raw)
                    record.hold_id = SWEPT + hold_id
                    records.append(record)
            elif kind == "I":
                data = orjson.loads(raw)
                req = reserve_request_from_dict(data["q"])
                record = interrupted_record(data["r"], hold_id, held)
                if await self.store.sweep(req, held, worker, record.to_json()) == 1:
                    self.swept += 1
                    records.append(record)
        log.warning("worker %s died: %d of its requests recorded as interrupted, %d records written for it",
                    worker, sum(r.status == "interrupted" for r in records), len(records))
        return records

    async def close(self) -> None:
        """A clean shutdown: forget this worker when nothing of it is left open (else its lease lapses and a
        live worker sweeps what is)."""
        try:
            if not [v for _, v in await self._entries(self.worker) if v[:1] != b"W"]:
                await self.store.retire(self.worker, force=True)
        except _ERRORS as exc:
            log.warning("worker lease not released: %r", exc)

