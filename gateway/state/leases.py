"""Worker leases on Redis (one server or a cluster): a dead worker's holds end within seconds, its requests
still reach the ledger.

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
unless it renewed its lease meanwhile.

On Redis Cluster the same guarantees hold, with the layout a cluster allows (a script sees one slot):

- an intent lives in the slot of the hold its reserve call takes: the open hash ``<tag>:open`` of that call's
  hash tag (the team's; for a request that also holds end-user, tag or session budgets, reserved slot by
  slot, the last call's, which has the final amount). Each process names an open hash in ``gw:v2:openidx``
  once, before its first intent there, so the sweep finds them all (bounded: :data:`MAX_OPEN_KEYS` hashes,
  :data:`MAX_SCAN` entries per sweep).
- a settle with a record settles that slot first, atomically against a sweep; a request holding several
  slots keeps its intent (and its cost) after its ``R`` record or its ``S`` interrupted record, and the sweep
  settles its other slots from there (each slot once, by its settled marker), so a worker or a sweeper
  dying half-way leaves nothing held.
- the lease key lives in a slot of its own, so reserves cannot renew it: a thread of each worker
  (:class:`LeaseRenewer`, its own connection) renews it every third of the lease, whatever the event loop
  is doing; only a dead (or cut off) process loses its lease.
- the ledger writes a record's open entry's slot in units (claim, parts, finalize: see
  :class:`~gateway.state.ledger.RedisLedger`); a dead writer's claimed units are written again, the
  same, by the sweep (:meth:`~gateway.state.ledger.RedisLedger.recover`), so no part is written twice.

Requests admitted unmetered while Redis was down have no
entry here; their intents wait in the spool (:class:`~gateway.state.spool.IntentSpool`), and their
records carry the hold id as an own claim, so a reserve that landed though its reply was lost is
recorded once: by that record (which retires the ``I`` entry) or by this sweep (the record is left out).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import orjson
from redis.exceptions import RedisError

from gateway.state.budgets import ReserveRequest, StateUnavailable, reserve_request_from_dict
from gateway.state.budgets_redis import (
    OPEN_INDEX,
    OPEN_KEY,
    PREFIX,
    SCRIPT,
    SCRIPT_SHA,
    SCRIPT_VERSION,
    WORKERS_KEY,
    RedisBudgetStore,
)
from gateway.state.ledger import SWEPT, LedgerRecord, RedisLedger, hold_ref, interrupted_record

log = logging.getLogger("gateway.state")
SWEEP_LOCK_S = 30        # a sweeper that dies mid-sweep leaves the dead worker to the next one after this
MAX_SCAN = 1_000_000     # open entries read per sweep, at most
MAX_OPEN_KEYS = 100_000  # a cluster's open hashes read per sweep, at most
TOMBSTONE_S = 86_400     # a record the sweep wrote stays marked this long (a dead worker's spool adopted late)
_ERRORS = (StateUnavailable, RedisError, OSError)


def new_worker_id() -> str:
    """A worker id unique across processes and machines sharing one Redis."""
    return f"{os.getpid()}-{os.urandom(6).hex()}"


def parse_entry(raw: bytes) -> tuple[str, str, int, bytes]:
    """(kind ``I``/``R``/``S``/``W``/``B``, worker (``B``: the batch's writer), held nano-USD (intents only,
    else 0), JSON (a tombstone: its server time, unix s; ``B``: see :func:`parse_claimed`)) of an open entry."""
    kind, rest = raw[:1].decode(), raw[1:]
    worker, _, tail = rest.partition(b" ")
    if kind == "I":
        held, _, tail = tail.partition(b" ")
        return kind, worker.decode(), int(held), tail
    return kind, worker.decode(), 0, tail


def split_record(tail: bytes) -> tuple[bytes, tuple[int, int, dict[str, Any]] | None]:
    """An ``R``/``S`` entry's record JSON and, on a cluster for a request holding several slots, (its cost, its
    tokens, its intent) to settle its other slots with (JSON has no raw newline)."""
    record, _, rest = tail.partition(b"\n")
    if not rest:
        return record, None
    cost, tokens, intent = rest.split(b" ", 2)
    return record, (int(cost), int(tokens), orjson.loads(intent))


def parse_claimed(tail: bytes) -> tuple[str, int, int, bytes]:
    """(batch, index, count, payload) of a ``B`` entry's tail (a cluster's ledger unit in progress)."""
    batch, index, count, _owner, payload = tail.split(b" ", 4)
    return batch.decode(), int(index), int(count), payload


class LeaseRenewer:
    """Renews a worker's lease from a thread of its own (Redis Cluster, where reserves cannot): every
    ``every_s``, with ``renew`` (a call on a connection of the thread's own), so a busy or blocked event loop
    never lets the lease of a live process run out."""

    def __init__(self, renew: Callable[[], object], every_s: float, close: Callable[[], object] | None = None) -> None:
        self.renew = renew
        self.every_s = every_s
        self.close = close
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gateway-lease", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                self.renew()
            except Exception as exc:   # Redis away: the next beat tries again
                log.warning("worker lease not renewed: %r", exc)
            if self._stop.wait(self.every_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self.close is not None:
            try:
                self.close()
            except Exception as exc:
                log.debug("lease connection not closed: %r", exc)


def cluster_renewer(store: RedisBudgetStore, url: str, timeout_s: float) -> LeaseRenewer:
    """The lease thread of ``store``'s worker on the cluster at ``url`` (its own synchronous client, made on its
    first beat)."""
    from redis.cluster import RedisCluster as SyncCluster
    from redis.exceptions import NoScriptError

    assert store.worker is not None
    clients: list[Any] = []
    args = ("lease", SCRIPT_VERSION, store.worker, store.lease_ms)

    def renew() -> object:
        if not clients:
            clients.append(SyncCluster.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s))
        try:
            return clients[0].evalsha(SCRIPT_SHA, 1, WORKERS_KEY, *args)
        except NoScriptError:
            return clients[0].eval(SCRIPT, 1, WORKERS_KEY, *args)

    def close() -> None:
        for client in clients:
            client.close()

    return LeaseRenewer(renew, store.lease_ms / 3000, close)


class Leases:
    """This worker's lease and the sweep of dead workers' open requests (one Redis, or a cluster with
    ``ledger``, its :class:`RedisLedger`, and ``renewer``, the lease's thread)."""

    def __init__(self, store: RedisBudgetStore, redis: Any, ledger: RedisLedger | None = None,
                 renewer: LeaseRenewer | None = None) -> None:
        assert store.worker is not None
        self.store = store
        self.redis = redis            # the general client: the sweep lock and HSCAN
        self.worker = store.worker
        self.every_s = store.lease_ms / 3000
        self.swept = 0                # intents this worker turned into interrupted records
        self.ledger = ledger          # a cluster: writes again the units a dead writer claimed
        self.renewer = renewer
        self.recovered = 0            # records of such units

    def start(self) -> None:
        if self.renewer is not None:
            self.renewer.start()

    def stop(self) -> None:
        if self.renewer is not None:
            self.renewer.stop()

    def hold_id(self, req: ReserveRequest) -> str:
        """The ``hold_id`` of ``req``'s ledger record (its open entry)."""
        return self.store.hold_id(req)

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

    async def _open_keys(self) -> list[str]:
        """The open hashes: :data:`OPEN_KEY`, or on a cluster the ones named in :data:`OPEN_INDEX`."""
        if not self.store.cluster:
            return [OPEN_KEY]
        keys: list[str] = []
        async for key in self.redis.sscan_iter(OPEN_INDEX, count=1000):
            keys.append(key.decode() if isinstance(key, bytes) else str(key))
            if len(keys) >= MAX_OPEN_KEYS:
                break
        return keys

    async def _entries(self, worker: str) -> list[tuple[str, bytes]]:
        """The open entries of ``worker``: (hold id, value); a hold id is a record's ``hold_id`` (on a cluster,
        its open hash and field)."""
        out: list[tuple[str, bytes]] = []
        seen = 0
        for key in await self._open_keys():
            async for field, value in self.redis.hscan_iter(key, count=1000):
                seen += 1
                if seen > MAX_SCAN:
                    return out
                if parse_entry(value)[1] == worker:
                    name = field.decode() if isinstance(field, bytes) else str(field)
                    out.append((hold_ref(key, name) if self.store.cluster else name, value))
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
            for hold_id in old:
                await self.redis.hdel(*self.store.open_of(hold_id))
            if len(old) == len(written):                   # none left: forget the worker
                await self.store.retire(worker)
            else:                                          # not taken for dead again until the next one is due
                await self.store.park(worker, min(at for at in written.values() if at > now - TOMBSTONE_S)
                                      + TOMBSTONE_S + 1)
            return []
        records: list[LedgerRecord] = []
        units: dict[str, dict[int, bytes]] = {}   # a cluster: units this (dead) writer claimed, by batch
        counts: dict[str, int] = {}
        for hold_id, value in entries:
            kind, _, held, raw = parse_entry(value)
            if kind in ("S", "R"):
                raw, rest = split_record(raw)
                if rest is not None:   # a cluster: the request's other slots, settled (once) at the same cost
                    cost, tokens, data = rest
                    await self.store.settle_rest(reserve_request_from_dict(data["q"]), cost, tokens)
            if kind == "S":          # swept or taken over before (by a sweeper since gone): still to write
                record = LedgerRecord.from_json(raw)
                record.hold_id = SWEPT + hold_id
                records.append(record)
            elif kind == "R":        # settled, its record unwritten: taken over (its worker's late batch is left out)
                if await self.store.claim(hold_id, worker) == 1:
                    record = LedgerRecord.from_json(raw)
                    record.hold_id = SWEPT + hold_id
                    records.append(record)
            elif kind == "B":        # a unit its ledger batch claimed: written again, the same, below
                batch, index, count, payload = parse_claimed(raw)
                units.setdefault(batch, {})[index] = payload
                counts[batch] = count
            elif kind == "I":
                data = orjson.loads(raw)
                req = reserve_request_from_dict(data["q"])
                record = interrupted_record(data["r"], hold_id, held)
                if await self.store.sweep(req, held, worker, record.to_json()) == 1:
                    self.swept += 1
                    records.append(record)
        recovered = 0
        for batch, payloads in units.items():
            if self.ledger is not None and len(payloads) == counts[batch]:   # (a unit is claimed all at once)
                recovered += await self.ledger.recover([payloads[i] for i in range(counts[batch])])
        self.recovered += recovered
        log.warning("worker %s died: %d of its requests recorded as interrupted, %d records written for it",
                    worker, sum(r.status == "interrupted" for r in records), len(records) + recovered)
        return records

    async def close(self) -> None:
        """A clean shutdown: forget this worker when nothing of it is left open (else its lease lapses and a
        live worker sweeps what is)."""
        self.stop()
        try:
            if not [v for _, v in await self._entries(self.worker) if v[:1] != b"W"]:
                await self.store.retire(self.worker, force=True)
        except _ERRORS as exc:
            log.warning("worker lease not released: %r", exc)

