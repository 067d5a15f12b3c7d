"""Redis / Redis Cluster :class:`BudgetStore`: one versioned Lua script does each operation in one round trip.

``budget_script.lua`` is loaded once, best effort, with SCRIPT LOAD (every primary, on a
cluster) and run with EVALSHA, falling back to EVAL when a node answers NOSCRIPT (restart,
failover, SCRIPT FLUSH, or a node that was down at load time). ``ARGV[1]`` selects
reserve, settle, renew or usage; ``ARGV[2]`` carries :data:`SCRIPT_VERSION`, which the script
checks and which is also part of every key: ``gw:v2:{team:<team>}:...``. The hash tag
makes the team's keys of one request (team and key budgets and rate windows, the reservation
record) share a slot; end-user, tag and session buckets and windows are shared by every team
and carry their own tag (``gw:v2:{user:<id>}:...``). On one Redis a request's keys all go to
one script call. A Redis Cluster refuses a script over several slots, so there a request
that names them is split by hash tag and reserved in two phases: each slot holds atomically in
its own script call (end users', tags', sessions' first, the team's last, each passing on the
possibly capped amount); a refusal releases the holds already taken (compensation: the
script's ``release``, which also gives back the request and tokens those slots counted against
their RPM/TPM windows, when still in the same minute), and a
crash in between leaves holds that expire with the reservation TTL. Each slot keeps its own
reservation record and settled marker, so settle and renew are per slot and replay-safe. Names inside keys are
percent-encoded so ``:``, ``{`` and ``}`` in a team or key id cannot break the layout.
The store can tie holds to a worker lease (``worker``): the reserve call also writes the request's
intent into ``gw:v2:open`` and renews the worker's lease in ``gw:v2:workers``, the settle call
leaves the final ledger record there until the ledger batch that writes it removes it, and
:mod:`gateway.state.leases` sweeps a dead worker's entries with :meth:`RedisBudgetStore.sweep`: all
in the same script calls, no extra round trip per request. On a cluster the intent goes into the
open hash of the slot of the reserve call that carries it (``<tag>:open``: the request's last call,
the team's, with the final amount), named once per process in ``gw:v2:openidx``; the lease is
renewed apart (:mod:`gateway.state.leases`); a settle with its record, and a sweep, first settle that
slot (the decision), then the request's other slots.
Redis and cluster errors surface as :class:`StateUnavailable`; the pipeline picks the
fail mode. :meth:`RedisBudgetStore.aclose` closes the client it was given.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from importlib import resources
from typing import Any
from urllib.parse import quote

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from gateway.state.budgets import (
    CROSS_SCOPES,
    Admission,
    BudgetRule,
    BudgetUsage,
    Plan,
    PlanBook,
    RateRule,
    RateStatus,
    ReserveRequest,
    StateUnavailable,
    admission_from_reply,
    check_amount,
    check_budget_rule,
    period_id,
    plan,
)
from gateway.state.ledger import hold_ref, open_ref
from gateway.state.resp import FastRedis

SCRIPT_VERSION = "v2"
SCRIPT = resources.files("gateway.state").joinpath("budget_script.lua").read_text(encoding="utf-8")
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode(), usedforsecurity=False).hexdigest()
PREFIX = "gw"
KEYS_REMEMBERED = 10_000   # (team, scope, owner, period) key names a store keeps made
OPEN_KEY = f"{PREFIX}:{SCRIPT_VERSION}:open"          # hold id -> intent or unwritten record (worker leases)
WORKERS_KEY = f"{PREFIX}:{SCRIPT_VERSION}:workers"    # worker -> lease deadline, server ms
OPEN_INDEX = f"{PREFIX}:{SCRIPT_VERSION}:openidx"     # a cluster: the set of per-tag open hashes (``<tag>:open``)
OPENS_REMEMBERED = 100_000                            # open hashes a store remembers having registered
_ERRORS = (RedisError, RedisClusterException, OSError)
Prepared = tuple[list[str], list[int], list[int]]   # bucket and window keys, reserve and settle rule arguments


_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")   # what quote() leaves as it is


def _q(name: str) -> str:
    return name if _UNRESERVED.fullmatch(name) else quote(name, safe="")


def team_tag(team: str) -> str:
    """Prefix of every key of ``team``'s calls; the ``{...}`` part is the cluster hash tag."""
    return f"{PREFIX}:{SCRIPT_VERSION}:{{team:{_q(team)}}}"


