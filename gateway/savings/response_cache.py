"""The response cache (exact match): which requests it serves, their keys, entries and the stores.

A request is cacheable when its team's (or route's) ``cache.mode`` allows it: ``deterministic``
(the default) caches embeddings, chat, legacy completions and Responses requests with
``temperature: 0`` or an integer ``seed``, and Messages requests with ``temperature: 0``;
``always`` caches every request; ``off`` none. ``cache-control: no-cache`` skips the lookup but
stores the fresh answer; ``no-store`` skips both.
The key is a SHA-256 of canonical JSON (sorted keys, top-level nulls dropped, integral top-level
floats as ints) of: a version, the team, the resolved model name, the endpoint, and the whole
request body except ``model``, ``stream`` and ``stream_options`` -- so a stream can be answered
from a stored non-stream answer and the other way round, and no answer ever crosses teams,
models, system prompts, tools, response formats or sampling parameters. A Responses request is
keyed on the body as sent with any ``previous_response_id`` replaced by the earlier turns' items
(the codec inlines them, so the key covers the whole conversation, never an id), without
``store`` (a hit gets a fresh response id and is stored, or not, as its own request says).
A Messages request is cacheable under ``deterministic`` with ``temperature: 0`` (the API has no
seed; ``thinking`` is not a rule of its own: Anthropic refuses any temperature but 1 with
thinking on, so a request that thinks natively is never cached, and one translated for a chat
deployment at temperature 0 is cached as chat would be); it is keyed on the body as sent
(``system``, ``messages``, ``tools``, ``tool_choice``, ``max_tokens``, ``stop_sequences``,
``thinking``, ``cache_control`` markers, every other field) except ``model``, ``stream`` and
``metadata``, plus its ``anthropic-beta`` features and ``anthropic-version`` (they change what
the API does).

An entry is the answer in its API's shape (OpenAI's, a Response, a Message; ``usage`` without
``cost_usd``) plus what pricing a hit
needs: the prompt tokens before compression, the output tokens, and the deployment that produced
it. Two stores: :class:`MemoryStore`, an LRU bounded in entries and bytes for the embedded single
process, and :class:`RedisStore` on the shared client (``gw:v1:rcache:<sha256>``, ``SET PX`` with
the TTL; one ``GET`` per lookup, never a scan). A store failure is a miss, never a failed request.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from gateway.policy import CacheSettings

log = logging.getLogger("gateway.savings.response_cache")
KEY_PREFIX = "gw:v1:rcache:"
KEY_VERSION = 1
_NOT_IN_KEY = frozenset({"model", "stream", "stream_options"})
_NOT_IN_KEY_OF = {"responses": _NOT_IN_KEY | {"store"}, "messages": _NOT_IN_KEY | {"metadata"}}
ENDPOINTS = frozenset({"chat", "completions", "embeddings", "responses", "messages"})


@dataclass(frozen=True, slots=True)
class Entry:
    body: dict[str, Any]          # the answer in its API's shape, as a non-stream response
    endpoint: str
    input_tokens: int             # prompt tokens the answer would have cost uncompressed
    output_tokens: int
    deployment: str               # the deployment that produced it
    created: float

    def encode(self) -> bytes:
        return orjson.dumps({"v": KEY_VERSION, "body": self.body, "endpoint": self.endpoint,
                             "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                             "deployment": self.deployment, "created": self.created})

    @classmethod
    def decode(cls, raw: bytes) -> Entry | None:
        try:
            data = orjson.loads(raw)
            if data.get("v") != KEY_VERSION or not isinstance(data.get("body"), dict):
                return None
            return cls(data["body"], str(data["endpoint"]), int(data["input_tokens"]), int(data["output_tokens"]),
                       str(data["deployment"]), float(data["created"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return None


@dataclass(slots=True)
class Lookup:
    """What the cache stage decided for one request."""

    result: str                    # "hit" | "miss" | "bypass"
    key: str | None = None         # set when the answer may be stored
    model: str = ""                # the model the key names (a downgraded answer is not stored under it)
    settings: CacheSettings | None = None
    entry: Entry | None = None


def directives(headers: dict[str, str]) -> tuple[bool, bool]:
    """(skip lookup, skip store) from the request's ``cache-control`` header."""
    value = headers.get("cache-control")
    if not value:
        return False, False
    tokens = {t.strip().lower().split("=", 1)[0] for t in value.split(",")}
    no_store = "no-store" in tokens
    return no_store or "no-cache" in tokens, no_store


def deterministic(endpoint: str, body: dict[str, Any]) -> bool:
    if endpoint == "embeddings":
        return True
    temperature = body.get("temperature")
    if not isinstance(temperature, bool) and isinstance(temperature, (int, float)) and temperature == 0:
        return True
    if endpoint == "messages":   # the Messages API has no seed (nor does its translation to chat carry one)
        return False
    seed = body.get("seed")
    return isinstance(seed, int) and not isinstance(seed, bool)


