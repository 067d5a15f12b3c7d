"""Virtual API keys: records, secret hashing, and stores in memory or Redis. A key's secret
(``sk-gw-...``) is returned once by :meth:`KeyStore.create` and never stored; stores keep its
SHA-256 and look keys up by that hash. Redis layout (``gw:v1:`` prefix): ``key:<hash>`` holds the
record as JSON, ``keyid:<id>`` holds the hash, and the set ``keys`` holds every id. Every command
touches exactly one key (batches are non-transactional pipelines, which RedisCluster splits per
node), so the layout needs no hash tags and works unchanged on Redis Cluster. Lookups return a
record whatever its state; callers must check :meth:`KeyRecord.active`. :class:`CachedKeys` caches
lookups (hits and misses) in-process for ``ttl_s`` so a revocation reaches every worker and
replica within that time.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields, replace
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

import orjson

from gateway.state.budgets import MAX_AMOUNT, StateUnavailable

PREFIX = "gw:v1:"
_KEY = PREFIX + "key:"  # + secret hash -> record JSON
_KEYID = PREFIX + "keyid:"  # + key id -> secret hash
_IDS = PREFIX + "keys"  # set of key ids
KEY_PERIODS = ("daily", "weekly", "monthly", "total")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    team: str
    name: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    budget_usd: str | None
    budget_period: str | None
    rpm: int | None
    tpm: int | None
    prefix: str
    max_usd_per_minute: str | None = None   # the key's spend-rate brake (USD per UTC minute), a decimal string

    def active(self, now: float) -> bool:
        """Not revoked and not expired at ``now`` (unix seconds)."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return False
        return self.expires_at is None or now < self.expires_at

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> KeyRecord:
        data = orjson.loads(raw)
        return cls(**{f.name: data.get(f.name) for f in fields(cls) if f.name in data or f.default is MISSING})