def home_tag(team: str, scope: str, owner: str) -> str:
    """The tag a bucket or window lives under: its team's, or its own for an end user, tag or session."""
    if scope in CROSS_SCOPES:
        return f"{PREFIX}:{SCRIPT_VERSION}:{{{scope}:{_q(owner)}}}"
    return team_tag(team)


def bucket_keys(team: str, rule: BudgetRule, pid: str) -> tuple[str, str]:
    """(hash of spent/reserved/holds, zset of hold deadlines) of one budget period bucket."""
    tail = f"{_q(rule.scope)}:{_q(rule.owner)}:{pid}"
    tag = home_tag(team, rule.scope, rule.owner)
    return f"{tag}:bud:{tail}", f"{tag}:bres:{tail}"


def rate_key(team: str, scope: str, owner: str) -> str:
    return f"{home_tag(team, scope, owner)}:rl:{_q(scope)}:{_q(owner)}"


def open_key(tag: str) -> str:
    """A cluster's open hash of the requests whose intent lives under ``tag`` (a slot's hash tag)."""
    return f"{tag}:open"


def request_keys(team: str, request_id: str, tag: str | None = None) -> tuple[str, str]:
    """(reservation record, settled marker) of one request, under its team's tag (or ``tag``: on a
    cluster, every slot a request holds budget in keeps its own record and marker)."""
    tag = tag or team_tag(team)
    return f"{tag}:res:{_q(request_id)}", f"{tag}:done:{_q(request_id)}"


def merge_admissions(parts: Sequence[Admission], reserved: int) -> Admission:
    """One admission from the slots' own (all admitted): the least remaining, the tightest rate limits."""
    remaining = [a.remaining_nano for a in parts if a.remaining_nano is not None]

    def tightest(pairs: list[tuple[int | None, int | None]]) -> tuple[int | None, int | None]:
        known = [(lim, rem) for lim, rem in pairs if lim is not None and rem is not None]
        return min(known, key=lambda lr: lr[1]) if known else (None, None)

    lim_r, rem_r = tightest([(a.rate.limit_requests, a.rate.remaining_requests) for a in parts])
    lim_t, rem_t = tightest([(a.rate.limit_tokens, a.rate.remaining_tokens) for a in parts])
    return Admission(True, None, RateStatus(lim_r, rem_r, lim_t, rem_t), min(remaining) if remaining else None,
                     reserved)