def cacheable(settings: CacheSettings, endpoint: str, body: dict[str, Any]) -> bool:
    if settings.mode == "off":
        return False
    return settings.mode == "always" or deterministic(endpoint, body)


def _normal(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def key_headers(endpoint: str, headers: dict[str, str]) -> dict[str, Any]:
    """The request headers that change an answer, as the key holds them: for a Messages request its
    ``anthropic-beta`` features (a set: order and repeats do not matter) and ``anthropic-version``."""
    if endpoint != "messages":
        return {}
    out: dict[str, Any] = {}
    beta = headers.get("anthropic-beta")
    if beta:
        out["anthropic-beta"] = sorted({token.strip() for token in beta.split(",") if token.strip()})
    version = headers.get("anthropic-version")
    if version:
        out["anthropic-version"] = version.strip()
    return out


def cache_key(team: str, model: str, endpoint: str, body: dict[str, Any],
              headers: dict[str, Any] | None = None) -> str:
    """``headers``: what :func:`key_headers` kept (none: the key of a request without such headers)."""
    left_out = _NOT_IN_KEY_OF.get(endpoint, _NOT_IN_KEY)
    request = {k: _normal(v) for k, v in body.items() if k not in left_out and v is not None}
    parts: list[Any] = [KEY_VERSION, team, model, endpoint, request]
    if headers:
        parts.append(headers)
    canonical = orjson.dumps(parts, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return KEY_PREFIX + hashlib.sha256(canonical).hexdigest()


def answer_for_storage(body: dict[str, Any]) -> dict[str, Any]:
    """The answer as stored: its usage without the gateway's ``cost_usd`` (a hit costs 0)."""
    usage = body.get("usage")
    if isinstance(usage, dict) and "cost_usd" in usage:
        body = {**body, "usage": {k: v for k, v in usage.items() if k != "cost_usd"}}
    return body


class Store(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...


class MemoryStore:
    """An LRU of serialised entries with per-entry expiry, bounded in entries and bytes."""

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 64 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.clock = clock
        self.bytes = 0
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def resize(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._evict()

    async def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= self.clock():
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return item[1]

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if len(value) > self.max_bytes:
            return
        if key in self._items:
            self._drop(key)
        # an exact-size copy: orjson's output keeps a larger buffer (4 KiB for a few hundred bytes),
        # which would make ``max_bytes`` count a fraction of the memory really held
        self._items[key] = (self.clock() + ttl_s, bytes(memoryview(value)))
        self.bytes += len(value)
        self._evict()

    def _drop(self, key: str) -> None:
        _, value = self._items.pop(key)
        self.bytes -= len(value)

    def _evict(self) -> None:
        while self._items and (len(self._items) > self.max_entries or self.bytes > self.max_bytes):
            oldest = next(iter(self._items))
            self._drop(oldest)


class RedisStore:
    """Entries under ``gw:v1:rcache:<sha256>`` with Redis's own expiry; errors are misses."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def get(self, key: str) -> bytes | None:
        try:
            value = await self.client.get(key)
        except Exception as exc:   # the cache is an optimisation: an unreachable Redis is a miss
            log.warning("response cache lookup failed: %r", exc)
            return None
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        try:
            await self.client.set(key, value, px=max(1, int(ttl_s * 1000)))
        except Exception as exc:
            log.warning("response cache store failed: %r", exc)


class ResponseCache:
    """The stage's logic: decide, look up, store. The pipeline calls it; it knows no HTTP."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def bypasses(settings: CacheSettings, endpoint: str, body: dict[str, Any]) -> bool:
        """Whether the cache is neither asked nor filled for this request (most requests: a sampled answer)."""
        return endpoint not in ENDPOINTS or not cacheable(settings, endpoint, body)

    async def lookup(self, settings: CacheSettings, team: str, model: str, endpoint: str,
                     body: dict[str, Any], headers: dict[str, str]) -> Lookup:
        if self.bypasses(settings, endpoint, body):
            return Lookup("bypass")
        skip_lookup, skip_store = directives(headers)
        key = cache_key(team, model, endpoint, body, key_headers(endpoint, headers))
        stored = None if skip_lookup else await self.store.get(key)
        entry = Entry.decode(stored) if stored is not None else None
        if entry is not None and entry.endpoint == endpoint:
            return Lookup("hit", None, model, settings, entry)
        return Lookup("bypass" if skip_lookup else "miss", None if skip_store else key, model, settings)

    async def store_answer(self, lookup: Lookup, entry: Entry) -> bool:
        if lookup.key is None or lookup.settings is None:
            return False
        raw = entry.encode()
        if len(raw) > lookup.settings.max_entry_bytes:
            return False
        await self.store.set(lookup.key, raw, lookup.settings.ttl_s)
        return True
