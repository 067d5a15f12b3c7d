"""Deployment health and observed latency, per replica and shared through Redis.

:class:`HealthBook` owns two facts routing needs about each deployment: whether it is
cooled down (it failed ``failures`` times within ``window_s``, or its active health
check failed) and a moving average of its time to first token and of its duration.
The request path only reads a ready-made :class:`~gateway.routing.resolve.HealthView` and
reports outcomes into local buffers: no Redis round trip is added to any request.
A background task (:meth:`HealthBook.run`) every ``sync_interval_s`` sends the
buffered failures and latency samples to Redis in one script call and reads back
the shared cooldowns and averages, so every worker and replica converges on the
same view within about a second; it also runs the active checks of self-hosted
deployments. Without Redis the same book works for the one process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.background import cancel
from gateway.policy import Deployment, HealthSpec
from gateway.routing.resolve import HealthView

log = logging.getLogger("gateway.routing.cooldowns")
Checker = Callable[[Deployment, float], Awaitable[None]]

# KEYS: cool (hash id -> until_ms), ttft (hash id -> avg s), dur (hash id -> avg s), then one outcome window
#       hash per deployment reported (fields "<bucket>o" / "<bucket>f": successes and failures per bucket)
# ARGV: now_ms, bucket_ms, buckets kept, threshold, min_ratio, cooldown_ms, alpha, nw,
#       (id, ok, failed, forced_until_ms) * nw, nt, (id, sum, n) * nt, nd, (id, sum, n) * nd
SYNC_SCRIPT = """
local now, bucket_ms, keep = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local threshold, ratio, cooldown, alpha = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local cur = math.floor(now / bucket_ms)
local i = 8
local nw = tonumber(ARGV[i]); i = i + 1
for w = 1, nw do
  local id, ok, bad, forced = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  i = i + 4
  local win = KEYS[3 + w]
  if ok > 0 then redis.call('HINCRBY', win, cur .. 'o', ok) end
  if bad > 0 then redis.call('HINCRBY', win, cur .. 'f', bad) end
  local fields = redis.call('HGETALL', win)
  local oks, fails = 0, 0
  for f = 1, #fields, 2 do
    local name = fields[f]
    local b = tonumber(string.sub(name, 1, -2))
    if b == nil or b <= cur - keep then
      redis.call('HDEL', win, name)
    elseif string.sub(name, -1) == 'o' then
      oks = oks + tonumber(fields[f + 1])
    else
      fails = fails + tonumber(fields[f + 1])
    end
  end
  redis.call('PEXPIRE', win, bucket_ms * keep)
  local until_ms = forced
  if fails >= threshold and fails >= ratio * (oks + fails) then
    until_ms = math.max(until_ms, now + cooldown)
    redis.call('DEL', win)
  end
  if until_ms > now then
    local old = tonumber(redis.call('HGET', KEYS[1], id) or '0')
    if until_ms > old then redis.call('HSET', KEYS[1], id, string.format('%d', until_ms)) end
  end
end
local function fold(key)
  local n = tonumber(ARGV[i]); i = i + 1
  for s = 1, n do
    local id, sum, cnt = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]); i = i + 3
    local mean = sum / cnt
    local old = redis.call('HGET', key, id)
    local new = mean
    if old then
      local stay = math.pow(1 - alpha, cnt)
      new = tonumber(old) * stay + mean * (1 - stay)
    end
    redis.call('HSET', key, id, string.format('%.6f', new))
  end
