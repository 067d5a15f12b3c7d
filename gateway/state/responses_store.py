"""Conversation state of the Responses API: stored responses, keyed by response id.

A :class:`StoredResponse` keeps what a later request needs: the owning team (another
team's key never sees it), the deployment that answered (affinity: a deployment that
keeps responses server-side gets ``previous_response_id`` forwarded to it), the model,
the request's input items as sent after rebuilding (earlier turns included) and the
Response object with its output items. :meth:`StoredResponse.history` is what the
gateway replays to a deployment without server-side state. Requests with
``store: false`` are never put here (:func:`should_store`). Two stores:
:class:`MemoryResponsesStore` (the embedded default; bounded by entries and bytes,
oldest first out, with a TTL) and :class:`RedisResponsesStore` (one key
``gw:v1:resp:<id>`` per response with the TTL as its expiry, shared by every worker and
replica, one key per command so Redis Cluster works unchanged). Redis failures
surface as :class:`~gateway.state.budgets.StateUnavailable`.

:meth:`put_later` is how the request path keeps a response: it hands over a function that
builds the record. The memory store builds and serialises it once the current reply is out
(a callback on the event loop, run when the request's task next yields, normally after the
reply's last byte is written), and any read first builds what is pending, so a ``GET``
right after the reply finds the response; Redis builds and writes it at once, before the
reply, since the next ``GET`` may reach another worker or replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from redis.exceptions import RedisClusterException, RedisError

from gateway.state.budgets import StateUnavailable

log = logging.getLogger("gateway")
KEY_PREFIX = "gw:v1:resp:"
DEFAULT_TTL_S = 30 * 24 * 3600      # OpenAI keeps stored responses 30 days
MAX_PENDING = 16                    # records put_later may hold unbuilt before it builds them at once
_ERRORS = (RedisError, RedisClusterException, OSError)


def should_store(request_body: Mapping[str, Any]) -> bool:
    """Whether the gateway keeps this request's response (``store`` defaults to true, as at OpenAI)."""
    return request_body.get("store") is not False


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    team: str
    deployment: str                      # the deployment that answered (affinity)
    model: str                           # the model the client asked for
    input_items: list[dict[str, Any]]    # the full input as sent, earlier turns included, each with an id
    response: dict[str, Any]             # the Response object returned to the client
    upstream_state: bool = False         # the deployment keeps the response itself (previous_response_id forwarded)
    created_at: float = field(default_factory=time.time)

    @property
    def output_items(self) -> list[dict[str, Any]]:
        output = self.response.get("output")
        return [i for i in output if isinstance(i, dict)] if isinstance(output, list) else []

    def history(self) -> list[dict[str, Any]]:
        """The items a next turn continues from: this turn's input, then its output."""
        return self.input_items + self.output_items

    def to_json(self) -> bytes:
        # the fields are JSON values already: no dataclasses.asdict, whose deep copy of every item was
        # most of the cost of storing a response (about 0.3 ms for a 20-item conversation)
        return orjson.dumps({"id": self.id, "team": self.team, "deployment": self.deployment, "model": self.model,
                             "input_items": self.input_items, "response": self.response,
                             "upstream_state": self.upstream_state, "created_at": self.created_at})

    @classmethod
    def from_json(cls, raw: bytes | str) -> StoredResponse:
        data = orjson.loads(raw)
        return cls(id=data["id"], team=data["team"], deployment=data["deployment"], model=data["model"],
                   input_items=data["input_items"], response=data["response"],
                   upstream_state=bool(data.get("upstream_state")), created_at=float(data["created_at"]))


Build = Callable[[], StoredResponse]     # makes the record of a finished response (see ``put_later``)


class ResponsesStore(Protocol):
    async def put(self, record: StoredResponse) -> bool: ...

    async def put_later(self, response_id: str, build: Build) -> None:
        """Keep the record ``build`` makes, at the latest before the next read of ``response_id``."""
        ...

    async def get(self, response_id: str, team: str) -> StoredResponse | None: ...

    async def delete(self, response_id: str, team: str) -> bool: ...

    async def input_items(self, response_id: str, team: str) -> list[dict[str, Any]] | None: ...

    async def aclose(self) -> None: ...


