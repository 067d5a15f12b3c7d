"""Shared state: virtual keys, budgets and the spend ledger, in SQLite, in memory or in Redis.

:func:`open_state` builds a :class:`State` from the settings: without ``GATEWAY_REDIS_URL``, the
embedded stores in a SQLite database in ``GATEWAY_DATA_DIR`` (shared by every worker on the
machine, kept across restarts; :mod:`gateway.state.sqlite_db`) or, with ``GATEWAY_DATA_DIR=:memory:``,
in this process's memory; with it, Redis (single node or Redis Cluster). On SQLite, the reserves,
settles and ledger records of one event-loop iteration are committed together at its end (group
commit), so a request's record is on disk right after its response was written, without a
transaction per request. ``State`` also owns the writes that must never be lost
but need not delay a response: ledger records are batched and written by a
background task, and a settle that Redis could not take (fail mode ``allow``) is
queued and replayed when Redis answers again. Either queue survives a Redis outage
in memory (ledger records and settles on local disk with ``GATEWAY_SPOOL_DIR``, where a crash
loses nothing either: the next process adopts and replays them) and is drained at shutdown; an
empty spool file is removed then. With the spool, a request admitted unmetered (the store down in
fail mode ``allow``) also keeps its intent in this process's intents file until its record and settle
are safe (:class:`~gateway.state.spool.IntentSpool`; nothing is written there while Redis answers),
and the process adopting a dead one's file writes an ``interrupted`` record for each it never finished.
``State`` also keeps the holds of requests still
running and renews those older than a third of the reservation TTL (a long stream), so a
hold lapses only when its replica is gone, not while its request is alive. On Redis (one
server or a cluster) it also keeps this worker's lease (:mod:`gateway.state.leases`): the reserve call
writes the request's intent with its hold (on a cluster, in the slot of that hold), the settle call
keeps the final record in Redis until the batch writing it lands, and every live worker sweeps the
workers whose lease ran out, so a dead worker's holds end within seconds and none of its requests is
left without a ledger record. On SQLite the worker's
process is its lease (:mod:`gateway.state.leases_sqlite`): the reserve writes the intent with the
hold, and every live worker sweeps the holds of dead processes (judged by PID in its own PID
namespace, by a stale heartbeat row in another namespace or on another host) into ``interrupted`` records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.background import cancel
from gateway.settings import MEMORY, Settings
from gateway.state.budgets import Admission, BudgetStore, ReserveRequest, StateUnavailable
from gateway.state.budgets_memory import MemoryBudgetStore
from gateway.state.keys import CachedKeys, KeyStore, MemoryKeyStore
from gateway.state.ledger import BufferedLedger, LedgerRecord, MemoryLedger
from gateway.state.ledger_archive import buffered, stream_maxlen
from gateway.state.spool import IntentSpool, Settle, SettleSpool, Spool

if TYPE_CHECKING:
    from gateway.state.leases import Leases
    from gateway.state.leases_sqlite import SqliteLeases
    from gateway.state.sqlite_db import Checkpointer, GroupCommit

log = logging.getLogger("gateway.state")
FLUSH_EVERY_S = 0.1
MAX_QUEUED_SETTLES = 1_000_000
MAX_REDIS_CONNECTIONS = 256    # per process, for keys, ledger, cache and admin (the budget script has its own)
MAX_HOLD_S = 6 * 3600          # a request still unsettled after this is taken as stuck: its hold is let lapse


@dataclass
class State:
    budgets: BudgetStore
    key_store: KeyStore
    keys: CachedKeys
    ledger: BufferedLedger
    fail_open: bool                       # fail mode "allow": admit while Redis is down, reconcile later
    redis: Any | None = None              # the shared client, None on embedded state
    hold_ttl_s: float = 900.0             # the stores' reservation TTL: a hold not renewed lapses after it
    _holds: dict[str, tuple[ReserveRequest, float, float]] = field(default_factory=dict)  # id -> (req, taken, renewed)
    _next_renewal: float = 0.0
    _records: list[LedgerRecord] = field(default_factory=list)
    _settles: deque[tuple[ReserveRequest, int, int]] = field(default_factory=deque)
    db: sqlite3.Connection | None = None  # the embedded database, None in memory or on Redis
    group: GroupCommit | None = None      # its group commit: settles and records wait there, not in _records
    queue_record: Callable[[LedgerRecord], None] | None = None
    settle_spool: SettleSpool | None = None   # GATEWAY_SPOOL_DIR: queued settles also wait on disk
    checkpointer: Checkpointer | None = None  # SQLite: WAL checkpoints in a thread, off the event loop
    _task: asyncio.Task[None] | None = None
    notifier: Any = None                  # budget notifications (gateway.budgets.notify.Notifier), told of settles
    leases: Leases | None = None          # Redis: this worker's lease, intents, the sweep of dead workers
    _next_lease: float = 0.0
    process_leases: SqliteLeases | None = None   # SQLite: intents with the holds, the sweep of dead processes
    intents: IntentSpool | None = None    # GATEWAY_SPOOL_DIR on Redis: intents of requests admitted unmetered

    @property
    def records_with_settle(self) -> bool:
        """Whether a request's ledger record goes to the store with its settle (SQLite's group commit, a
        worker lease's open entry), so a crash right after the response cannot lose it."""
        return self.group is not None or self.leases is not None

    @property
    def shared(self) -> bool:
        return self.redis is not None

    @property
    def backend(self) -> str:
        """Where the state lives: ``redis``, ``sqlite`` or ``memory``."""
        return "redis" if self.redis is not None else "sqlite" if self.db is not None else "memory"

    def record(self, record: LedgerRecord) -> None:
        """Queue one ledger record; the background writer stores it within ``FLUSH_EVERY_S`` (SQLite: the
        group commit, within 10 ms)."""
        if self.queue_record is not None:
            self.queue_record(record)
        else:
            self._records.append(record)

    async def finish(self, req: ReserveRequest | None, cost_nano: int, tokens: int,
                     record: LedgerRecord | None) -> None:
        """Settle a request (``req``: its reservation, None if it reserved nothing) and record it. On
        SQLite both are in the same group commit and on disk when this returns, before the response;
        elsewhere the same as :meth:`settle` then :meth:`record`."""
        if self.leases is not None and req is not None and record is not None and req.request_id in self._holds:
            # the record waits in Redis with the settle until its batch lands; queued after the settle, so the
            # batch cannot land first. Not settled now: the request was swept (taken for a dead worker's), and
            # its interrupted record is the one the ledger gets.
            record.hold_id = self.leases.hold_id(req)
            try:
                settled = await self.settle(req, cost_nano, tokens, record)
            except BaseException:
                self.record(record)   # the caller falls back to settling the hold; the record is still written
                raise
            if settled:
                self.record(record)
            else:
                log.error("request %s was swept as interrupted before it finished: its record is not written",
                          record.request_id)
            return
        intents = self.intents
        if intents is not None and intents.open and req is not None and req.request_id in intents.open:
            await self._finish_unmetered(intents, req, cost_nano, tokens, record)
            return
        if record is not None:
            self.record(record)   # queued first: the settle's commit carries it
        if req is not None:
            await self.settle(req, cost_nano, tokens)
        if self.group is not None and self.group.queued:
            try:
                await self.group.wait()
            except sqlite3.Error as exc:   # still queued: the background writer retries
                log.warning("ledger record of %s waits for the database: %r", getattr(record, "request_id", "?"),
                            exc)

    async def _finish_unmetered(self, intents: IntentSpool, req: ReserveRequest, cost_nano: int, tokens: int,
                                record: LedgerRecord | None) -> None:
        """:meth:`finish` for a request admitted unmetered with its intent in the spool: the final record and
        settle go to the intents file first, then the record is queued and the request settled; its intent is
        done once both are safe (:class:`~gateway.state.spool.IntentSpool`)."""
        hold = req.request_id
        if record is not None:   # its identity (also retires an intent its lost reserve left in Redis)
            record.hold_id = self.leases.hold_id(req) if self.leases is not None else hold
        intents.finish(hold, record, cost_nano, tokens)
        if record is not None:
            self.record(record)
        try:
            await self.settle(req, cost_nano, tokens)
        finally:
            intents.settled(hold)

    async def reserve(self, req: ReserveRequest, intent: Callable[[], dict[str, Any]] | None = None) -> Admission:
        """Reserve through the budget store and keep an admitted hold alive until it is settled. With a worker
        lease, ``intent()`` (the ledger record's fields the request gets if this worker dies) is stored with
        the hold. When the store is down in fail mode ``allow`` (the caller admits the request unmetered), with
        a spool the intent goes to this process's intents file before StateUnavailable is raised."""
        try:
            if self.leases is not None and intent is not None:
                admission = await self.leases.store.reserve(req, self.leases.intent(req, intent()))
            elif self.process_leases is not None and intent is not None:
                admission = await self.process_leases.store.reserve(req, intent)   # made only if it has limits
            else:
                admission = await self.budgets.reserve(req)
        except StateUnavailable:
            if self.intents is not None and self.fail_open and intent is not None:
                self.intents.begin(req, intent())
            raise
        if admission.admitted:
            now = time.monotonic()
            self._holds[req.request_id] = (req, now, now)
        return admission

    async def settle(self, req: ReserveRequest, cost_nano: int, tokens: int,
                     record: LedgerRecord | None = None) -> bool:
        """Settle now; if the store is down, queue the settle and replay it when it returns. False only when the
        store says the request was settled already. ``record``: see :meth:`finish` (worker leases)."""
        self._holds.pop(req.request_id, None)
        try:
            settled: bool | None
            if record is not None and self.leases is not None:
                settled = await self.leases.store.settle(req, cost_nano, tokens, record.to_json())
            else:
                settled = await self.budgets.settle(req, cost_nano, tokens)
            if self.notifier is not None and req.budgets:
                self.notifier.touched(req)
            return settled is not False
        except StateUnavailable as exc:
            log.warning("settle of %s queued, budget store down: %s", req.request_id, exc)
            if len(self._settles) < MAX_QUEUED_SETTLES or self.settle_spool is not None:
                self._settles.append((req, cost_nano, tokens))
                if self.settle_spool is not None:
                    self.settle_spool.add([(req, cost_nano, tokens)])
            else:
                log.error("settle queue full: dropped %s (cost %d nano)", req.request_id, cost_nano)
            return True

    @property
    def pending(self) -> int:
        """Records and settles not yet written to the store."""
        queued = self.group.queued if self.group is not None else 0
        return len(self._records) + self.ledger.pending + len(self._settles) + queued

    async def flush(self, wait: bool = False) -> None:
        """Write queued ledger records and replay queued settles (oldest first) as far as the store allows;
        ``wait``: also wait for a ledger write already in progress (see :meth:`BufferedLedger.flush`)."""
        if self._records:
            batch, self._records = self._records, []
            await self.ledger.append(batch)
        await self.ledger.flush(wait)
        if self.group is not None:
            try:
                self.group.commit()
            except sqlite3.Error as exc:
                log.warning("state database busy, %d writes wait: %r", self.group.queued, exc)
        replayed = 0
        while self._settles:
            req, cost, tokens = self._settles[0]
            try:
                await self.budgets.settle(req, cost, tokens)
            except StateUnavailable:
                break
            self._settles.popleft()
            replayed += 1
            if self.notifier is not None and req.budgets:
                self.notifier.touched(req)
        if self.settle_spool is not None:
            if replayed:
                self.settle_spool.rewrite(self._settles)   # what is left, durably
            else:
                self.settle_spool.sync()                   # the settles queued since the last flush
        if self.intents is not None:
            self.intents.sync()

    def adopted(self, records: list[LedgerRecord], settles: list[Settle]) -> None:
        """What a dead process's intents file owed (:meth:`IntentSpool.adopt`), stored durably: the records as one
        batch in the ledger spool (the same file always gives the same batch: a re-adoption is deduplicated by
        its marker), the settles in the settle spool and the queue."""
        if records:
            if self.ledger.spool is not None:
                self.ledger.spool.spill([records])
            else:
                for record in records:
                    self.record(record)
        if settles:
            self._settles.extend(settles)
            if self.settle_spool is not None:
                self.settle_spool.add(settles)
                self.settle_spool.sync()

    async def renew_holds(self) -> int:
        """Renew every live hold last renewed a third of the TTL ago; returns how many were renewed."""
        now = time.monotonic()
        due = [(rid, req, taken) for rid, (req, taken, renewed) in self._holds.items()
               if now - renewed >= self.hold_ttl_s / 3]
        renewed = 0
        for rid, req, taken in due:
            if now - taken > MAX_HOLD_S:
                log.error("request hold %s unsettled after %ds: no longer renewed", rid, MAX_HOLD_S)
                self._holds.pop(rid, None)
                continue
            try:
                alive = await self.budgets.renew(req)
            except StateUnavailable as exc:
                log.warning("could not renew hold %s: %s", rid, exc)
                continue
            if rid in self._holds:   # not settled meanwhile
                if alive:
                    self._holds[rid] = (req, taken, now)
                    renewed += 1
                else:
                    self._holds.pop(rid, None)
        return renewed

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            try:
                await self.flush()
                if self.leases is not None and time.monotonic() >= self._next_lease:
                    self._next_lease = time.monotonic() + self.leases.every_s
                    for record in await self.leases.keep():   # a dead worker's records, written by this one
                        self.record(record)
                if self.process_leases is not None and time.monotonic() >= self._next_lease:
                    self._next_lease = time.monotonic() + self.process_leases.every_s
                    self.process_leases.keep()   # a dead process's holds, charged and recorded in one transaction
                if self._holds and time.monotonic() >= self._next_renewal:
                    self._next_renewal = time.monotonic() + min(self.hold_ttl_s / 6, 60.0)
                    await self.renew_holds()
            except Exception:  # the writer must outlive any one failure
                log.exception("state flush failed")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
            if self.leases is not None:
                self.leases.start()   # a cluster: the lease's own thread

    async def ping(self) -> bool:
        return await self.budgets.ping()

    async def aclose(self) -> None:
        await cancel(self._task)
        self._task = None
        if self.leases is not None:
            self.leases.stop()
        with contextlib.suppress(Exception):
            await self.flush()
        if self.pending:
            log.error("shutting down with %d ledger records or settles unwritten", self.pending)
        elif self.leases is not None:
            await self.leases.close()
        if self.process_leases is not None and not self.pending and not self._holds:
            self.process_leases.close()   # its heartbeat row goes (else holds left are judged by it)
        for spool in (self.ledger.spool, self.settle_spool, self.intents):   # removed when empty, else left
            if spool is not None:                                             # for the next process
                spool.close()
        await self.budgets.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        if self.checkpointer is not None:
            self.checkpointer.stop()
        if self.db is not None:
            self.db.close()   # the last connection to close checkpoints the rest and removes the WAL


