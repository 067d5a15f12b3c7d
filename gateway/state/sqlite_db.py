"""The embedded state's SQLite database: where it lives, how it is opened, and its schema's versions.

Without Redis, keys, budgets, rate windows and the ledger live in one file, ``<data dir>/gateway.db``
(``GATEWAY_DATA_DIR``), opened by every worker and by ``gateway keys``/``spend``/``ledger export``.
:func:`connect` sets the journal to WAL (readers never block the writer, and a commit is one append
to the log) with ``synchronous=NORMAL``: a commit is in the WAL file, in the OS page cache, when it
returns, so a process killed at any moment (SIGKILL, OOM) loses nothing committed; only a power cut
or kernel crash can take back the last commits before a checkpoint. ``FULL`` would fsync the WAL on
every commit, one disk flush per reserve and per group commit on the event loop; ``NORMAL`` fsyncs
only at checkpoints, which :class:`Checkpointer` runs in a thread of its own, off the event loop
(the serving connection's automatic checkpoints are turned off). Writers take the lock up front
(``BEGIN IMMEDIATE``) and wait for each other up to ``BUSY_TIMEOUT_MS``. :func:`migrate` brings a
database to :data:`SCHEMA_VERSION` by applying the forward migrations in :data:`MIGRATIONS` in
order, each in the same transaction as the version row it adds to ``schema_version``; a database
written by a newer gateway is refused with a clear error. :class:`GroupCommit` lets the writes of
many requests (reserves, settles, ledger records) share one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)
DB_NAME = "gateway.db"
BUSY_TIMEOUT_MS = 5_000
WAL_LIMIT_BYTES = 64 * 1024 * 1024


class SchemaError(RuntimeError):
    """The database's schema is newer than this gateway knows, or a migration failed."""


# Each migration takes the schema from version n - 1 to n (index n - 1 here). Never edit a released
# one: add the next. v1: keys, budgets, rate windows, the ledger and its per-day rollups.
# v2: an index for a team's records in time order (``read``/``export`` with ``team``). v3: the sliding
# windows of spend-rate brakes. v4: a hold's owning worker process and its intent (worker leases,
# :mod:`gateway.state.leases_sqlite`); holds of older rows have no owner and lapse with the TTL as before.
# v5: the serving processes' heartbeats, so holds of a process in another PID namespace or on another host
# sharing the file can be judged too (:mod:`gateway.state.leases_sqlite`).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,          -- SHA-256 of the secret; the secret itself is never stored
        team TEXT NOT NULL,
        record TEXT NOT NULL                -- the KeyRecord as JSON
    );
    CREATE TABLE budget_buckets (
        team TEXT NOT NULL, scope TEXT NOT NULL, owner TEXT NOT NULL, period_id TEXT NOT NULL,
        spent INTEGER NOT NULL DEFAULT 0,
        reserved INTEGER NOT NULL DEFAULT 0,  -- the sum of the live holds on it (see reservations)
        expires_at REAL NOT NULL,           -- unix s: dropped after its period's end plus a grace
        PRIMARY KEY (team, scope, owner, period_id)
    ) WITHOUT ROWID;
    CREATE TABLE rate_windows (
        team TEXT NOT NULL, scope TEXT NOT NULL, owner TEXT NOT NULL,
        minute INTEGER NOT NULL, requests INTEGER NOT NULL, tokens INTEGER NOT NULL,
        PRIMARY KEY (team, scope, owner)
    ) WITHOUT ROWID;
    CREATE TABLE reservations (             -- a request's hold, from its reserve until its settle
        team TEXT NOT NULL, request_id TEXT NOT NULL,
        amount INTEGER NOT NULL,            -- held on each of its buckets
        minute INTEGER NOT NULL, tokens INTEGER NOT NULL,   -- the rate window and TPM estimate it counted
        buckets TEXT NOT NULL,              -- JSON [[scope, owner, period_id], ...]: where the hold sits
        expires_at REAL NOT NULL,           -- not renewed by then, it lapses (its worker died)
        PRIMARY KEY (team, request_id)
    ) WITHOUT ROWID;                        -- only requests in flight: small, scanned for lapsed holds
    CREATE TABLE ledger (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL, team TEXT NOT NULL, model TEXT NOT NULL,
        record BLOB NOT NULL                -- the LedgerRecord as JSON
    );
    CREATE INDEX ledger_ts ON ledger (ts);
    CREATE TABLE ledger_rollups (
        day INTEGER NOT NULL,               -- days since the epoch (UTC)
        team TEXT NOT NULL, model TEXT NOT NULL,
        name TEXT NOT NULL,                 -- a counter of gateway.state.ledger.counters
        value INTEGER NOT NULL,
        PRIMARY KEY (day, team, model, name)
    ) WITHOUT ROWID;
    """,
    """
    CREATE INDEX ledger_team_ts ON ledger (team, ts);
    """,
    """
    CREATE TABLE window_holds (             -- a spend-rate brake's sliding 60 s window: one row per request
        team TEXT NOT NULL, scope TEXT NOT NULL, owner TEXT NOT NULL, request_id TEXT NOT NULL,
        amount INTEGER NOT NULL,            -- its hold, then (once settled) its actual cost
        expires_at REAL NOT NULL,           -- it leaves the window then
        PRIMARY KEY (team, scope, owner, request_id)
    ) WITHOUT ROWID;
    """,
    """
    ALTER TABLE reservations ADD COLUMN worker TEXT NOT NULL DEFAULT '';  -- its process (leases_sqlite), '' none
    ALTER TABLE reservations ADD COLUMN intent BLOB;  -- the ledger record's fields if its worker dies (JSON)
    """,
    """
    CREATE TABLE worker_heartbeats (        -- a serving process and when it last showed it is alive
        worker TEXT PRIMARY KEY,            -- its process id (leases_sqlite.process_id)
        at REAL NOT NULL                    -- unix s, the wall clock of the process that wrote it
    ) WITHOUT ROWID;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def db_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / DB_NAME


