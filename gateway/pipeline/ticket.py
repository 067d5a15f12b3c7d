"""The money path of one request, owned by one object: price, settle and record, exactly once.

The reserve stage (:mod:`gateway.pipeline.admission`) hands out a :class:`Ticket` for every
request that got past routing, admitted or refused, with or without a budget hold. The
ticket travels with the request (into the attempts, into the stream's generator) and
collects what happened: which deployment answered, how long the upstream took, when the
first byte came. :meth:`Ticket.finish` is the only way a request's money path ends and it is
idempotent: the first call prices the usage it is given (:func:`gateway.savings.accounting.account`),
settles the hold at that cost (releasing the rest), writes one ledger record and emits one
``request_done`` metrics event; later calls do nothing. The JSON path calls it in a ``finally``,
a stream in its generator's ``finally``, a cache hit, a refusal and a compression summary call
the same way, so no exit (an upstream error, a client gone mid-stream, a cancellation, a bug)
can leave a hold behind or record a request twice. A request refused before it had a ticket (no
plan yet: bad input, a bad key, the key state unreachable) is recorded by :func:`record_refusal`:
an access line always, a $0 ledger record when the gateway's own state refused it. No other
module settles or records.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.access_log import AccessLog
from gateway.policy import Deployment
from gateway.pricing import Usage
from gateway.routing.resolve import Plan
from gateway.savings.accounting import Accounting, account
from gateway.state import State
from gateway.state.budgets import MAX_AMOUNT, Admission, ReserveRequest
from gateway.state.ledger import LedgerRecord

from .request import Principal, Request

log = logging.getLogger("gateway")


@dataclass(slots=True)
class Books:
    """Where finished tickets go: the state (budget settles, ledger), the metrics and the access log."""

    state: State
    metrics: Any
    access: AccessLog = field(default_factory=AccessLog)


class Ticket:
    """One request's accounting, from reserve to its single finish."""

    __slots__ = ("books", "req", "principal", "plan", "reservation", "admission", "capped", "output_cap",
                 "deployment", "usage", "cost_nano", "baseline_nano", "savings", "upstream_s", "ttft_s",
                 "upstream_cost_nano", "overran", "token_cap", "status", "_finished", "_recorded", "_written")

    def __init__(self, books: Books, req: Request, principal: Principal, plan: Plan,
                 reservation: ReserveRequest | None = None, admission: Admission | None = None,
                 capped: bool = False) -> None:
        self.books = books
        self.req = req
        self.principal = principal
        self.plan = plan
        self.reservation = reservation          # None: no budget or limit applies
        self.admission = admission              # the store's answer (None: store down, admitted in fail mode allow)
        self.capped = capped                    # a budget applies: the upstream may produce no more than held
        self.output_cap: int | None = None      # a partial hold: the most output tokens it pays for
        self.token_cap: int | None = None       # a TPM limit's last tokens in the minute: the most output it allows
        self.deployment: Deployment | None = None
        self.usage: Usage | None = None
        self.cost_nano = 0
        self.baseline_nano = 0
        self.savings: dict[str, int] = {}
        self.upstream_s = 0.0
        self.ttft_s: float | None = None
        self.upstream_cost_nano: int | None = None   # what the upstream said the request cost, if it said
        self.overran = False                         # it cost more than its hold
        self.status = "ok"
        self._finished = False
        self._recorded = False
        self._written: LedgerRecord | None = None   # the ledger record that went to the state with the settle

    @property
    def finished(self) -> bool:
        return self._finished

    async def finish(self, status: str, usage: Usage | None = None, *, hit: Accounting | None = None,
                     record_later: bool = False) -> None:
        """End the money path: price ``usage`` (or a cache hit's ``hit`` accounting), settle, record.

        Only the first call counts. ``record_later``: the caller writes the reply first and then
        calls :meth:`record` (the JSON path keeps the ledger write off the response's latency), except
        on a state that takes the record with the settle (SQLite's commit, a worker lease's open entry
        on Redis): there it goes with the settle, so a crash after the response cannot lose it."""
        if self._finished:
            return
        self._finished = True
        self.status = status
        try:
            if hit is not None:
                self.baseline_nano, self.savings = hit.baseline_nano, dict(hit.savings)
            elif usage is not None and self.deployment is not None:
                self._price(self.deployment, usage)
                if self.upstream_cost_nano is not None:
                    self.books.metrics.cost_drift(self.deployment.provider, self.deployment.model, self.cost_nano,
                                                  self.upstream_cost_nano)
        except Exception:   # a bug in pricing must still release the hold and leave a record
            log.exception("pricing request %s failed", self.req.request_id)
        durable = self.books.state.records_with_settle
        # admitted unmetered (the store was down): the record goes with the settle too, so an intents file
        # (GATEWAY_SPOOL_DIR) keeps both
        record = self.ledger_record() if durable or not record_later or (
            self.admission is None and self.reservation is not None) else None
        try:
            await self._settle(record)
        finally:
            self._written = record
            if not record_later:
                self.record()

    def _price(self, deployment: Deployment, usage: Usage) -> None:
        self.usage = usage
        removed = self.req.compression.removed if self.req.compression is not None else 0
        priced = account(usage, deployment.price, self.plan.baseline.price, removed_tokens=removed,
                         overhead=self.req.overhead)
        self.cost_nano, self.baseline_nano, self.savings = priced.cost_nano, priced.baseline_nano, priced.savings
        if max(self.cost_nano, self.baseline_nano, *(abs(v) for v in self.savings.values())) > MAX_AMOUNT:
            # an impossible bill (10^18 tokens): charged at the most a budget can hold, flagged, not crashed on
            log.error("request %s: the upstream reported an impossible usage (%d in, %d out); charged $%d",
                      self.req.request_id, usage.input_tokens, usage.output_tokens, MAX_AMOUNT // 10**9)
            self.usage = replace(usage, input_tokens=min(usage.input_tokens, MAX_AMOUNT),
                                 output_tokens=min(usage.output_tokens, MAX_AMOUNT),
                                 cached_input_tokens=min(usage.cached_input_tokens, MAX_AMOUNT))
            self.cost_nano, self.baseline_nano, self.savings = MAX_AMOUNT, 0, {}

    async def _settle(self, record: LedgerRecord | None) -> None:
        """Charge what the request really cost (0 if it failed unbilled), release the rest of the hold, and
        write ``record`` with it (one commit where the state has them)."""
        state = self.books.state
        reservation = self.reservation
        if reservation is None or (self.admission is not None and not self.admission.admitted):
            if record is not None:   # nothing held (no budget, or a refusal): only the record
                await state.finish(None, 0, 0, record)
            return
        usage = self.usage
        tokens = usage.input_tokens + usage.output_tokens if usage is not None else 0
        cost = min(self.cost_nano, MAX_AMOUNT)
        held = self.admission.reserved_nano if self.admission is not None else None
        if held is not None and cost > held:   # billed beyond the worst case: charged in full, and counted
            self.overran = True
            self.books.metrics.overran(self.principal.team, cost - held)
            log.warning("request %s cost %d nano-USD, %d more than its hold", self.req.request_id, cost, cost - held)
        if record is not None:
            record.overrun = self.overran
        try:
            await state.finish(reservation, cost, min(tokens, MAX_AMOUNT), record)
        except Exception:   # never leave the hold: settle what was held, at most (the record is queued)
            log.exception("settle of %s failed; settling the hold instead", reservation.request_id)
            await state.settle(reservation, min(cost, reservation.cost_nano), 0)

    def record(self) -> None:
        """The ledger record and the metrics of this request (once, whatever calls it again)."""
        if self._recorded:
            return
        self._recorded = True
        req, books = self.req, self.books
        req.recorded = True
        record = self._written
        if record is None:
            record = self.ledger_record()
            books.state.record(record)
        books.access.write(record)
        books.metrics.request_done(record, self.upstream_s, req.cache is not None,
                                   tuple(req.compression.saved.items()) if req.compression is not None else ())

    def intent(self) -> dict[str, Any]:
        """What the ledger record of this request says if its worker dies before it finishes (worker leases:
        stored with the hold at reserve): who and what, on its first candidate deployment; the rest of a
        :class:`LedgerRecord` keeps its defaults."""
        req, plan, attribution = self.req, self.plan, self.req.attribution
        d = plan.candidates[0] if plan.candidates else None
        return {"request_id": req.request_id, "ts": time.time(), "team": self.principal.team,
                "key_id": self.principal.key_id, "requested_model": plan.requested,
                "model": d.model if d else plan.model.name, "deployment": d.id if d else "",
                "provider": d.provider if d else "", "route": plan.route, "stream": req.stream,
                "endpoint": req.endpoint, "user": attribution.user, "tags": attribution.tags,
                "session": attribution.session, "agent": attribution.agent, "parent_agent": attribution.parent_agent}

    def ledger_record(self) -> LedgerRecord:
        req, plan, d = self.req, self.plan, self.deployment
        usage = self.usage or Usage()
        report = req.compression
        return LedgerRecord(
            request_id=req.request_id, ts=time.time(), team=self.principal.team, key_id=self.principal.key_id,
            requested_model=plan.requested, model=d.model if d else plan.model.name, deployment=d.id if d else "",
            provider=d.provider if d else "", route=plan.route, input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens, cached_input_tokens=usage.cached_input_tokens,
            cache_write_tokens=usage.cache_write_tokens + usage.cache_write_1h_tokens,
            reasoning_tokens=usage.reasoning_tokens, cost_nano=self.cost_nano, baseline_nano=self.baseline_nano,
            savings=self.savings, latency_ms=round((time.perf_counter() - req.started) * 1000, 3),
            ttft_ms=round(self.ttft_s * 1000, 3) if self.ttft_s is not None else None, status=self.status,
            cache=req.cache_result, compressed=report is not None,
            compression_saved_tokens=report.removed if report is not None else 0,
            estimated=usage.estimated, stream=req.stream, endpoint=req.endpoint, user=req.attribution.user,
            tags=req.attribution.tags, session=req.attribution.session, agent=req.attribution.agent,
            parent_agent=req.attribution.parent_agent, overrun=self.overran)


def record_refusal(books: Books, record: LedgerRecord, ledger: bool) -> None:
    """A request refused before its ticket existed: its access line, and with ``ledger`` its $0 ledger
    record (a refusal the gateway's state caused, such as a 503 when the key could not be looked up,
    is in the ledger like a 429 or a reservation's 503; a client's own error, such as a bad key or bad
    JSON, is not: that would let anyone without a key write to the ledger)."""
    if ledger:
        books.state.record(record)
    books.access.write(record)