def redis_client(settings: Settings) -> Any:
    """A ``redis.asyncio`` client for the settings' URL: short timeouts, few retries, so a dead
    Redis costs a request milliseconds rather than seconds before the fail mode decides."""
    from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    assert settings.redis_url is not None
    options: dict[str, Any] = dict(socket_timeout=settings.redis_timeout_s,
                                   socket_connect_timeout=settings.redis_timeout_s,
                                   retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1))
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url, max_connections=MAX_REDIS_CONNECTIONS, **options)
    # A burst beyond the pool's size waits (up to the timeout) for a connection instead of failing.
    pool = BlockingConnectionPool.from_url(settings.redis_url, max_connections=MAX_REDIS_CONNECTIONS,
                                           timeout=settings.redis_timeout_s, **options)
    return Redis(connection_pool=pool)


def open_spool(settings: Settings) -> Spool | None:
    """This process's spool in ``GATEWAY_SPOOL_DIR``, holding what earlier, dead processes left there."""
    if not settings.spool_dir:
        return None
    spool = Spool(settings.spool_dir)
    spool.adopt()
    return spool


def open_sqlite_state(settings: Settings) -> State:
    """The embedded stores in ``<GATEWAY_DATA_DIR>/gateway.db``, one connection for all three."""
    from gateway.state.budgets_sqlite import SqliteBudgetStore
    from gateway.state.keys_sqlite import SqliteKeyStore
    from gateway.state.leases_sqlite import SqliteLeases, process_id
    from gateway.state.ledger_sqlite import SqliteLedger
    from gateway.state.sqlite_db import Checkpointer, GroupCommit, connect

    db = connect(settings.data_dir)
    checkpointer = Checkpointer(settings.data_dir)
    checkpointer.start(db)
    group = GroupCommit(db)
    key_store = SqliteKeyStore(db, owns_connection=False)
    ledger = SqliteLedger(db, owns_connection=False, group=group)
    budgets = SqliteBudgetStore(db, settings.reservation_ttl_s, owns_connection=False, group=group,
                                worker=process_id())
    return State(budgets, key_store, CachedKeys(key_store, ttl_s=settings.key_cache_ttl_s), buffered(settings, ledger),
                 settings.redis_fail_mode == "allow", hold_ttl_s=settings.reservation_ttl_s, db=db, group=group,
                 queue_record=ledger.queue, checkpointer=checkpointer,
                 process_leases=SqliteLeases(budgets, ledger) if budgets.worker else None)