def _journal_mode_wal(conn: sqlite3.Connection) -> str:
    """Switch to WAL; the journal mode it ends in. Several processes opening a new database at once can be
    answered "database is locked" at once here (the switch does not always wait on the busy handler):
    tried again for up to the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def connect(data_dir: str | Path, *, migrate_to: int | None = SCHEMA_VERSION) -> sqlite3.Connection:
    """Open (creating the directory, mode 0700, and the file, mode 0600) and migrate the database.
    The connection is in autocommit mode: callers open their own ``BEGIN IMMEDIATE`` transactions."""
    directory = Path(data_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = db_path(directory)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))   # secrets' hashes: owner only
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if _journal_mode_wal(conn).lower() != "wal":
            raise SchemaError(f"{path}: SQLite would not switch to WAL (a network file system?)")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")   # the WAL shrinks back after a burst
        if migrate_to is not None:
            migrate(conn, migrate_to)
    except BaseException:
        conn.close()
        raise
    return conn


class Checkpointer:
    """Copies the WAL back into the database file every ``every_s`` (``PRAGMA wal_checkpoint(PASSIVE)``:
    it never waits for, nor blocks, a writer) on its own connection and thread, so the fsyncs of a
    checkpoint never stall the event loop. Connections given to :meth:`start` stop checkpointing
    on their own (``wal_autocheckpoint = 0``)."""

    def __init__(self, data_dir: str | Path, every_s: float = 1.0) -> None:
        self.path = db_path(data_dir)
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> tuple[int, int, int]:
        """One passive checkpoint: (busy, frames in the WAL, frames checkpointed)."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            busy, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return int(busy), int(frames), int(done)
        finally:
            conn.close()

    def start(self, *serving: sqlite3.Connection) -> None:
        for conn in serving:
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._thread = threading.Thread(target=self._run, name="gateway-sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.run_once()
            except sqlite3.Error as exc:   # busy or I/O: the next round tries again
                log.warning("state database checkpoint failed: %r", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def version(conn: sqlite3.Connection) -> int:
    """The schema version of the database (0: empty)."""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Apply the migrations after the database's version up to ``target``, all in one write transaction
    (so concurrent workers starting together apply each one once); returns the version reached."""
    if not 0 <= target <= SCHEMA_VERSION:
        raise ValueError(f"target must be 0..{SCHEMA_VERSION}, got {target}")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version "
                     "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
        current = version(conn)
        if current > SCHEMA_VERSION:
            raise SchemaError(f"the state database is at schema version {current}, newer than this gateway's "
                              f"{SCHEMA_VERSION}: upgrade the gateway (or point GATEWAY_DATA_DIR elsewhere)")
        for n in range(current + 1, target + 1):
            for statement in _statements(MIGRATIONS[n - 1]):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (n, time.time()))
        conn.execute("COMMIT")
        return max(current, target)
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _statements(script: str) -> list[str]:
    """Split a migration into statements (``executescript`` would commit our transaction)."""
    body = "\n".join(line.split("--", 1)[0] for line in script.splitlines())
    return [s.strip() for s in body.split(";") if s.strip()]


class Queued(Protocol):
    """Writes waiting for the next transaction on the connection (deferred settles, ledger records)."""

    @property
    def queued(self) -> int: ...

    def write(self, conn: sqlite3.Connection) -> None:
        """Write everything queued, inside the open transaction."""

    def committed(self) -> None:
        """What ``write`` wrote is committed: forget it."""

    def discard(self, reason: BaseException) -> None:
        """``write`` raised something other than a database error: log what is queued, and drop it."""

    def failed(self, reason: BaseException) -> None:
        """The transaction that carried ``write`` was rolled back (``reason``): what may wait for the next
        one stays queued; what may not (a reserve, which its request awaits) gives up now."""


class GroupCommit:
    """Group commit on one connection: writes are queued by their owners (:class:`Queued`: reserves,
    settles, ledger records) and written together, in the next write transaction anyone opens on the
    connection. Someone waiting for them (:meth:`wait`: a settle, :meth:`gateway.state.State.finish`;
    a reserve awaits its own decision) gets a commit at the end of the event-loop iteration, shared
    by every request that reserved or finished in it; writes nobody
    waits for (the ledger records the pipeline queues after its settle) get one within
    ``delay_s`` (10 ms), a batch. A transaction that fails on a database error (the lock not
    obtained in time, a full disk) keeps everything queued for the next one; the owner's
    background flush (:meth:`commit`) retries, except reserves, which fail at once (:meth:`Queued.failed`)."""

    def __init__(self, conn: sqlite3.Connection, delay_s: float = 0.01) -> None:
        self.conn = conn
        self.delay_s = delay_s
        self.parts: list[Queued] = []
        self._soon = False
        self._later: asyncio.TimerHandle | None = None
        self._waiters: list[asyncio.Future[None]] = []

    def join(self, part: Queued) -> None:
        self.parts.append(part)

    @property
    def queued(self) -> int:
        return sum(p.queued for p in self.parts)

    def touch(self, now: bool = False) -> None:
        """Something was queued: commit it within ``delay_s`` (``now``: at the end of this loop iteration)."""
        if self._soon or (self._later is not None and not now):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return   # no loop: the next transaction or commit() carries it
        if now or self.delay_s <= 0:
            self._soon = True
            loop.call_soon(self._commit_soon)
        else:
            self._later = loop.call_later(self.delay_s, self._commit_soon)

    async def wait(self) -> None:
        """Until what is queued now is committed (at the end of this loop iteration, with everything else
        queued in it). Raises ``sqlite3.Error`` if that commit fails; the writes stay queued."""
        if not self.queued:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.touch(now=True)
        await waiter

    def _commit_soon(self) -> None:
        self._soon = False
        if self._later is not None:
            self._later.cancel()
            self._later = None
        try:
            self.commit()
        except sqlite3.Error as exc:
            log.warning("state database busy, %d writes wait for the next transaction: %r", self.queued, exc)
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
                    waiter.exception()   # retrieved: a cancelled waiter must not log "never retrieved"

    def commit(self) -> None:
        """Write and commit everything queued (nothing when nothing is)."""
        if self.queued or self._waiters:
            with self.transaction():
                pass

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE``, the queued writes, the caller's, ``COMMIT``; all rolled back on any error."""
        c = self.conn
        try:
            self._begin(c)
        except BaseException as exc:
            for part in self.parts:
                part.failed(exc)
            raise
        try:
            yield c
            c.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                c.execute("ROLLBACK")
            for part in self.parts:
                part.failed(exc)
            raise
        for part in self.parts:
            part.committed()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _begin(self, c: sqlite3.Connection) -> None:
        """Open the transaction and write what is queued. A part whose ``write`` fails on something other
        than the database (a bug) is discarded and the transaction started over without it, so that it
        cannot block every later transaction."""
        while True:
            c.execute("BEGIN IMMEDIATE")
            try:
                for part in self.parts:
                    if part.queued:
                        try:
                            part.write(c)
                        except sqlite3.Error:
                            raise
                        except Exception as exc:
                            c.execute("ROLLBACK")
                            part.discard(exc)
                            break
                else:
                    return
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    c.execute("ROLLBACK")
                raise