class RedisBudgetStore:
    """Budgets and rate limits shared by every worker and replica through one Redis or Redis Cluster."""

    def __init__(self, client: Redis | RedisCluster | FastRedis, reservation_ttl_s: float = 600, *,
                 settled_ttl_s: int = 3_600, bucket_grace_s: int = 7 * 86_400,
                 partial_reservations: bool = True, worker: str | None = None, lease_s: float = 0.0) -> None:
        if reservation_ttl_s <= 0:
            raise ValueError("reservation_ttl_s must be > 0")
        self._r = client
        self.reservation_ttl_s = reservation_ttl_s
        self.settled_ttl_s = max(int(settled_ttl_s), int(reservation_ttl_s) + 1)
        self.bucket_grace_s = int(bucket_grace_s)
        self.partial_reservations = partial_reservations
        self._cluster = isinstance(client, RedisCluster)
        self._loaded = False
        self._keys: dict[tuple[str, str, str, str], tuple[str, ...]] = {}
        self._plans = PlanBook()   # one Redis: each request's plan, bucket keys and script arguments, by its rules
        # a worker lease: intents and unwritten records in OPEN_KEY (one Redis) or, on a cluster, in the open
        # hash of the slot whose reserve call takes the intent (the request's last part: its team's, mostly)
        self.worker = worker if worker and lease_s > 0 else None
        self.lease_ms = max(1, round(lease_s * 1000))
        self._opens: set[str] = set()   # a cluster: the open hashes this store registered in OPEN_INDEX

    @property
    def cluster(self) -> bool:
        return self._cluster

    async def _run(self, keys: list[str], args: list[Any]) -> Any:
        r: Any = self._r  # redis-py's stubs type commands for sync and async clients alike
        if not self._loaded:
            # Once, best effort: a primary that is down must not fail teams living on the others,
            # and any node without the script answers NOSCRIPT, which the EVAL fallback covers.
            self._loaded = True
            with contextlib.suppress(*_ERRORS):
                await r.script_load(SCRIPT)
        try:
            try:
                return await r.evalsha(SCRIPT_SHA, len(keys), *keys, *args)
            except NoScriptError:
                return await r.eval(SCRIPT, len(keys), *keys, *args)
        except _ERRORS as exc:
            raise StateUnavailable(f"budget store unavailable: {type(exc).__name__}: {exc}") from exc

    def _bucket_keys(self, team: str, p: Plan, rates: bool = True) -> list[str]:
        """The keys of ``p``'s budget buckets, then (with ``rates``) of its rate windows."""
        keys: list[str] = []
        made = self._keys
        for rule, pid in zip(p.budgets, p.period_ids, strict=True):
            name = (team, rule.scope, rule.owner, pid)
            pair = made.get(name)
            if pair is None:
                pair = self._remember(name, bucket_keys(team, rule, pid))
            keys.extend(pair)
        for r in p.rates if rates else ():
            name = (team, r.scope, r.owner, "rl")
            pair = made.get(name)
            if pair is None:
                pair = self._remember(name, (rate_key(team, r.scope, r.owner),))
            keys.extend(pair)
        return keys

    def _remember(self, name: tuple[str, str, str, str], keys: tuple[str, ...]) -> tuple[str, ...]:
        """Key names are the same for every request of a team, budget and period: made once each (bounded)."""
        if len(self._keys) >= KEYS_REMEMBERED:
            self._keys.clear()
        self._keys[name] = keys
        return keys

    def _split(self, req: ReserveRequest, p: Plan) -> list[tuple[str, ReserveRequest]] | None:
        """On a cluster, the request's parts per hash tag (end users', tags', sessions' first, the team's
        last), each with only its own rules; None when one script call can do it (one Redis, or every key
        under the team's tag)."""
        if not self._cluster:
            return None
        home = team_tag(req.team)
        groups: dict[str, tuple[list[BudgetRule], list[RateRule]]] = {}
        for b in p.budgets:
            groups.setdefault(home_tag(req.team, b.scope, b.owner), ([], []))[0].append(b)
        for r in p.rates:
            groups.setdefault(home_tag(req.team, r.scope, r.owner), ([], []))[1].append(r)
        if all(tag == home for tag in groups):
            return None
        order = [t for t in groups if t != home] + ([home] if home in groups else [])
        return [(t, replace(req, budgets=tuple(groups[t][0]), rates=tuple(groups[t][1]))) for t in order]

    async def reserve(self, req: ReserveRequest, intent: bytes = b"") -> Admission:
        """Hold ``req``'s worst case; with a worker lease, ``intent`` (what the ledger record of a request whose
        worker died needs) is written in the same script call."""
        if not self._cluster:   # one script call, its rule part made once per rules
            p, prepared = self._plans.get(req, self._prepare)
            return await self._reserve_at(None, req, p, intent, prepared)
        p = plan(req)
        parts = self._split(req, p)
        if self._cluster and intent and self.worker is not None:
            await self._register(open_key(parts[-1][0] if parts else team_tag(req.team)))
        if parts is None:
            return await self._reserve_at(None, req, p, intent)
        # Two phases across slots: each part holds atomically in its own slot, passing on the (possibly
        # capped) amount; a refusal or an error releases the parts already held (compensation). A crash
        # between the phases leaves holds that expire with the reservation TTL, like any dead replica's.
        # With a worker lease the last part's call writes the intent (with the final amount), in its slot.
        held: list[tuple[str, ReserveRequest]] = []
        admissions: list[Admission] = []
        amount = req.cost_nano
        try:
            for i, (tag, sub) in enumerate(parts):
                sub = replace(sub, cost_nano=min(sub.cost_nano, amount))
                adm = await self._reserve_at(tag, sub, plan(sub), intent if i == len(parts) - 1 else b"")
                if not adm.admitted:
                    await self._release(held)
                    return adm
                held.append((tag, sub))
                admissions.append(adm)
                if plan(sub).budgets:
                    amount = min(amount, adm.reserved_nano)
        except StateUnavailable:
            await self._release(held)
            raise
        return merge_admissions(admissions, amount)

    async def _register(self, key: str) -> None:
        """A cluster: name ``key`` in :data:`OPEN_INDEX` (once per process and key, before its first intent), so
        the sweep finds every open hash."""
        if key in self._opens:
            return
        try:
            r: Any = self._r   # a cluster client (FastRedis is for one server)
            await r.sadd(OPEN_INDEX, key)
        except _ERRORS as exc:
            raise StateUnavailable(f"budget store unavailable: {type(exc).__name__}: {exc}") from exc
        if len(self._opens) >= OPENS_REMEMBERED:
            self._opens.clear()
        self._opens.add(key)

    def hold_id(self, req: ReserveRequest) -> str:
        """The ``hold_id`` of ``req``'s ledger record: its open entry (on a cluster, ``<open hash> <request id>``)."""
        if not self._cluster:
            return req.request_id
        parts = self._split(req, plan(req))
        return hold_ref(open_key(parts[-1][0] if parts else team_tag(req.team)), req.request_id)

    def open_of(self, hold_id: str) -> tuple[str, str]:
        """(open hash, field) of a record's ``hold_id`` (without the ``swept:`` prefix)."""
        return open_ref(hold_id) if self._cluster else (OPEN_KEY, hold_id)

    async def _release(self, held: Sequence[tuple[str, ReserveRequest]]) -> None:
        """Compensation: give back the holds of a request refused in another slot (best effort: a hold
        that cannot be released now expires with the reservation TTL)."""
        for tag, sub in held:
            with contextlib.suppress(StateUnavailable):
                await self._settle_at(tag, sub, plan(sub), 0, 0, op="release")

    async def _reserve_at(self, tag: str | None, req: ReserveRequest, p: Plan, intent: bytes = b"",
                          prepared: Prepared | None = None) -> Admission:
        """One reserve script call (``prepared``: :meth:`_prepare` of ``p``, made already)."""
        buckets, rule_args, _ = prepared or self._prepare(p, req.team)
        keys = [*request_keys(req.team, req.request_id, tag), *buckets]
        args: list[Any] = [
            "reserve", SCRIPT_VERSION, req.request_id, req.cost_nano, req.tokens,
            max(1, round(self.reservation_ttl_s * 1000)), self._partial_min(req), self.bucket_grace_s, *rule_args]
        if intent and self.worker is not None:
            if self._cluster:   # the lease is renewed apart (its key is in another slot)
                keys.append(open_key(tag or team_tag(req.team)))
                args += [self.worker, 0, intent]
            else:
                keys += [OPEN_KEY, WORKERS_KEY]
                args += [self.worker, self.lease_ms, intent]
        return admission_from_reply(p, await self._run(keys, args))

    def _prepare(self, p: Plan, team: str) -> Prepared:
        """What every reserve and settle under ``p`` for ``team`` sends besides the request's own values: the
        bucket and window keys, the reserve's and the settle's rule arguments (on one Redis, made once per
        rules: :class:`PlanBook`)."""
        reserve: list[int] = [len(p.budgets), len(p.rates)]
        settle: list[int] = [len(p.budgets), len(p.rates)]
        for i, rule in enumerate(p.budgets):
            floor, keep = p.arg_pair(i, self.bucket_grace_s)
            reserve += [rule.limit_nano, floor, -1 if rule.soft_nano is None else rule.soft_nano, keep, p.windows_ms[i]]
            settle += [floor, keep, p.windows_ms[i]]
        for rate in p.rates:
            reserve += [-1 if rate.rpm is None else rate.rpm, -1 if rate.tpm is None else rate.tpm]
        return self._bucket_keys(team, p), reserve, settle

    def _partial_min(self, req: ReserveRequest) -> int:
        """0: the whole worst case must fit; n >= 1: admit with a capped hold when the headroom is at least n."""
        return max(1, min(req.min_cost_nano, req.cost_nano)) if self.partial_reservations and req.partial else 0

    async def settle(self, req: ReserveRequest, actual_cost_nano: int, actual_tokens: int,
                     record: bytes = b"") -> bool:
        """Charge the actual cost and release the hold; False if the request was settled already (a replay, or
        its worker was taken for dead and the request swept). With a worker lease, ``record`` (the final
        ledger record) stays in :data:`OPEN_KEY` until the ledger batch writing it lands."""
        check_amount("actual_cost_nano", actual_cost_nano)
        check_amount("actual_tokens", actual_tokens)
        if not self._cluster:
            p, prepared = self._plans.get(req, self._prepare)
            return await self._settle_at(None, req, p, actual_cost_nano, actual_tokens, record,
                                         prepared=prepared) == 1
        p = plan(req)
        parts = self._split(req, p)
        if parts is None:
            return await self._settle_at(None, req, p, actual_cost_nano, actual_tokens, record) == 1
        if record and self.worker is not None:
            # a worker lease: the slot with the intent first, atomically against a sweep of this request (which
            # then settles every slot at the hold); the intent stays after the record, for the other slots
            tag, sub = parts[-1]
            if await self._settle_at(tag, sub, plan(sub), actual_cost_nano, actual_tokens, record, keep=True) != 1:
                return False
            await self.settle_rest(req, actual_cost_nano, actual_tokens)
            return True
        # every slot settles once (its own settled marker): a replay after a partial failure is exact
        done = [await self._settle_at(tag, sub, plan(sub), actual_cost_nano, actual_tokens) for tag, sub in parts]
        return any(d == 1 for d in done)

    async def settle_rest(self, req: ReserveRequest, actual_cost_nano: int, actual_tokens: int) -> None:
        """A cluster: settle the slots of ``req`` other than the one with its intent (each once; a replay is a
        no-op)."""
        parts = self._split(req, plan(req)) or []
        for tag, sub in parts[:-1]:
            await self._settle_at(tag, sub, plan(sub), actual_cost_nano, actual_tokens)

    async def sweep(self, req: ReserveRequest, held_nano: int, worker: str, record: bytes) -> int:
        """Settle a dead worker's open request at its hold and keep ``record`` (its interrupted record) in
        its open hash until a batch writes it: 1 swept now, 2 settled already (entry dropped), 0 the entry
        is no intent (any more). On a cluster, the slot with the intent decides; then every other slot of the
        request is settled at the hold too (and again by a later sweep if this one dies first: see
        :mod:`gateway.state.leases`)."""
        parts = self._split(req, plan(req))
        if parts is None:
            return await self._settle_at(None, req, plan(req), held_nano, 0, record, worker, "sweep")
        tag, sub = parts[-1]
        swept = await self._settle_at(tag, sub, plan(sub), held_nano, 0, record, worker, "sweep", keep=True)
        if swept == 1:
            await self.settle_rest(req, held_nano, 0)
        return swept

    async def _settle_at(self, tag: str | None, req: ReserveRequest, p: Plan, actual_cost_nano: int,
                         actual_tokens: int, record: bytes = b"", worker: str | None = None,
                         op: str = "settle", keep: bool = False, prepared: Prepared | None = None) -> int:
        """``op`` ``release``: settle at 0 and give back the request counted in the rate windows too; ``sweep``:
        see :meth:`sweep`. ``record``: see :meth:`settle`; ``keep``: the intent stays after it (a cluster's
        request in several slots); ``prepared``: see :meth:`_reserve_at`."""
        buckets, _, rule_args = prepared or self._prepare(p, req.team)
        keys = [*request_keys(req.team, req.request_id, tag), *buckets]
        args: list[str | int | bytes] = [
            op, SCRIPT_VERSION, req.request_id, actual_cost_nano, actual_tokens, self.settled_ttl_s,
            self.bucket_grace_s, *rule_args]
        worker = worker or self.worker
        if (record or op == "sweep") and worker is not None and (tag is None or self._cluster):
            keys.append(open_key(tag or team_tag(req.team)) if self._cluster else OPEN_KEY)
            args += [worker, record]
            if keep:
                args.append("1")
        return int(await self._run(keys, args))

    async def claim(self, hold_id: str, worker: str) -> int:
        """Take over a dead worker's settled request's unwritten record (``R`` -> ``S``): 1 if taken now."""
        key, field = self.open_of(hold_id)
        return int(await self._run([key], ["claim", SCRIPT_VERSION, field, worker]))

    async def lease(self) -> list[str]:
        """Renew this worker's lease; the workers whose lease ran out."""
        assert self.worker is not None
        reply = await self._run([WORKERS_KEY], ["lease", SCRIPT_VERSION, self.worker, self.lease_ms])
        return [w.decode() if isinstance(w, bytes) else str(w) for w in reply]

    async def park(self, worker: str, until_s: int) -> bool:
        """Take a swept worker with only tombstones left for alive until ``until_s`` (unix s, server time)."""
        return int(await self._run([WORKERS_KEY], ["park", SCRIPT_VERSION, worker, until_s * 1000])) == 1

    async def retire(self, worker: str, force: bool = False) -> bool:
        """Forget a worker whose open requests are all swept, unless it renewed its lease meanwhile
        (``force``: this worker, shutting down cleanly)."""
        return int(await self._run([WORKERS_KEY], ["retire", SCRIPT_VERSION, worker, "1" if force else "0"])) == 1

    async def renew(self, req: ReserveRequest) -> bool:
        p = plan(req)
        parts = self._split(req, p)
        if parts is None:
            return await self._renew_at(None, req, p)
        return all([await self._renew_at(tag, sub, plan(sub)) for tag, sub in parts])

    async def _renew_at(self, tag: str | None, req: ReserveRequest, p: Plan) -> bool:
        keys = [request_keys(req.team, req.request_id, tag)[0], *self._bucket_keys(req.team, p, rates=False)]
        args: list[str | int] = ["renew", SCRIPT_VERSION, req.request_id,
                                 max(1, round(self.reservation_ttl_s * 1000)), len(p.budgets), *p.windows_ms]
        return int(await self._run(keys, args)) == 1

    async def usage(self, team: str, budgets: Sequence[BudgetRule], now: datetime) -> list[BudgetUsage]:
        if not budgets:
            return []
        for rule in budgets:
            check_budget_rule(rule)
        pids = [period_id(rule.period, now) for rule in budgets]
        groups: dict[str, list[int]] = {}   # one script call per hash tag on a cluster
        for i, rule in enumerate(budgets):
            groups.setdefault(home_tag(team, rule.scope, rule.owner) if self._cluster else "", []).append(i)
        reply: dict[int, tuple[int, int]] = {}
        for indexes in groups.values():
            keys: list[str] = []
            for i in indexes:
                keys.extend(bucket_keys(team, budgets[i], pids[i]))
            got = [int(x) for x in await self._run(keys, ["usage", SCRIPT_VERSION, len(indexes)])]
            reply.update({i: (got[2 * j], got[2 * j + 1]) for j, i in enumerate(indexes)})
        return [BudgetUsage(rule.scope, rule.owner, rule.period, pid, rule.limit_nano, *reply[i])
                for i, (rule, pid) in enumerate(zip(budgets, pids, strict=True))]

    async def ping(self) -> bool:
        try:
            return bool(await self._r.ping())
        except _ERRORS:
            return False

    async def aclose(self) -> None:
        await self._r.aclose()


__all__ = ["OPEN_INDEX", "OPEN_KEY", "PREFIX", "WORKERS_KEY", "open_key",
           "SCRIPT", "SCRIPT_SHA", "SCRIPT_VERSION", "RedisBudgetStore", "bucket_keys", "rate_key",
           "home_tag", "request_keys", "team_tag"]