def open_state(settings: Settings) -> State:
    fail_open = settings.redis_fail_mode == "allow"
    if not settings.redis_url and settings.data_dir != MEMORY:
        return open_sqlite_state(settings)
    if not settings.redis_url:
        keys = MemoryKeyStore()
        return State(MemoryBudgetStore(settings.reservation_ttl_s), keys, CachedKeys(keys, ttl_s=0.0),
                     buffered(settings, MemoryLedger(settings.ledger_max_records or 20_000)), fail_open,
                     hold_ttl_s=settings.reservation_ttl_s)
    from gateway.state.budgets_redis import OPEN_KEY, RedisBudgetStore
    from gateway.state.keys import RedisKeyStore
    from gateway.state.leases import Leases, cluster_renewer, new_worker_id
    from gateway.state.ledger import RedisLedger
    from gateway.state.resp import fast_client

    client = redis_client(settings)
    settle_spool = SettleSpool(settings.spool_dir) if settings.spool_dir else None
    intents = IntentSpool(settings.spool_dir) if settings.spool_dir else None
    key_store = RedisKeyStore(client)
    # the budget script runs twice per request: on a single server, through the pipelining client
    fast = None if settings.redis_cluster else fast_client(settings.redis_url, settings.redis_timeout_s)
    budgets = RedisBudgetStore(fast or client, settings.reservation_ttl_s, worker=new_worker_id(),
                               lease_s=settings.worker_lease_s)
    on = budgets.worker is not None
    ledger = RedisLedger(client, stream_maxlen(settings), open_key=OPEN_KEY if on else None,
                         writer=budgets.worker if on and settings.redis_cluster else None, fast=fast)
    leases = None
    if on and settings.redis_cluster:   # the lease has a thread of its own; a dead writer's units are rewritten
        leases = Leases(budgets, client, ledger, cluster_renewer(budgets, settings.redis_url, settings.redis_timeout_s))
    elif on:
        leases = Leases(budgets, client)
    state = State(budgets, key_store, CachedKeys(key_store, ttl_s=settings.key_cache_ttl_s, stale_ok=fail_open),
                  buffered(settings, ledger, spool=open_spool(settings)),
                  fail_open, redis=client, hold_ttl_s=settings.reservation_ttl_s, settle_spool=settle_spool,
                  leases=leases, intents=intents)
    if settle_spool is not None:
        state._settles.extend(settle_spool.adopt())   # a dead process's settles: replayed by the first flush
    if intents is not None:
        intents.adopt(state.adopted)   # a dead process's unmetered requests: their records and settles
        state.ledger.on_stored = intents.stored
    return state