def new_secret() -> str:
    """A fresh key secret: 32 random bytes (256 bits), URL-safe."""
    return "sk-gw-" + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """SHA-256 hex of a secret. Unsalted and fast on purpose: secrets carry 256 random bits, so
    brute force and rainbow tables are hopeless, and a slow KDF would only slow every request."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _usd_amount(label: str, amount: str | Decimal) -> str:
    try:
        value = Decimal(str(amount))
    except InvalidOperation:
        raise ValueError(f"{label} must be a decimal amount, got {amount!r}") from None
    if not value.is_finite() or value < 0 or value * 10**9 > MAX_AMOUNT:
        raise ValueError(f"{label} must be an amount from 0 to {MAX_AMOUNT // 10**9}, got {amount!r}")
    return str(value)


def _new_record(team: str, name: str, secret: str, expires_at: float | None, budget_usd: str | Decimal | None,
                budget_period: str | None, rpm: int | None, tpm: int | None,
                max_usd_per_minute: str | Decimal | None = None) -> KeyRecord:
    if not team or not isinstance(team, str):
        raise ValueError("team must be a non-empty string")
    budget = _usd_amount("budget_usd", budget_usd) if budget_usd is not None else None
    if budget_period is not None and budget_period not in KEY_PERIODS:
        raise ValueError(f"budget_period must be one of {', '.join(KEY_PERIODS)}, got {budget_period!r}")
    brake = _usd_amount("max_usd_per_minute", max_usd_per_minute) if max_usd_per_minute is not None else None
    for label, limit in (("rpm", rpm), ("tpm", tpm)):
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= MAX_AMOUNT):
            raise ValueError(f"{label} must be a positive integer, got {limit!r}")
    return KeyRecord(id="key_" + secrets.token_hex(6), team=team, name=name, created_at=time.time(),
                     expires_at=expires_at, revoked_at=None, budget_usd=budget, budget_period=budget_period,
                     rpm=rpm, tpm=tpm, prefix=secret[:8], max_usd_per_minute=brake)


class KeyStore(Protocol):
    async def create(self, team: str, name: str, *, expires_at: float | None = None,
                     budget_usd: str | Decimal | None = None, budget_period: str | None = None,
                     rpm: int | None = None, tpm: int | None = None,
                     max_usd_per_minute: str | Decimal | None = None) -> tuple[KeyRecord, str]: ...

    async def lookup(self, secret: str) -> KeyRecord | None: ...

    async def get(self, key_id: str) -> KeyRecord | None: ...

    async def list(self, team: str | None = None) -> builtins.list[KeyRecord]: ...

    async def revoke(self, key_id: str) -> bool: ...

    async def has_keys(self) -> bool: ...

    async def aclose(self) -> None: ...


class MemoryKeyStore:
    """Keys in this process only (tests, single-worker dev)."""

    def __init__(self) -> None:
        self._by_hash: dict[str, KeyRecord] = {}
        self._hash_by_id: dict[str, str] = {}

    async def create(self, team: str, name: str, *, expires_at: float | None = None,
                     budget_usd: str | Decimal | None = None, budget_period: str | None = None,
                     rpm: int | None = None, tpm: int | None = None,
                     max_usd_per_minute: str | Decimal | None = None) -> tuple[KeyRecord, str]:
        secret = new_secret()
        record = _new_record(team, name, secret, expires_at, budget_usd, budget_period, rpm, tpm,
                                 max_usd_per_minute)
        digest = hash_secret(secret)
        self._by_hash[digest] = record
        self._hash_by_id[record.id] = digest
        return record, secret

    async def lookup(self, secret: str) -> KeyRecord | None:
        return self._by_hash.get(hash_secret(secret))

    async def get(self, key_id: str) -> KeyRecord | None:
        digest = self._hash_by_id.get(key_id)
        return None if digest is None else self._by_hash.get(digest)

    async def list(self, team: str | None = None) -> builtins.list[KeyRecord]:
        records = (r for r in self._by_hash.values() if team is None or r.team == team)
        return sorted(records, key=lambda r: (r.created_at, r.id))

    async def revoke(self, key_id: str) -> bool:
        digest = self._hash_by_id.get(key_id)
        record = None if digest is None else self._by_hash.get(digest)
        if digest is None or record is None or record.revoked_at is not None:
            return False
        self._by_hash[digest] = replace(record, revoked_at=time.time())
        return True

    async def has_keys(self) -> bool:
        return bool(self._by_hash)

    async def aclose(self) -> None:
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisKeyStore:
    """Keys in Redis or Redis Cluster (``redis.asyncio`` client, ``decode_responses`` either way)."""

    def __init__(self, client: Any) -> None:
        self._r = client

    async def create(self, team: str, name: str, *, expires_at: float | None = None,
                     budget_usd: str | Decimal | None = None, budget_period: str | None = None,
                     rpm: int | None = None, tpm: int | None = None,
                     max_usd_per_minute: str | Decimal | None = None) -> tuple[KeyRecord, str]:
        for _ in range(5):  # a 48-bit id or 256-bit secret colliding is a near-impossible retry
            secret = new_secret()
            record = _new_record(team, name, secret, expires_at, budget_usd, budget_period, rpm, tpm,
                                 max_usd_per_minute)
            digest = hash_secret(secret)
            # Order matters for a crash between commands: claim the id, index it, and only then
            # write the record, so a usable key is always listable and revocable by id.
            if not await self._r.set(_KEYID + record.id, digest, nx=True):
                continue
            await self._r.sadd(_IDS, record.id)
            if await self._r.set(_KEY + digest, record.to_json(), nx=True):
                return record, secret
            await self._r.srem(_IDS, record.id)  # the hash is taken: undo the claim, try again
            await self._r.delete(_KEYID + record.id)
        raise RuntimeError("could not allocate a unique key id")

    async def lookup(self, secret: str) -> KeyRecord | None:
        raw = await self._r.get(_KEY + hash_secret(secret))
        return None if raw is None else KeyRecord.from_json(raw)

    async def get(self, key_id: str) -> KeyRecord | None:
        digest = await self._r.get(_KEYID + key_id)
        if digest is None:
            return None
        raw = await self._r.get(_KEY + _text(digest))
        return None if raw is None else KeyRecord.from_json(raw)

    async def list(self, team: str | None = None) -> builtins.list[KeyRecord]:
        ids = sorted(_text(i) for i in await self._r.smembers(_IDS))
        if not ids:
            return []
        pipe = self._r.pipeline(transaction=False)  # one GET per key: no cross-slot command
        for key_id in ids:
            pipe.get(_KEYID + key_id)
        digests = [_text(d) for d in await pipe.execute() if d is not None]
        pipe = self._r.pipeline(transaction=False)
        for digest in digests:
            pipe.get(_KEY + digest)
        records = [KeyRecord.from_json(raw) for raw in await pipe.execute() if raw is not None]
        return sorted((r for r in records if team is None or r.team == team), key=lambda r: (r.created_at, r.id))

    async def revoke(self, key_id: str) -> bool:
        digest = await self._r.get(_KEYID + key_id)
        if digest is None:
            return False
        key = _KEY + _text(digest)
        raw = await self._r.get(key)
        if raw is None:
            return False
        record = KeyRecord.from_json(raw)
        if record.revoked_at is not None:
            return False
        # Read-modify-write of one key; a concurrent revoke writes an equivalent record.
        return bool(await self._r.set(key, replace(record, revoked_at=time.time()).to_json(), xx=True))

    async def has_keys(self) -> bool:
        return bool(await self._r.scard(_IDS))

    async def aclose(self) -> None:
        await self._r.aclose()


def store_down(exc: Exception) -> StateUnavailable:
    """What a key store's own error becomes on the request path."""
    return StateUnavailable(f"key store unavailable: {exc!r}")