end
fold(KEYS[2])
fold(KEYS[3])
local cool = redis.call('HGETALL', KEYS[1])
local live = {}
for c = 1, #cool, 2 do
  if tonumber(cool[c + 1]) > now then
    live[#live + 1] = cool[c]; live[#live + 1] = cool[c + 1]
  else
    redis.call('HDEL', KEYS[1], cool[c])
  end
end
return {live, redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3])}
"""
BUCKETS = 10   # the failure window is kept in this many buckets
PREFIX = "gw:v1:{health}"


class _Outcomes:
    """Successes and failures of one deployment over the window, in ``BUCKETS`` buckets."""

    __slots__ = ("buckets",)

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()   # [bucket number, ok, failed], oldest first

    def add(self, bucket: int, ok: int, failed: int) -> None:
        b = self.buckets
        if not b or b[-1][0] != bucket:
            b.append([bucket, 0, 0])
            while b[0][0] <= bucket - BUCKETS:
                b.popleft()
        last = b[-1]
        last[1] += ok
        last[2] += failed

    def totals(self, bucket: int) -> tuple[int, int]:
        """(ok, failed) over the buckets still inside the window at ``bucket``."""
        live = [x for x in self.buckets if x[0] > bucket - BUCKETS]
        return sum(x[1] for x in live), sum(x[2] for x in live)


class _Samples:
    __slots__ = ("sum", "n")

    def __init__(self) -> None:
        self.sum = 0.0
        self.n = 0


class HealthBook:
    def __init__(self, spec: HealthSpec, redis: Any | None = None, checker: Checker | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.spec = spec
        self.redis = redis
        self.checker = checker
        self.clock = clock
        self._cool: dict[str, float] = {}                  # deployment id -> until (unix s)
        self._window: dict[str, _Outcomes] = defaultdict(_Outcomes)   # this process's outcomes
        self._ttft: dict[str, float] = {}
        self._dur: dict[str, float] = {}
        self._out: dict[str, list[float]] = {}             # to send: id -> [ok, failed, forced_until_s]
        self._out_ttft: dict[str, _Samples] = defaultdict(_Samples)
        self._out_dur: dict[str, _Samples] = defaultdict(_Samples)
        self._check_down: set[str] = set()
        self._view = HealthView()
        self._view_until = math.inf
        self._dirty = True
        self._deployments: tuple[Deployment, ...] = ()
        self._task: asyncio.Task[None] | None = None

    # -------------------------------------------------------------- request path
    def view(self) -> HealthView:
        """The current snapshot (rebuilt only after a change or when a cooldown ends)."""
        now = self.clock()
        if self._dirty or now >= self._view_until:
            live = {d: u for d, u in self._cool.items() if u > now}
            self._cool = live
            # the latency tables are shared, not copied: routing only reads them, and a new sample
            # must not cost every request a rebuild
            self._view = HealthView(cooled=frozenset(live), latency=self._dur, ttft=self._ttft)
            self._view_until = min(live.values(), default=math.inf)
            self._dirty = False
        return self._view

    def succeeded(self, deployment: Deployment, duration_s: float | None = None, ttft_s: float | None = None) -> None:
        """A call that worked, with its latency: the whole call's duration (non-streaming) or a stream's
        time to first token."""
        self._window[deployment.id].add(int(self.clock() * 1000) // self._bucket_ms, 1, 0)
        out = self._out.get(deployment.id)
        if out is None:
            out = self._out[deployment.id] = [0, 0, 0.0]
        out[0] += 1
        if duration_s is not None:
            self._fold_local(self._dur, deployment.id, duration_s)
            s = self._out_dur[deployment.id]
            s.sum += duration_s
            s.n += 1
        if ttft_s is not None:
            self._fold_local(self._ttft, deployment.id, ttft_s)
            t = self._out_ttft[deployment.id]
            t.sum += ttft_s
            t.n += 1

    def failed(self, deployment: Deployment) -> None:
        """A retryable failure: counted here at once, and sent to the other replicas at the next sync.
        Past ``failures`` failures that are at least ``min_failure_ratio`` of the window's calls (this
        process's calls here; every replica's in the shared window), the deployment is cooled down."""
        now = self.clock()
        bucket = int(now * 1000) // self._bucket_ms
        window = self._window[deployment.id]
        window.add(bucket, 0, 1)
        ok, bad = window.totals(bucket)
        out = self._out.setdefault(deployment.id, [0, 0, 0.0])
        out[1] += 1
        if self._trips(ok, bad):   # here at once; the other replicas decide on the shared window at the next sync
            self._window.pop(deployment.id, None)
            self._cool_down(deployment.id, now + self.spec.cooldown_s)

    def _trips(self, ok: int, failed: int) -> bool:
        return failed >= self.spec.failures and failed >= self.spec.min_failure_ratio * (ok + failed)

    @property
    def spec(self) -> HealthSpec:
        return self._spec

    @spec.setter
    def spec(self, spec: HealthSpec) -> None:
        """New settings (a policy reload); the window's bucket length follows."""
        self._spec = spec
        self._bucket_ms = max(1, int(spec.window_s * 1000) // BUCKETS)

    def _cool_down(self, deployment_id: str, until: float) -> None:
        if until > self._cool.get(deployment_id, 0.0):
            if deployment_id not in self._cool or self._cool[deployment_id] <= self.clock():
                log.warning("deployment %s cooled down for %.0fs", deployment_id, until - self.clock())
            self._cool[deployment_id] = until
            self._dirty = True

    def _fold_local(self, table: dict[str, float], key: str, sample: float) -> None:
        old = table.get(key)
        a = self.spec.latency_alpha
        table[key] = sample if old is None else old * (1 - a) + sample * a

    def healthy(self) -> dict[str, bool]:
        """Deployment id -> not cooled down, for every known deployment (the health gauge)."""
        cooled = self.view().cooled
        return {d.id: d.id not in cooled for d in self._deployments}

    # ------------------------------------------------------------- background
    def watch(self, deployments: tuple[Deployment, ...]) -> None:
        """The deployments of the policies in force (health checks and the gauge cover these)."""
        self._deployments = deployments

    async def sync(self) -> None:
        """Exchange buffered failures and latency samples with Redis, and adopt the shared view."""
        if self.redis is None:
            return
        outcomes, self._out = self._out, {}
        ttft, self._out_ttft = self._out_ttft, defaultdict(_Samples)
        dur, self._out_dur = self._out_dur, defaultdict(_Samples)
        now_ms = int(self.clock() * 1000)
        keys = [f"{PREFIX}:cool", f"{PREFIX}:ttft", f"{PREFIX}:dur", *(f"{PREFIX}:win:{d}" for d in outcomes)]
        spec = self.spec
        args: list[Any] = [now_ms, self._bucket_ms, BUCKETS, spec.failures, spec.min_failure_ratio,
                           int(spec.cooldown_s * 1000), spec.latency_alpha, len(outcomes)]
        for d, (ok, bad, forced) in outcomes.items():
            args += [d, int(ok), int(bad), int(forced * 1000)]
        for samples in (ttft, dur):
            args.append(len(samples))
            for d, s in samples.items():
                args += [d, repr(s.sum), s.n]
        try:
            cool, shared_ttft, shared_dur = await self.redis.eval(SYNC_SCRIPT, len(keys), *keys, *args)
        except Exception as exc:   # Redis down: keep the local view; samples of this round are dropped
            log.debug("health sync failed: %s", exc)
            return
        for d, until in _pairs(cool):
            self._cool_down(d, float(until) / 1000)
        for table, shared in ((self._ttft, shared_ttft), (self._dur, shared_dur)):
            for d, value in _pairs(shared):
                table[d] = float(value)

    async def check(self) -> None:
        """Active checks of self-hosted deployments: a failed one is cooled down until it passes again."""
        if self.checker is None:
            return
        targets = [d for d in self._deployments if d.self_hosted and d.api_base]
        results = await asyncio.gather(*(self._check_one(d) for d in targets))
        for d, ok in zip(targets, results, strict=True):
            if ok and d.id in self._check_down:
                self._check_down.discard(d.id)
                self._cool.pop(d.id, None)
                self._dirty = True
                log.info("deployment %s passed its health check again", d.id)
            elif not ok:
                self._check_down.add(d.id)
                until = self.clock() + max(self.spec.check_interval_s * 2, self.spec.cooldown_s)
                self._cool_down(d.id, until)
                out = self._out.setdefault(d.id, [0, 0, 0.0])
                out[2] = max(out[2], until)

    async def _check_one(self, deployment: Deployment) -> bool:
        assert self.checker is not None
        try:
            await self.checker(deployment, self.spec.check_timeout_s)
            return True
        except Exception as exc:
            log.warning("health check of %s failed: %s", deployment.id, exc)
            return False

    async def run(self) -> None:
        next_check = 0.0
        while True:
            try:
                if self.spec.check_interval_s > 0 and time.monotonic() >= next_check:
                    next_check = time.monotonic() + self.spec.check_interval_s
                    await self.check()
                await self.sync()
            except Exception:   # the loop must outlive any one failure
                log.exception("health loop failed")
            await asyncio.sleep(self.spec.sync_interval_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def aclose(self) -> None:
        await cancel(self._task)
        self._task = None


def _pairs(flat: Any) -> list[tuple[str, Any]]:
    items = [x.decode() if isinstance(x, bytes) else x for x in flat or ()]
    return list(zip(items[0::2], items[1::2], strict=True))
