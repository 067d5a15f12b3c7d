"""Budget notifications: see a budget cross a threshold, claim the notification once, deliver it signed.

After a settle the state marks the request's watched budgets (:meth:`Notifier.touched`, no I/O);
the notifier's background task reads their spend, and for each webhook threshold reached claims the
notification of (webhook, budget, period, threshold) in the shared :class:`NotifyStore`: the first
worker or replica to claim it sends it, and the claim puts the delivery in a persistent outbox in
the same atomic step. Deliveries are POSTed as JSON with a Slack-compatible ``text`` field and an
``x-gateway-signature: sha256=<hex HMAC of the body>`` header (the webhook's secret), retried with
exponential backoff until the receiver answers 2xx; each is also logged and counted
(``gateway_budget_notifications_total``). Minute brakes do not notify.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from gateway.background import cancel
from gateway.policy.notify import NotifySpec, Webhook
from gateway.state.budgets import (
    LIFETIME_KEEP_S,
    BudgetRule,
    BudgetStore,
    BudgetUsage,
    ReserveRequest,
    StateUnavailable,
    period_end,
)
from gateway.state.notify_store import NotifyStore, Pending

log = logging.getLogger("gateway.notify")
_WHO = {"team": "team", "key": "key", "user": "end user", "tag": "tag", "session": "session"}
MAX_CLAIMED = 100_000


def _usd(nano: int) -> str:
    whole, frac = divmod(nano, 10**9)
    return f"{whole}.{f'{frac:09d}'.rstrip('0').ljust(2, '0')}"


def reached(spent_nano: int, limit_nano: int, threshold: float) -> bool:
    """Whether ``spent`` is at least ``threshold`` of ``limit`` (exact integer arithmetic, in millionths)."""
    return limit_nano > 0 and spent_nano * 1_000_000 >= limit_nano * round(threshold * 1_000_000)


def claim_id(hook: Webhook, u: BudgetUsage, threshold: float) -> str:
    return ":".join(quote(x, safe="") for x in (hook.name, u.scope, u.owner, u.period_id, f"{threshold:g}"))


def payload(hook: Webhook, u: BudgetUsage, threshold: float, cid: str) -> bytes:
    who = f"{_WHO[u.scope]} '{u.owner}'"
    text = (f"Budget alert: the {u.period} budget of {who} reached {threshold:.0%}: "
            f"spent ${_usd(u.spent_nano)} of ${_usd(u.limit_nano)} ({u.period_id}).")
    return orjson.dumps({"id": cid, "event": "budget_threshold", "text": text, "webhook": hook.name,
                         "scope": u.scope, "owner": u.owner, "period": u.period, "period_id": u.period_id,
                         "threshold": threshold, "limit_usd": _usd(u.limit_nano), "spent_usd": _usd(u.spent_nano),
                         "ts": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")})


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Notifier:
    def __init__(self, spec_of: Callable[[], NotifySpec], budgets: BudgetStore, store: NotifyStore, metrics: Any,
                 *, poll_s: float = 0.2, lease_s: float = 30.0, max_backoff_s: float = 300.0,
                 max_attempts: int = 100, timeout_s: float = 10.0) -> None:
        self.spec_of, self.budgets, self.store, self.metrics = spec_of, budgets, store, metrics
        self.poll_s, self.lease_s, self.max_backoff_s, self.max_attempts = poll_s, lease_s, max_backoff_s, max_attempts
        self.timeout_s = timeout_s
        self._dirty: dict[tuple[str, BudgetRule], datetime] = {}
        self._claimed: set[str] = set()
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    def touched(self, req: ReserveRequest) -> None:
        """A request settled: remember its watched budgets for the next check (hot path, no I/O)."""
        hooks = self.spec_of().webhooks
        if not hooks:
            return
        for rule in req.budgets:
            if rule.period != "minute" and any(h.watches_budget(rule.scope, rule.owner) for h in hooks):
                self._dirty[(req.team, rule)] = req.now

    async def check(self) -> int:
        """Claim the notifications of every threshold the touched budgets reached; returns how many this
        process won."""
        dirty, self._dirty = self._dirty, {}
        hooks = self.spec_of().webhooks
        won = 0
        for (team, rule), now in dirty.items():
            try:
                [u] = await self.budgets.usage(team, [rule], now)
            except StateUnavailable:
                self._dirty.setdefault((team, rule), now)     # look again next time
                continue
            for hook in hooks:
                if not hook.watches_budget(rule.scope, rule.owner):
                    continue
                for t in hook.thresholds:
                    if not reached(u.spent_nano, u.limit_nano, t):
                        continue
                    cid = claim_id(hook, u, t)
                    if cid in self._claimed:
                        continue
                    left = int(period_end(rule.period, now).timestamp() - time.time())
                    keep = min(LIFETIME_KEEP_S, left + 7 * 86_400)
                    try:
                        first = await self.store.claim(cid, payload(hook, u, t, cid), max(keep, 60))
                    except StateUnavailable:
                        self._dirty.setdefault((team, rule), now)
                        continue
                    if len(self._claimed) >= MAX_CLAIMED:
                        self._claimed.clear()
                    self._claimed.add(cid)
                    if first:
                        won += 1
                        self.metrics.budget_notified(u.scope, "claimed")
                        log.warning("budget notification %s: %s budget of %s %s at %d%% of $%s (spent $%s)",
                                    hook.name, u.period, u.scope, u.owner, round(t * 100), _usd(u.limit_nano),
                                    _usd(u.spent_nano))
        return won

    async def deliver(self) -> int:
        """POST every due delivery once; returns how many the receivers accepted."""
        delivered = 0
        for item in await self.store.take(self.lease_s, 20):
            delivered += await self._send(item)
        return delivered

    async def _send(self, item: Pending) -> int:
        doc = orjson.loads(item.payload)
        hook = next((h for h in self.spec_of().webhooks if h.name == doc.get("webhook")), None)
        if hook is None:
            log.error("budget notification %s dropped: webhook %r is no longer configured", item.id, doc.get("webhook"))
            self.metrics.budget_notified(str(doc.get("scope", "team")), "dropped")
            await self.store.done(item.id)
            return 0
        headers = {"content-type": "application/json", "x-gateway-notification-id": item.id,
                   "x-gateway-delivery-attempt": str(item.attempt)}
        if hook.secret:
            headers["x-gateway-signature"] = signature(hook.secret, item.payload)
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s)
        try:
            status = (await self._client.post(hook.url, content=item.payload, headers=headers)).status_code
        except httpx.HTTPError as exc:
            status, reason = 0, f"{type(exc).__name__}"
        else:
            reason = f"HTTP {status}"
        if 200 <= status < 300:
            await self.store.done(item.id)
            self.metrics.budget_notified(doc["scope"], "delivered")
            log.info("budget notification %s delivered to %s", item.id, hook.name)
            return 1
        self.metrics.budget_notified(doc["scope"], "failed")
        if item.attempt >= self.max_attempts:
            log.error("budget notification %s to %s given up after %d attempts (%s)", item.id, hook.name,
                      item.attempt, reason)
            await self.store.done(item.id)
            return 0
        delay = min(self.max_backoff_s, 2.0 ** (item.attempt - 1))
        log.warning("budget notification %s to %s failed (%s); retry in %.0fs", item.id, hook.name, reason, delay)
        await self.store.retry(item.id, time.time() + delay)
        return 0

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                if self._dirty:
                    await self.check()
                if self.spec_of().webhooks:
                    await self.deliver()
            except StateUnavailable as exc:
                log.warning("budget notifications paused: %s", exc)
            except Exception:   # the notifier must outlive any one failure
                log.exception("budget notifications failed")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        await cancel(self._task)
        self._task = None
        with contextlib.suppress(Exception):
            if self._dirty:
                await self.check()      # claim what this process saw: another replica delivers it
        if self._client is not None:
            await self._client.aclose()