class CachedKeys:
    """In-process lookup cache over a :class:`KeyStore`. Hits and misses both live ``ttl_s``
    (monotonic clock), so revoking or creating a key is seen everywhere within ``ttl_s``. At most
    ``max_entries`` entries; the oldest is dropped first. Entries are keyed by the secret's hash,
    so no secret is kept in memory. A store error becomes :class:`StateUnavailable` and is not
    cached; with ``stale_ok`` (fail mode "allow") an expired entry is served instead while the
    store is down. ``has_keys`` (whether any key was ever created) is cached the same way. With
    ``ttl_s`` 0 (an in-process store) nothing is cached: each lookup asks the store."""

    def __init__(self, store: KeyStore, ttl_s: float = 2.0, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic, stale_ok: bool = False) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.max_entries = max(1, max_entries)
        self.stale_ok = stale_ok
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()
        self._has_keys: tuple[float, bool] = (0.0, False)
        self._inflight: dict[str, asyncio.Future[KeyRecord | None]] = {}

    async def has_keys(self) -> bool:
        until, value = self._has_keys
        if until > self._clock():
            return value
        try:
            value = await self.store.has_keys()
        except Exception as exc:
            if self.stale_ok and until:
                return value
            raise store_down(exc) from exc
        self._has_keys = (self._clock() + self.ttl_s, value)
        return value

    async def lookup(self, secret: str) -> KeyRecord | None:
        if not self.ttl_s:   # nothing kept (an in-process store): ask it, with no entry or wait to manage
            try:
                return await self.store.lookup(secret)
            except Exception as exc:
                raise store_down(exc) from exc
        digest = hash_secret(secret)
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        # One store lookup per key at a time: when a busy key's entry expires, the requests that
        # arrive meanwhile wait for that lookup instead of each asking Redis (a burst of hundreds).
        pending = self._inflight.get(digest)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise                    # this request itself was cancelled
            if digest in self._inflight:     # the lookup it waited for was cancelled: ask again
                return await self.lookup(secret)
        future: asyncio.Future[KeyRecord | None] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            record = await self.store.lookup(secret)
            future.set_result(record)
        except Exception as exc:
            if self.stale_ok and hit is not None:
                future.set_result(hit[1])
                return hit[1]
            error = store_down(exc)
            future.set_exception(error)
            future.exception()   # retrieved here, so a lookup nobody else waited for is not "never retrieved"
            raise error from exc
        finally:
            del self._inflight[digest]
            if not future.done():   # cancelled while waiting on the store: so are the ones waiting here
                future.cancel()
        self._cache.pop(digest, None)
        self._cache[digest] = (self._clock() + self.ttl_s, record)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return record

    async def lookup_active(self, secret: str, now: float | None = None) -> KeyRecord | None:
        """The key if it exists, is not revoked and has not expired; otherwise None."""
        record = await self.lookup(secret)
        return record if record is not None and record.active(time.time() if now is None else now) else None

    def clear(self) -> None:
        """Forget every cached lookup (and ``has_keys``): this process sees a new or revoked key at once."""
        self._cache.clear()
        self._has_keys = (0.0, False)

    def __len__(self) -> int:
        return len(self._cache)
