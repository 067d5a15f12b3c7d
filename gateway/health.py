"""Deployment health and observed latency, per replica and shared through Redis.

:class:`HealthBook` owns two facts routing needs about each deployment: whether it is
cooled down (it failed ``failures`` times within ``window_s``, or its active health
check failed) and a moving average of its time to first token and of its duration.
The request path only reads a ready-made :class:`~gateway.routing.HealthView` and
reports outcomes into local buffers: no Redis round trip is added to any request.
A background task (:meth:`HealthBook.run`) every ``sync_interval_s`` sends the
buffered failures and latency samples to Redis in one script call and reads back
the shared cooldowns and averages, so every worker and replica converges on the
same view within about a second; it also runs the active checks of self-hosted
deployments. Without Redis the same book works for the one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.policy import Deployment, HealthSpec
from gateway.routing import HealthView

log = logging.getLogger("gateway.health")
Checker = Callable[[Deployment, float], Awaitable[None]]

# KEYS: cool (hash id -> until_ms), ttft (hash id -> avg s), dur (hash id -> avg s), then one fails zset per failed id
# ARGV: now_ms, window_ms, threshold, cooldown_ms, alpha, worker, nf, (id, count, forced_until_ms) * nf,
#       nt, (id, sum, n) * nt, nd, (id, sum, n) * nd
SYNC_SCRIPT = """
local now, window, threshold, cooldown, alpha = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4]), tonumber(ARGV[5])
local worker = ARGV[6]
local i = 7
local nf = tonumber(ARGV[i]); i = i + 1
for f = 1, nf do
  local id, count, forced = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]); i = i + 3
  local fails = KEYS[3 + f]
  for c = 1, count do redis.call('ZADD', fails, now, worker .. ':' .. now .. ':' .. c) end
  redis.call('ZREMRANGEBYSCORE', fails, '-inf', now - window)
  redis.call('PEXPIRE', fails, window)
  local until_ms = forced
  if redis.call('ZCARD', fails) >= threshold then
    until_ms = math.max(until_ms, now + cooldown)
    redis.call('DEL', fails)
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
      local keep = math.pow(1 - alpha, cnt)
      new = tonumber(old) * keep + mean * (1 - keep)
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
PREFIX = "gw:v1:{health}"


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
        self.worker = f"{os.getpid()}-{os.urandom(3).hex()}"
        self._cool: dict[str, float] = {}                  # deployment id -> until (unix s)
        self._recent: dict[str, deque[float]] = defaultdict(deque)   # local failure times
        self._ttft: dict[str, float] = {}
        self._dur: dict[str, float] = {}
        self._out_fail: dict[str, list[float]] = {}        # to send: id -> [count, forced_until_s]
        self._out_ttft: dict[str, _Samples] = defaultdict(_Samples)
        self._out_dur: dict[str, _Samples] = defaultdict(_Samples)
        self._check_down: set[str] = set()
        self._view = HealthView()
        self._view_until = math.inf
        self._dirty = True
        self._deployments: tuple[Deployment, ...] = ()

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
        """A latency sample: the whole call's duration (non-streaming) or a stream's time to first token."""
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
        """A retryable failure: counted here at once, and sent to the other replicas at the next sync."""
        now = self.clock()
        recent = self._recent[deployment.id]
        recent.append(now)
        while recent and recent[0] < now - self.spec.window_s:
            recent.popleft()
        out = self._out_fail.setdefault(deployment.id, [0, 0.0])
        out[0] += 1
        if len(recent) >= self.spec.failures:
            recent.clear()
            self._cool_down(deployment.id, now + self.spec.cooldown_s)
            out[1] = max(out[1], now + self.spec.cooldown_s)

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
        fails, self._out_fail = self._out_fail, {}
        ttft, self._out_ttft = self._out_ttft, defaultdict(_Samples)
        dur, self._out_dur = self._out_dur, defaultdict(_Samples)
        now_ms = int(self.clock() * 1000)
        keys = [f"{PREFIX}:cool", f"{PREFIX}:ttft", f"{PREFIX}:dur", *(f"{PREFIX}:fail:{d}" for d in fails)]
        args: list[Any] = [now_ms, int(self.spec.window_s * 1000), self.spec.failures,
                           int(self.spec.cooldown_s * 1000), self.spec.latency_alpha, self.worker, len(fails)]
        for d, (count, forced) in fails.items():
            args += [d, int(count), int(forced * 1000)]
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
                out = self._out_fail.setdefault(d.id, [0, 0.0])
                out[1] = max(out[1], until)

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

    def start(self) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self.run())

    @staticmethod
    async def stop(task: asyncio.Task[None] | None) -> None:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _pairs(flat: Any) -> list[tuple[str, Any]]:
    items = [x.decode() if isinstance(x, bytes) else x for x in flat or ()]
    return list(zip(items[0::2], items[1::2], strict=True))
