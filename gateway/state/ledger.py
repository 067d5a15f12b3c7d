"""Spend ledger: one :class:`LedgerRecord` per request, in memory or in Redis, with totals. Redis
layout (``gw:v1:`` prefix): the stream ``ledger`` (one field ``r``, the record's JSON); per team per
UTC day the hash ``roll:{team:<team>}:<yyyymmdd>`` and per served model per day ``rollm:<model>:<yyyymmdd>``
(fields ``requests cost_nano baseline_nano input_tokens output_tokens savings_<source>``); the sets
``rollidx:teams:<yyyymmdd>`` and ``rollidx:models:<yyyymmdd>`` naming the rollups of a day; and
short-lived ``dedup:{<tag>}:<batch>`` markers. Names in keys are percent-encoded. Each batch is
applied by one Lua script that first checks its marker (a hash of the batch's records), so a batch
is all-or-nothing and a retry after an ambiguous failure (the reply lost after the server applied
it) is a no-op: nothing is lost or counted twice. With worker leases on one Redis, a record with a
``hold_id`` is also waiting in ``gw:v2:open`` (:mod:`gateway.state.leases`): the same script checks
that its entry is in the expected state (not swept for a worker's own record; swept, ``S``, for one
the sweep writes for a dead worker, whose ``hold_id`` is ``swept:<hold>``) and retires it, so of
the worker's batch and the sweeper's exactly one writes it; a record whose entry says otherwise is
left out of the batch. On Redis Cluster the entry lives in its hold's slot (``hold_id``: ``<open
hash> <request id>``), so such records are written in units per slot: claim, parts, finalize
(:class:`RedisLedger`). On Redis Cluster, a script cannot span slots, so
the batch is split per hash slot, each part atomic and idempotent with its own marker, sent in one
non-transactional pipeline per master; each part's outcome is reported on its own
(:meth:`RedisLedger.append_parts`). ``totals`` sums the rollups when the range is whole UTC days
and reads the stream otherwise; both sum the same integer counters, so they agree exactly.
:class:`BufferedLedger` holds batches while Redis is unreachable (in memory, or spooled to local disk)
and retries them in order, per slot: a master that is down holds back only its own slots' parts.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import quote

import orjson
from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from gateway.state.outage_log import OutageLog

if TYPE_CHECKING:
    from gateway.state.spool import Spool

log = logging.getLogger(__name__)

SAVINGS_SOURCES = ("routing", "cache", "compression", "prompt_cache")
GROUP_BY = ("team", "model", "day")
NONE = "(none)"   # a report row of requests without that dimension (no key, no end user, no tag)
STREAM = "gw:v1:ledger"
DAY_S = 86_400
_PAGE = 1_000
_MAX_ROLLUP_DAYS = 400


@dataclass(slots=True)
class LedgerRecord:
    request_id: str
    ts: float
    team: str
    key_id: str | None
    requested_model: str
    model: str
    deployment: str
    provider: str
    route: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nano: int = 0
    baseline_nano: int = 0
    savings: dict[str, int] = field(default_factory=dict)
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    status: str = "ok"
    cache: str = "bypass"              # the response cache: hit, miss or bypass
    compressed: bool = False
    compression_saved_tokens: int = 0  # prompt tokens compression removed (estimated)
    estimated: bool = False
    stream: bool = False
    endpoint: str = "chat"             # the inbound API: chat, completions, embeddings, messages, responses
    user: str | None = None            # the end user (x-gateway-user, the body's user or metadata.user_id)
    tags: tuple[str, ...] = ()         # x-gateway-tags
    session: str | None = None         # x-gateway-session, or a client's own session id (Claude Code's)
    agent: str | None = None           # a coding agent's sub-agent id, and its parent's
    parent_agent: str | None = None
    overrun: bool = False              # it cost more than the hold it was admitted with
    hold_id: str = ""                  # its budget hold while a worker lease tracks it in gw:v2:open, else ""

    def to_json(self) -> bytes:
        return orjson.dumps(self)   # orjson serialises dataclasses natively, ~15x faster than asdict

    @classmethod
    def from_json(cls, raw: bytes | str) -> LedgerRecord:
        return cls.from_dict(orjson.loads(raw))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LedgerRecord:
        record = cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        if isinstance(record.tags, list):   # JSON has no tuples
            record.tags = tuple(record.tags)
        return record


SWEPT = "swept:"   # a hold_id prefix: the record was written for a dead worker by the sweep


def interrupted_record(data: dict[str, Any], hold_id: str, held_nano: int) -> LedgerRecord:
    """The ledger record of a request whose worker died: its intent, charged its whole hold, flagged."""
    record = LedgerRecord.from_dict({**data, "input_tokens": 0, "output_tokens": 0})
    record.status, record.cost_nano, record.estimated = "interrupted", held_nano, True
    record.hold_id = SWEPT + hold_id
    return record


def claim_of(hold_id: str) -> tuple[str, str]:
    """(open entry, ``s`` for a record the sweep wrote for a dead worker or ``o`` for a worker's own)."""
    return (hold_id[len(SWEPT):], "s") if hold_id.startswith(SWEPT) else (hold_id, "o")


def hold_ref(key: str, field: str) -> str:
    """A cluster's open entry as a record's ``hold_id``: its open hash (a key has no space) and field."""
    return f"{key} {field}"


def open_ref(entry: str) -> tuple[str, str]:
    """(open hash, field) of a cluster's open entry (:func:`hold_ref`)."""
    key, _, name = entry.partition(" ")
    return key, name


def day_of(ts: float, fmt: str = "%Y%m%d") -> str:
    """The UTC day of a unix time (``yyyymmdd`` by default)."""
    return datetime.fromtimestamp(ts, UTC).strftime(fmt)


def counters(record: LedgerRecord) -> dict[str, int]:
    """The integer counters a record adds to a total (and to a rollup hash, field for field)."""
    out = {"requests": 1, "cost_nano": record.cost_nano, "baseline_nano": record.baseline_nano,
           "input_tokens": record.input_tokens, "output_tokens": record.output_tokens}
    return out | {"savings_" + source: int(nano) for source, nano in record.savings.items()}


def summed(records: Sequence[LedgerRecord]) -> dict[str, int]:
    """The sum of the records' :func:`counters`, field for field (one pass per field, not a dict per record)."""
    out = {"requests": len(records), "cost_nano": sum(r.cost_nano for r in records),
           "baseline_nano": sum(r.baseline_nano for r in records),
           "input_tokens": sum(r.input_tokens for r in records),
           "output_tokens": sum(r.output_tokens for r in records)}
    for r in records:
        if r.savings:
            for source, nano in r.savings.items():
                name = "savings_" + source
                out[name] = out.get(name, 0) + int(nano)
    return out


class _Totals:
    def __init__(self, by: str) -> None:
        if by not in GROUP_BY:
            raise ValueError(f"by must be one of {GROUP_BY}, got {by!r}")
        self.by = by
        self.rows: dict[str, Counter[str]] = {}

    def add(self, key: str, values: Mapping[str, int]) -> None:
        self.rows.setdefault(key, Counter()).update(values)

    def add_record(self, r: LedgerRecord) -> None:
        key = r.team if self.by == "team" else r.model if self.by == "model" else day_of(r.ts, "%Y-%m-%d")
        self.add(key, counters(r))

    def result(self) -> list[dict[str, Any]]:
        out = []
        for key, row in sorted(self.rows.items()):
            savings = dict.fromkeys(SAVINGS_SOURCES, 0) | {k[8:]: v for k, v in row.items() if k.startswith("savings_")}
            out.append({"key": key, "requests": row["requests"], "cost_nano": row["cost_nano"],
                        "baseline_nano": row["baseline_nano"], "savings_nano": savings,
                        "input_tokens": row["input_tokens"], "output_tokens": row["output_tokens"]})
        return out


def _matches(r: LedgerRecord, since: float, until: float | None, team: str | None) -> bool:
    return since <= r.ts and (until is None or r.ts < until) and (team is None or r.team == team)


class Ledger(Protocol):
    async def append(self, records: Sequence[LedgerRecord]) -> None: ...

    async def read(self, since: float, until: float | None = None, team: str | None = None) -> list[LedgerRecord]: ...

    async def totals(self, since: float, until: float | None = None, team: str | None = None,
                     by: str = "team") -> list[dict[str, Any]]: ...

    async def aclose(self) -> None: ...


class MemoryLedger:
    """The embedded ledger, for one process, in bounded memory. It keeps two things:

    - exact integer rollups per (UTC day, team, model): the counters of :func:`counters`, the
      ones Redis keeps per (team, day) and (model, day), here split by both so that every
      grouping and team filter can be summed from them. They are kept for the life of the
      process: a few hundred bytes per team and model in use per day.
    - a window of the newest ``max_records`` records (default 20,000: 10-20 MB), serialised
      (bytes are invisible to the garbage collector, so a long run does not slow every
      collection) and copied to exact-size objects (orjson over-allocates its output buffer,
      8 KB for a 450-byte record). Older records are evicted; ``evicted`` counts them and
      ``horizon`` is the newest ``ts`` among them.

    ``totals`` takes every whole UTC day in ``since <= ts < until`` from the rollups, so it is
    exact however many records came before; the partial days at either end of the range come
    from the window, exact when no evicted record falls in them (always when ``since >
    horizon``). ``read`` returns records of the window only. Ranges are ``since <= ts < until``;
    rows are sorted by key."""

    def __init__(self, max_records: int = 20_000) -> None:
        if max_records < 1:
            raise ValueError(f"max_records must be at least 1, got {max_records}")
        self.max_records = max_records
        self.evicted = 0
        self.horizon = float("-inf")
        self._records: deque[bytes] = deque()
        self._stamps: deque[float] = deque()   # the ts of each record in the window, in the same order
        self._rollups: dict[tuple[int, str, str], Counter[str]] = {}   # (days since the epoch, team, model)

    async def append(self, records: Sequence[LedgerRecord]) -> None:
        for r in records:
            day = int(r.ts // DAY_S)
            row = self._rollups.get((day, r.team, r.model))
            if row is None:
                row = self._rollups[(day, r.team, r.model)] = Counter()
            for name, value in counters(r).items():   # plain adds: Counter.update is a slow path
                row[name] += value
            self._records.append(bytes(memoryview(r.to_json())))   # an exact-size copy, see the docstring
            self._stamps.append(r.ts)
        excess = len(self._records) - self.max_records
        for _ in range(max(0, excess)):
            self._records.popleft()
            self.horizon = max(self.horizon, self._stamps.popleft())
        self.evicted += max(0, excess)

    def __len__(self) -> int:
        """Records in the window."""
        return len(self._records)

    def _window(self, since: float, until: float | None, team: str | None) -> list[LedgerRecord]:
        if until is not None and until <= since:
            return []
        records = (LedgerRecord.from_json(raw) for raw, ts in zip(self._records, self._stamps, strict=True)
                   if since <= ts and (until is None or ts < until))
        return [r for r in records if team is None or r.team == team]

    async def read(self, since: float, until: float | None = None, team: str | None = None) -> list[LedgerRecord]:
        return sorted(self._window(since, until, team), key=lambda r: r.ts)

    async def totals(self, since: float, until: float | None = None, team: str | None = None,
                     by: str = "team") -> list[dict[str, Any]]:
        totals = _Totals(by)
        first = -int(-since // DAY_S)                              # the first whole day in the range
        end = None if until is None else int(until // DAY_S)      # the day after the last whole one
        if end is not None and end <= first:                      # no whole day: all from the window
            records = self._window(since, until, team)
        else:
            for (day, row_team, model), row in self._rollups.items():
                if first <= day and (end is None or day < end) and (team is None or row_team == team):
                    key = row_team if by == "team" else model if by == "model" else day_of(day * DAY_S, "%Y-%m-%d")
                    totals.add(key, row)
            records = self._window(since, first * DAY_S, team)
            if end is not None:
                records += self._window(end * DAY_S, until, team)
        for r in records:
            totals.add_record(r)
        return totals.result()

    async def aclose(self) -> None:
        return None


def roll_key(team: str, day: str) -> str:  # the hash tag of the team's budget keys; quote: no ':{} '
    return f"gw:v1:roll:{{team:{quote(team, safe='')}}}:{day}"


def rollm_key(model: str, day: str) -> str:
    return f"gw:v1:rollm:{quote(model, safe='')}:{day}"


def _tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: the first non-empty ``{...}``, else the whole key."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1:end] if start >= 0 and end > start + 1 else key


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# KEYS[1] = the batch marker; ARGV[1] = marker TTL s, ARGV[2] = stream MAXLEN ('0': none); then ops,
# each: code ('x' XADD, 'h' HINCRBY pairs, 's' SADD, 'c' open-request claims), index into KEYS, count n, n
# arguments. A 'c' op (first, if any) holds (hold id, 'o' own record | 's' swept) pairs: a swept record needs
# its entry swept ('S'), an own record one not swept ('S', or 'W': written by the sweep); when one does not,
# nothing is applied and the reply lists those hold ids. Else own entries are removed (an own entry already
# missing, e.g. a Redis that lost its data, does not stop its record) and swept ones become 'W<worker> <time>'
# tombstones (a stalled worker's late batch, or its spool adopted later, cannot write them again), dropped a
# day later by the sweep.
_APPLY = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local i = 3
if ARGV[3] == 'c' then
  local key, n = KEYS[tonumber(ARGV[4])], tonumber(ARGV[5])
  local gone = {}
  for j = 6, 5 + n, 2 do
    local e = redis.call('HGET', key, ARGV[j])
    local k = e and string.sub(e, 1, 1)
    if ARGV[j + 1] == 's' then
      if k ~= 'S' then gone[#gone + 1] = ARGV[j] end
    elseif k == 'S' or k == 'W' then gone[#gone + 1] = ARGV[j] end
  end
  if #gone > 0 then return gone end
  for j = 6, 5 + n, 2 do
    local e = redis.call('HGET', key, ARGV[j])
    if ARGV[j + 1] == 's' then
      local w = string.sub(e, 2, (string.find(e, ' ', 1, true) or (#e + 1)) - 1)
      redis.call('HSET', key, ARGV[j], 'W' .. w .. ' ' .. redis.call('TIME')[1])
    elseif e then
      redis.call('HDEL', key, ARGV[j])
    end
  end
  i = 6 + n
end
while i <= #ARGV do
  local op, key, n = ARGV[i], KEYS[tonumber(ARGV[i + 1])], tonumber(ARGV[i + 2])
  local first, last = i + 3, i + 2 + n
  if op == 'x' and ARGV[2] == '0' then
    for j = first, last do redis.call('XADD', key, '*', 'r', ARGV[j]) end
  elseif op == 'x' then
    for j = first, last do redis.call('XADD', key, 'MAXLEN', '~', ARGV[2], '*', 'r', ARGV[j]) end
  elseif op == 'h' then
    for j = first, last, 2 do redis.call('HINCRBY', key, ARGV[j], ARGV[j + 1]) end
  else
    for j = first, last do redis.call('SADD', key, ARGV[j]) end
  end
  i = last + 1
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
return 1
"""


# A cluster's claim of the open entries of one slot for a ledger batch (its records with a ``hold_id`` there):
# KEYS[1] = the batch's finalized marker, then the slot's open hashes; ARGV: batch, writer, n, then per record
# (index into KEYS, field, 'o' own | 's' swept, its payload). 0 when the batch was finalized before; the
# 0-based indexes of the records whose entries are in another state (nothing changed then; as _APPLY's 'c'
# op, plus: an entry another batch claims is gone, one this batch claimed is fine); else 1, each entry
# now 'B<writer> <batch> <index> <n> <owner> <payload>', so the batch can be written again, the same, by a live
# worker if its writer dies.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local batch, writer, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local gone = {}
for i = 0, n - 1 do
  local a = 4 + 4 * i
  local e = redis.call('HGET', KEYS[tonumber(ARGV[a])], ARGV[a + 1])
  local k = e and string.sub(e, 1, 1)
  if k == 'B' then
    if string.match(e, '^B%S+ (%S+)') ~= batch then gone[#gone + 1] = i end
  elseif ARGV[a + 2] == 's' then
    if k ~= 'S' then gone[#gone + 1] = i end
  elseif k == 'S' or k == 'W' then gone[#gone + 1] = i end
end
if #gone > 0 then return gone end
for i = 0, n - 1 do
  local a = 4 + 4 * i
  local key = KEYS[tonumber(ARGV[a])]
  local e = redis.call('HGET', key, ARGV[a + 1])
  if not e or string.sub(e, 1, 1) ~= 'B' then
    local owner = writer
    if e then owner = string.sub(e, 2, (string.find(e, ' ', 1, true) or (#e + 1)) - 1) end
    redis.call('HSET', key, ARGV[a + 1],
               'B' .. writer .. ' ' .. batch .. ' ' .. i .. ' ' .. n .. ' ' .. owner .. ' ' .. ARGV[a + 3])
  end
end
return 1
"""

# Once every part of a claimed batch is written: its entries go (own) or become tombstones (swept), and the
# finalized marker is set. KEYS as _CLAIM; ARGV: batch, marker TTL s, n, then per record (index, field, kind).
_FINAL = """
local batch, n = ARGV[1], tonumber(ARGV[3])
local now = redis.call('TIME')[1]
for i = 0, n - 1 do
  local a = 4 + 3 * i
  local key = KEYS[tonumber(ARGV[a])]
  local e = redis.call('HGET', key, ARGV[a + 1])
  if e and string.sub(e, 1, 1) == 'B' and string.match(e, '^B%S+ (%S+)') == batch then
    if ARGV[a + 2] == 's' then
      redis.call('HSET', key, ARGV[a + 1], 'W' .. string.match(e, '^B%S+ %S+ %S+ %S+ (%S+)') .. ' ' .. now)
    else
      redis.call('HDEL', key, ARGV[a + 1])
    end
  end
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[2])
return 1
"""

UNIT = 16_384   # a cluster's claimed records of one slot are written as one unit: reported as UNIT + that slot


class RedisLedger:
    """The ledger in Redis or Redis Cluster. ``atomic`` (default: not a cluster client) applies a
    batch as one script; otherwise one script per hash slot. ``max_skew_s`` bounds how far a record's
    ``ts`` may run ahead of the Redis clock that stamps its stream id (stream reads start there).

    Worker leases: on one Redis (``open_key``), a batch's records with a ``hold_id`` are claimed in the same
    script. On a cluster (``writer``: this worker's id), a record's open entry lives in its team's slot (or
    the slot of its request's last hold) while its writes span other slots, so its records are written in
    units, one per slot of open entries: claim (:data:`_CLAIM`: the entries name the unit and keep its
    payloads), the unit's parts (as any batch's, idempotent by their markers), then finalize
    (:data:`_FINAL`). A writer that dies in between leaves claimed entries from which a live worker writes
    the very same unit again (:meth:`recover`): a part already written is a no-op, so each record is
    written once whoever finishes it."""

    def __init__(self, client: Any, stream_maxlen: int | None = None, *, atomic: bool | None = None,
                 dedup_ttl_s: int = DAY_S, max_skew_s: float = 300.0, open_key: str | None = None,
                 writer: str | None = None, fast: Any = None) -> None:
        self._r = client
        self.stream_maxlen = stream_maxlen
        self.atomic = not isinstance(client, RedisCluster) if atomic is None else atomic
        self.fast = fast if self.atomic else None   # one Redis: a FastRedis that writes the batches (packed in C)
        self.dedup_ttl_s = dedup_ttl_s
        self.max_skew_s = max_skew_s
        self.open_key = open_key if self.atomic else None   # worker leases: records wait there until written
        self.writer = writer if not self.atomic else None   # a cluster's worker leases: see above
        self.left_out = 0                                    # records another worker's batch wrote (see above)
        self._rolls: dict[tuple[str, str, str], tuple[str, str]] = {}   # rollup key names made

    def _roll_keys(self, team: str, model: str, day: str) -> tuple[str, str]:
        """(the team's, the model's) rollup hash of ``day``, made once each (bounded)."""
        name = (team, model, day)
        keys = self._rolls.get(name)
        if keys is None:
            if len(self._rolls) >= 4096:
                self._rolls.clear()
            keys = self._rolls[name] = (roll_key(team, day), rollm_key(model, day))
        return keys

    async def append(self, records: Sequence[LedgerRecord]) -> None:
        _, outcomes = await self.append_parts(records)
        for exc in outcomes.values():
            if exc is not None:
                raise exc

    def _parts(self, records: Sequence[LedgerRecord], payloads: list[bytes] | None = None
               ) -> dict[int, tuple[str, list[str], list[Any]]]:
        """The batch's writes per hash slot (one part, slot 0, when ``atomic``): the part's marker, keys and
        script arguments. The marker is derived from the whole batch, so a part re-sent later is a no-op."""
        payloads = [r.to_json() for r in records] if payloads is None else payloads
        batch = hashlib.sha256(b"\n".join(payloads)).hexdigest()[:32]  # same batch, same marker
        days: dict[int, str] = {}
        rolled: dict[str, list[LedgerRecord]] = {}   # rollup hash -> its records
        sets: dict[str, set[str]] = {}
        for r in records:
            number = int(r.ts // DAY_S)
            day = days.get(number)
            if day is None:
                day = days[number] = day_of(r.ts)
                sets[f"gw:v1:rollidx:teams:{day}"] = set()
                sets[f"gw:v1:rollidx:models:{day}"] = set()
            team_key, model_key = self._roll_keys(r.team, r.model, day)
            rolled.setdefault(team_key, []).append(r)
            rolled.setdefault(model_key, []).append(r)
            sets[f"gw:v1:rollidx:teams:{day}"].add(r.team)
            sets[f"gw:v1:rollidx:models:{day}"].add(r.model)
        hashes = {key: summed(rs) for key, rs in rolled.items()}
        ops: dict[str, tuple[str, list[Any]]] = {}
        if self.open_key is not None and any(r.hold_id for r in records):
            ops[self.open_key] = ("c", [x for r in records if r.hold_id for x in claim_of(r.hold_id)])
        ops[STREAM] = ("x", payloads)
        ops |= {k: ("h", [x for field, n in c.items() if n for x in (field, n)]) for k, c in hashes.items()}
        ops |= {k: ("s", sorted(members)) for k, members in sets.items()}
        groups: dict[int, list[str]] = {}
        for key in ops:
            groups.setdefault(0 if self.atomic else key_slot(key.encode()), []).append(key)
        parts: dict[int, tuple[str, list[str], list[Any]]] = {}
        for slot, keys in groups.items():
            args: list[Any] = [self.dedup_ttl_s, self.stream_maxlen or 0]
            for index, key in enumerate(keys, start=2):
                args += [ops[key][0], index, len(ops[key][1]), *ops[key][1]]
            parts[slot] = (f"gw:v1:dedup:{{{_tag(keys[0])}}}:{batch}", keys, args)
        return parts

    async def append_parts(self, records: Sequence[LedgerRecord], skip: AbstractSet[int] = frozenset(),
                           down: dict[str, BaseException] | None = None
                           ) -> tuple[frozenset[int], dict[int, BaseException | None]]:
        """Write the batch's parts whose slot is not in ``skip``; returns every slot the batch touches and, for
        each part attempted, None (written, or written before) or the error it failed with. On a cluster the
        parts go in one pipeline per master, so a master that is down fails only its own slots' parts.
        ``down``: the masters that failed earlier in the caller's pass (name -> error), updated here; their
        parts are reported failed without being sent, so a dead master costs one attempt per pass."""
        if not records:
            return frozenset(), {}
        if self.atomic and 0 in skip:
            return frozenset({0}), {}
        if self.open_key is not None or self.writer is not None:
            records = self._once_per_entry(records)
        down = {} if down is None else down
        if self.writer is not None and any(r.hold_id for r in records):
            return await self._append_units(records, skip, down)
        parts = self._parts(records)
        outcomes: dict[int, BaseException | None] = {}
        by_node: dict[str, list[int]] = {}
        for slot, (marker, _, _) in parts.items():
            if slot not in skip:
                node = self._node_of(marker)
                if node in down:
                    outcomes[slot] = down[node]
                else:
                    by_node.setdefault(node, []).append(slot)

        async def send(slots: list[int]) -> set[str]:
            if self.fast is not None:   # one Redis: the one part, packed in C
                marker, keys, args = parts[slots[0]]
                replies = [await self.fast.execute_command("EVAL", _APPLY, len(keys) + 1, marker, *keys, *args)]
            else:
                pipe = self._r.pipeline(transaction=False)
                for slot in slots:
                    marker, keys, args = parts[slot]
                    pipe.eval(_APPLY, len(keys) + 1, marker, *keys, *args)
                replies = await pipe.execute()
            gone: set[str] = set()
            for reply in replies:
                if isinstance(reply, list):   # open entries in another state: nothing of the part was applied
                    gone.update(_text(h) for h in reply)
            return gone

        nodes = list(by_node.items())
        results: list[set[str] | BaseException | None]
        if len(nodes) == 1:   # one Redis (or one master): no tasks
            try:
                gone = await send(nodes[0][1])
                results = [None]
            except Exception as exc:
                gone, results = set(), [exc]
            if gone:   # worker leases (one Redis): written by another worker's batch; each pass drops one at least
                self.left_out += len(gone)
                log.warning("%d ledger records were written by another worker's batch; left out", len(gone))
                return await self.append_parts([r for r in records if claim_of(r.hold_id)[0] not in gone], skip,
                                               down)
        else:
            results = list(await asyncio.gather(*(send(slots) for _, slots in nodes), return_exceptions=True))
        for (node, slots), result in zip(nodes, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException) and retryable(result):
                down[node] = result
            for slot in slots:
                outcomes[slot] = result if isinstance(result, BaseException) else None
        return frozenset(parts), outcomes

    def _once_per_entry(self, records: Sequence[LedgerRecord]) -> Sequence[LedgerRecord]:
        """The batch with each open entry's record once (the first): two sweeps of one dead worker (its sweep
        lock lapsed between them) find the same records, and the scripts check an entry's state, not how often
        one batch names it. The others count as left out."""
        seen: set[str] = set()
        once: list[LedgerRecord] = []
        for r in records:
            if r.hold_id:
                entry = claim_of(r.hold_id)[0]
                if entry in seen:
                    continue
                seen.add(entry)
            once.append(r)
        if len(once) == len(records):
            return records
        self.left_out += len(records) - len(once)
        log.warning("%d ledger records named an open entry a batch named before; left out", len(records) - len(once))
        return once

    async def _append_units(self, records: Sequence[LedgerRecord], skip: AbstractSet[int],
                            down: dict[str, BaseException]) -> tuple[frozenset[int], dict[int, BaseException | None]]:
        """A cluster with worker leases: the records without a ``hold_id`` as any batch, the others in units
        (see the class), concurrently; a unit's outcome is reported as ``UNIT + its slot``."""
        plain = [r for r in records if not r.hold_id]
        units: dict[int, list[LedgerRecord]] = {}
        for r in records:
            if r.hold_id:
                key = open_ref(claim_of(r.hold_id)[0])[0]
                units.setdefault(UNIT + key_slot(key.encode()), []).append(r)
        slots, outcomes = await self.append_parts(plain, skip, down) if plain else (frozenset(), {})
        todo = [unit for unit in units if unit not in skip]
        results = await asyncio.gather(*(self._write_unit(units[u]) for u in todo), return_exceptions=True)
        for unit, result in zip(todo, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            outcomes[unit] = result if isinstance(result, BaseException) else None
        return slots | frozenset(units), outcomes

    @staticmethod
    def _unit_args(records: Sequence[LedgerRecord]) -> tuple[list[str], list[tuple[int, str, str]]]:
        """(the unit's open hashes, (index into KEYS, field, kind) per record), in the records' order."""
        keys: list[str] = []
        refs: list[tuple[int, str, str]] = []
        for r in records:
            entry, kind = claim_of(r.hold_id)
            key, name = open_ref(entry)
            if key not in keys:
                keys.append(key)
            refs.append((keys.index(key) + 2, name, kind))
        return keys, refs

    @staticmethod
    def _unit_batch(payloads: Sequence[bytes]) -> str:
        return hashlib.sha256(b"\n".join(payloads)).hexdigest()[:32]

    async def _write_unit(self, records: Sequence[LedgerRecord]) -> None:
        """Claim, write and finalize one unit (raises what failed; a retry repeats it, idempotently)."""
        assert self.writer is not None
        left = list(records)
        while left:
            payloads = [r.to_json() for r in left]
            batch = self._unit_batch(payloads)
            keys, refs = self._unit_args(left)
            marker = f"gw:v1:dedup:{{{_tag(keys[0])}}}:{batch}:f"
            args: list[Any] = [batch, self.writer, len(left)]
            for (index, name, kind), payload in zip(refs, payloads, strict=True):
                args += [index, name, kind, payload]
            reply = await self._r.eval(_CLAIM, 1 + len(keys), marker, *keys, *args)
            if reply == 0:          # finalized before: written
                return
            if isinstance(reply, list):   # taken by another worker's batch (or the sweep): left out
                gone = {int(i) for i in reply}
                self.left_out += len(gone)
                log.warning("%d ledger records were written by another worker's batch; left out", len(gone))
                left = [r for i, r in enumerate(left) if i not in gone]
                continue
            await self._finish_unit(left, payloads)
            return

    async def _finish_unit(self, records: Sequence[LedgerRecord], payloads: list[bytes]) -> None:
        """Write a claimed unit's parts (each a no-op if written before), then finalize it."""
        batch = self._unit_batch(payloads)
        keys, refs = self._unit_args(records)
        pipe = self._r.pipeline(transaction=False)
        for marker, part_keys, args in self._parts(records, payloads).values():
            pipe.eval(_APPLY, len(part_keys) + 1, marker, *part_keys, *args)
        await pipe.execute()
        final: list[Any] = [batch, self.dedup_ttl_s, len(records)]
        for ref in refs:
            final += ref
        await self._r.eval(_FINAL, 1 + len(keys), f"gw:v1:dedup:{{{_tag(keys[0])}}}:{batch}:f", *keys, *final)

    async def recover(self, payloads: Sequence[bytes]) -> int:
        """Write again, the same, a unit a dead writer claimed (its payloads in order, from its claimed entries)
        and finalize it; returns its records."""
        records = [LedgerRecord.from_json(p) for p in payloads]
        await self._finish_unit(records, list(payloads))
        return len(records)

    def _node_of(self, key: str) -> str:
        """The master serving ``key`` (empty on one Redis, or before the cluster's map is known)."""
        if self.atomic:
            return ""
        try:
            node = self._r.get_node_from_key(key)
        except Exception:   # the slot map is not loaded yet: one pipeline, which loads it
            return ""
        return str(node.name) if node is not None else ""

    async def _scan(self, since: float) -> AsyncIterator[LedgerRecord]:
        """Stream entries stamped from ``since - max_skew_s`` on (entries flushed late carry later ids)."""
        low = f"{max(0, int((since - self.max_skew_s) * 1000))}-0"
        for _ in range(int(await self._r.xlen(STREAM)) // _PAGE + 2):  # the entries present at the start
            entries = await self._r.xrange(STREAM, min=low, max="+", count=_PAGE)
            for _entry_id, values in entries:
                raw = values.get(b"r", values.get("r"))
                if raw is not None:
                    yield LedgerRecord.from_json(raw)
            if len(entries) < _PAGE:
                return
            low = "(" + _text(entries[-1][0])

    async def read(self, since: float, until: float | None = None, team: str | None = None) -> list[LedgerRecord]:
        return sorted([r async for r in self._scan(since) if _matches(r, since, until, team)], key=lambda r: r.ts)

    async def totals(self, since: float, until: float | None = None, team: str | None = None,
                     by: str = "team", *, source: str = "auto") -> list[dict[str, Any]]:
        """``source``: ``auto`` (rollups for whole UTC days, else the stream), ``stream`` or ``rollup``."""
        if source not in ("auto", "stream", "rollup"):
            raise ValueError(f"source must be auto, stream or rollup, got {source!r}")
        totals = _Totals(by)
        days = None if by == "model" and team is not None else self._whole_days(since, until)
        if source == "rollup" and days is None:
            raise ValueError("rollups need whole UTC days, and have no per-team per-model split")
        if source == "stream" or days is None:
            async for r in self._scan(since):
                if _matches(r, since, until, team):
                    totals.add_record(r)
        else:
            await self._add_rollups(totals, days, team)
        return totals.result()

    @staticmethod
    def _whole_days(since: float, until: float | None) -> list[float] | None:
        end = until if until is not None else (datetime.now(UTC).timestamp() // DAY_S + 2) * DAY_S
        if since % DAY_S or end % DAY_S or not 0 < end - since <= _MAX_ROLLUP_DAYS * DAY_S:
            return None
        return [since + i * DAY_S for i in range(int((end - since) // DAY_S))]

    async def _add_rollups(self, totals: _Totals, days: list[float], team: str | None) -> None:
        pairs = [(team, day) for day in days]
        if team is None:
            pipe = self._r.pipeline(transaction=False)
            for day in days:
                pipe.smembers(f"gw:v1:rollidx:{'models' if totals.by == 'model' else 'teams'}:{day_of(day)}")
            members = await pipe.execute()
            pairs = [(_text(name), day) for day, names in zip(days, members, strict=True) for name in names]
        pipe = self._r.pipeline(transaction=False)
        for name, day in pairs:
            pipe.hgetall((rollm_key if totals.by == "model" else roll_key)(str(name), day_of(day)))
        for (name, day), row in zip(pairs, await pipe.execute(), strict=True):
            if row:
                key = day_of(day, "%Y-%m-%d") if totals.by == "day" else str(name)
                totals.add(key, {_text(k): int(v) for k, v in row.items()})

    async def aclose(self) -> None:
        await self._r.aclose()


_RETRYABLE = (rexc.ConnectionError, rexc.TimeoutError, rexc.ReadOnlyError, rexc.TryAgainError, rexc.ClusterError,
              rexc.RedisClusterException, OSError, TimeoutError, sqlite3.OperationalError)
_RETRYABLE_REPLIES = ("OOM", "MISCONF", "LOADING", "BUSY", "NOREPLICAS", "MASTERDOWN", "CLUSTERDOWN")


def retryable(exc: BaseException) -> bool:
    """Whether a write failure is worth retrying (Redis unreachable, failing over, out of memory; the
    SQLite database locked beyond its busy timeout, or its disk full)."""
    if isinstance(exc, _RETRYABLE):
        return True
    return isinstance(exc, rexc.ResponseError) and str(exc).split(" ", 1)[0] in _RETRYABLE_REPLIES


@runtime_checkable
class SlottedLedger(Protocol):
    """A ledger that writes a batch in parts, one per hash slot (:meth:`RedisLedger.append_parts`)."""

    async def append_parts(self, records: Sequence[LedgerRecord], skip: AbstractSet[int] = frozenset(),
                           down: dict[str, BaseException] | None = None
                           ) -> tuple[frozenset[int], dict[int, BaseException | None]]: ...


@dataclass(slots=True, eq=False)
class _Queued:
    records: list[LedgerRecord]
    slots: frozenset[int] | None = None      # every slot the batch writes to (None: not tried yet)
    done: set[int] = field(default_factory=set)   # the slots whose part is written
    finished: bool = False                   # every part written (or the batch rejected)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def complete(self) -> bool:
        return self.slots is not None and self.slots <= self.done


class BufferedLedger:
    """``append`` never raises: each batch is queued in memory, unchanged (so a retry carries the same
    dedup marker), and written oldest first; a failed write leaves it queued for ``flush()``, which the
    pipeline calls periodically and at shutdown. Past ``max_buffer`` records the oldest batches are
    dropped (``dropped``); a batch failing for a non-retryable reason is logged with its records and
    discarded (``rejected``) rather than blocking the queue. Reads see only written records.

    A ledger that writes per hash slot (Redis Cluster, :class:`SlottedLedger`) is written per slot: a
    batch's part in a slot whose master is down waits (and later batches' parts in that slot wait
    behind it, so each slot keeps its order), while the parts in the other slots are written at once,
    so one dead master stalls only the teams, models and days it holds. A batch counts as written
    (``pending`` drops) once every part is. Failures are logged once, then at most every 30 s, and
    once more when the backlog is written (:class:`~gateway.state.outage_log.OutageLog`).

    With a ``spool`` (:mod:`gateway.state.spool`, ``GATEWAY_SPOOL_DIR``) nothing is dropped and a crash
    loses nothing: a failed write moves every queued batch to local disk (after its parts in healthy
    slots were tried), as does a full buffer, and ``flush`` writes the spooled batches back first,
    oldest first, up to the first that cannot be completed yet.

    ``on_stored`` (set by the state when it keeps intents of unmetered requests,
    :class:`~gateway.state.spool.IntentSpool`) is told of each queued batch once it leaves memory:
    written (or rejected, or left out as written by another worker), moved to the spool, or dropped."""

    def __init__(self, inner: Ledger, max_buffer: int = 100_000, spool: Spool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.max_buffer = max_buffer
        self.spool = spool
        self.on_stored: Callable[[Sequence[LedgerRecord]], None] | None = None
        self.dropped = self.rejected = self._pending = 0
        self._batches: deque[_Queued] = deque()
        self._lock = asyncio.Lock()
        self.outage = OutageLog(log, "ledger write", clock=clock)
        self.waiting_slots = 0   # slots (one, off a cluster) whose writes failed in the last flush

    @property
    def pending(self) -> int:
        return self._pending + (self.spool.records if self.spool is not None else 0)

    async def append(self, records: Sequence[LedgerRecord]) -> None:
        if records:
            self._enqueue(list(records))
            if len(self._batches) == 1:  # no backlog: write now; behind one, wait for flush()
                await self.flush()

    async def flush(self, wait: bool = False) -> int:
        """Write spooled, then queued batches oldest first, each slot until its first failure; returns how
        many records were written. If a flush is already running, return at once, or with ``wait`` let it
        finish and then flush (a reader that needs every record queued so far to be written, or to have
        failed)."""
        if self._lock.locked() and not wait:
            return 0  # a flush is running and will take the new batches too
        written = 0
        failed: dict[int, BaseException] = {}   # slots that failed in this pass: later parts there wait
        down: dict[str, BaseException] = {}     # masters that failed in this pass: not tried again in it
        async with self._lock:
            while self.spool is not None and (records := self.spool.next_batch()) is not None:
                if not await self._write(_Queued(records), failed, down):
                    break
                self.spool.written(records)
                written += len(records)
            for batch in list(self._batches):   # each batch once: written, or its waiting parts skipped
                batch.finished = await self._write(batch, failed, down)
            if any(batch.finished for batch in self._batches):   # (appends during the pass are not finished)
                left: deque[_Queued] = deque()
                for batch in self._batches:
                    if batch.finished:
                        written += len(batch)
                        self._pending -= len(batch)
                        if self.on_stored is not None:
                            self.on_stored(batch.records)
                    else:
                        left.append(batch)
                self._batches = left
            self.waiting_slots = len(failed)
            if failed:
                self._spill(keep=0)
                self.outage.failed(next(iter(failed.values())), self.pending)
            elif not self.pending:
                self.outage.succeeded()
        return written

    async def _write(self, batch: _Queued, failed: dict[int, BaseException], down: dict[str, BaseException]) -> bool:
        """Write the parts of ``batch`` not written yet, except in slots that failed in this pass (recorded in
        ``failed``); True once every part is written (or the batch was rejected)."""
        if batch.slots is not None and batch.slots - batch.done <= failed.keys():
            return False   # every part left waits behind an earlier one: not even tried
        outcomes: dict[int, BaseException | None] = {}
        if isinstance(self.inner, SlottedLedger):
            try:
                batch.slots, outcomes = await self.inner.append_parts(batch.records, batch.done | failed.keys(), down)
            except Exception as exc:   # before any part was sent (the parts could not be formed)
                outcomes = {-1: exc}   # no slot of its own: later batches are still tried
        else:
            batch.slots = frozenset({0})
            if 0 not in failed:
                try:
                    await self.inner.append(batch.records)
                    outcomes[0] = None
                except Exception as exc:
                    outcomes[0] = exc
        for slot, error in outcomes.items():
            if error is None:
                batch.done.add(slot)
            elif retryable(error):
                failed.setdefault(slot, error)
            else:
                self.rejected += len(batch)
                log.error("ledger rejected %d records (%r): %s", len(batch), error,
                          [r.to_json().decode() for r in batch.records])
                return True
        return batch.complete

    def _spill(self, keep: int) -> None:
        """With a spool, move the queued batches after the first ``keep`` to disk."""
        if self.spool is None or len(self._batches) <= keep:
            return
        moving = list(self._batches)[keep:]
        self.spool.spill([b.records for b in moving])
        for _ in moving:
            self._batches.pop()
        self._pending -= sum(len(b) for b in moving)
        if self.on_stored is not None:
            for b in moving:
                self.on_stored(b.records)

    def _enqueue(self, records: list[LedgerRecord]) -> None:
        self._batches.append(_Queued(records))
        self._pending += len(records)
        if self._pending > self.max_buffer and self.spool is not None:
            self._spill(keep=1 if self._lock.locked() else 0)   # never the batch a flush is writing
        while self._pending > self.max_buffer and len(self._batches) > 1:
            victim = 1 if self._lock.locked() else 0  # never the batch a flush is writing
            lost = self._batches[victim]
            del self._batches[victim]
            self._pending -= len(lost)
            self.dropped += len(lost)
            if self.on_stored is not None:
                self.on_stored(lost.records)
            log.error("ledger buffer full: dropped %d records (%s...)", len(lost), lost.records[0].request_id)

    async def read(self, since: float, until: float | None = None, team: str | None = None) -> list[LedgerRecord]:
        return await self.inner.read(since, until, team)

    async def totals(self, since: float, until: float | None = None, team: str | None = None,
                     by: str = "team") -> list[dict[str, Any]]:
        return await self.inner.totals(since, until, team, by)

    async def aclose(self) -> None:
        await self.flush()
        await self.inner.aclose()
        if self.spool is not None:
            self.spool.close()