class MemoryResponsesStore:
    """In-process store: at most ``max_entries`` records and ``max_bytes`` of their JSON, each for
    ``ttl_s``; the oldest go first. Records are kept serialised, so callers never share them; records
    handed to :meth:`put_later` are built and serialised on the event loop's next turn (or by the next
    read, whichever is first; at most :data:`MAX_PENDING` of them), so until then they are not counted
    against the bounds."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, max_entries: int = 10_000, max_bytes: int = 64 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0 or max_entries < 1 or max_bytes < 1:
            raise ValueError("ttl_s, max_entries and max_bytes must be positive")
        self.ttl_s, self.max_entries, self.max_bytes = ttl_s, max_entries, max_bytes
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()   # id -> (expires, JSON)
        self._pending: dict[str, Build] = {}        # put_later's records, not built yet
        self.bytes = 0

    def __len__(self) -> int:
        self.flush()
        return len(self._data)

    async def put_later(self, response_id: str, build: Build) -> None:
        if len(self._pending) >= MAX_PENDING:   # a loop that never turns (no request yields): keep the bound
            self.flush()
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending[response_id] = build

    def flush(self) -> None:
        """Build, serialise and keep the records :meth:`put_later` was given."""
        while self._pending:
            response_id = next(iter(self._pending))
            build = self._pending.pop(response_id)
            try:
                self._put(build())
            except Exception:   # a record that cannot be kept costs the client nothing now
                log.exception("could not keep response %s for later turns", response_id)

    def _remove(self, response_id: str) -> None:
        entry = self._data.pop(response_id, None)
        if entry is not None:
            self.bytes -= len(entry[1])

    def _expire(self, now: float) -> None:
        while self._data:
            oldest, (expires, _) = next(iter(self._data.items()))
            if expires > now:
                return
            self._remove(oldest)

    async def put(self, record: StoredResponse) -> bool:
        """Keep ``record``; False (nothing kept) when it alone is larger than ``max_bytes``."""
        self._pending.pop(record.id, None)
        return self._put(record)

    def _put(self, record: StoredResponse) -> bool:
        raw = record.to_json()
        if len(raw) > self.max_bytes:
            return False
        now = self._clock()
        self._expire(now)
        self._remove(record.id)
        self._data[record.id] = (now + self.ttl_s, raw)
        self.bytes += len(raw)
        while len(self._data) > self.max_entries or self.bytes > self.max_bytes:
            self._remove(next(iter(self._data)))
        return True

    async def get(self, response_id: str, team: str) -> StoredResponse | None:
        if self._pending:
            self.flush()
        entry = self._data.get(response_id)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._remove(response_id)
            return None
        record = StoredResponse.from_json(entry[1])
        return record if record.team == team else None

    async def delete(self, response_id: str, team: str) -> bool:
        if await self.get(response_id, team) is None:
            return False
        self._remove(response_id)
        return True

    async def input_items(self, response_id: str, team: str) -> list[dict[str, Any]] | None:
        record = await self.get(response_id, team)
        return None if record is None else record.input_items

    async def aclose(self) -> None:
        self._pending.clear()
        self._data.clear()
        self.bytes = 0


class RedisResponsesStore:
    """Records in Redis (or Redis Cluster) under ``gw:v1:resp:<id>``, expiring after ``ttl_s``."""

    def __init__(self, client: Any, ttl_s: float = DEFAULT_TTL_S) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self._r = client
        self.ttl_ms = max(1, int(ttl_s * 1000))

    async def put(self, record: StoredResponse) -> bool:
        try:
            await self._r.set(KEY_PREFIX + record.id, record.to_json(), px=self.ttl_ms)
        except _ERRORS as exc:
            raise StateUnavailable(f"responses store unavailable: {type(exc).__name__}: {exc}") from exc
        return True

    async def put_later(self, response_id: str, build: Build) -> None:
        """Written now, before the reply: the next read may come to another worker or replica."""
        await self.put(build())

    async def get(self, response_id: str, team: str) -> StoredResponse | None:
        try:
            raw = await self._r.get(KEY_PREFIX + response_id)
        except _ERRORS as exc:
            raise StateUnavailable(f"responses store unavailable: {type(exc).__name__}: {exc}") from exc
        if raw is None:
            return None
        record = StoredResponse.from_json(raw)
        return record if record.team == team else None

    async def delete(self, response_id: str, team: str) -> bool:
        if await self.get(response_id, team) is None:
            return False
        try:
            return bool(await self._r.delete(KEY_PREFIX + response_id))
        except _ERRORS as exc:
            raise StateUnavailable(f"responses store unavailable: {type(exc).__name__}: {exc}") from exc

    async def input_items(self, response_id: str, team: str) -> list[dict[str, Any]] | None:
        record = await self.get(response_id, team)
        return None if record is None else record.input_items

    async def aclose(self) -> None:
        """The client is shared (``State.redis``); its owner closes it."""


def open_responses_store(redis: Any | None, ttl_s: float = DEFAULT_TTL_S, max_entries: int = 10_000,
                         max_bytes: int = 64 << 20) -> ResponsesStore:
    """On Redis when ``redis`` (the shared client, ``State.redis``) is given, else in memory (bounded)."""
    if redis is not None:
        return RedisResponsesStore(redis, ttl_s)
    return MemoryResponsesStore(ttl_s, max_entries, max_bytes)
