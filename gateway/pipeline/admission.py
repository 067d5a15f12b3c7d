"""The reserve stage: hold the worst case against every budget and rate limit, and hand out the ticket.

The budgets are the team's and key's and those of the request's end user, tags and session
(``users``/``tags``/``sessions`` policies), all held in one atomic store call.

:meth:`Admission.reserve` works out which budgets and limits bind the request
(:mod:`gateway.budgets.rules`), what it may cost at worst on any candidate (each with its own
prompt count when they bill images by different formulas), and asks the budget store to hold
it atomically. It returns the request's
:class:`~gateway.pipeline.ticket.Ticket` when admitted; when refused it finishes a ticket
with the refusal's status (one ledger record at $0) and raises the client's error. A request
refused only because of other requests' holds (it would fit once they settle) tries again for up
to ``hold_wait_s`` before it is refused, so a burst admits what the budget pays for. A team
whose policy says ``downgrade`` is moved to its cheaper model (resolved by the function the
caller passes) once past its soft threshold or when its budget cannot cover the worst case.
:meth:`Admission.admit_hit` admits a response-cache hit: no budget hold, one request of the
rate allowance. With the store down, fail mode ``allow`` admits unmetered (the settle is
replayed later; with ``GATEWAY_SPOOL_DIR`` the state first writes the request's intent to the spool,
so a worker killed before it finishes still leaves its ``interrupted`` record) and ``refuse`` answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from gateway.budgets.rules import (
    RuleBook,
    affordable_output,
    attributed_limits,
    choices_of,
    prompt_bound,
    refusal_error,
    worst_case,
)
from gateway.errors import GatewayError, state_unavailable
from gateway.image_tokens import image_family
from gateway.routing.resolve import Plan
from gateway.state import State
from gateway.state.budgets import MAX_AMOUNT, BudgetRule, RateRule, ReserveRequest, StateUnavailable
from gateway.tokens import count_prompt, has_images

from .request import Principal, Request, RequestIds
from .ticket import Books, Ticket

log = logging.getLogger("gateway")


def own_prompts(req: Request, plan: Plan) -> dict[str, int] | None:
    """Each candidate's own prompt count, by deployment id, when the candidates bill images by different
    formulas and the request has images (None otherwise: one count serves them all)."""
    if len(plan.candidates) < 2 or len({image_family(d.upstream_model) for d in plan.candidates}) < 2 \
            or not has_images(req.body):
        return None
    return {d.id: count_prompt(req.body, req.shape, d.upstream_model) for d in plan.candidates}


class NoRoom(Exception):
    """Not even one output token fits what a rate limit leaves."""

HOLD_POLL_S = 0.05   # how often a request refused for others' holds tries again


class Admission:
    def __init__(self, state: State, books: Books, ids: RequestIds, metrics: Any, hold_wait_s: float = 2.0) -> None:
        self.state = state
        self.books = books
        self.ids = ids
        self.metrics = metrics
        self.hold_wait_s = hold_wait_s
        self.rules = RuleBook()

    async def _held_by_others(self, team: str, budgets: tuple[BudgetRule, ...], ticket: Ticket) -> bool:
        """Whether the refused request would fit every budget once the holds of requests in flight are
        released: then it waits for them (a burst admits what the budget pays for, not what worst-case
        holds leave over)."""
        reservation = ticket.reservation
        if reservation is None:
            return False
        try:
            usage = await self.state.budgets.usage(team, budgets, reservation.now)
        except StateUnavailable:
            return False
        return any(u.reserved_nano for u in usage) and all(
            u.spent_nano + reservation.min_cost_nano <= u.limit_nano for u in usage)

    async def reserve(self, req: Request, principal: Principal, plan: Plan,
                      resolve: Callable[[str], Plan]) -> Ticket:
        """The admitted request's ticket, or the refusal raised (and recorded through its own ticket)."""
        spec, key = principal.spec, principal.key
        downgrades = (spec.on_exceed == "downgrade" and spec.downgrade_to is not None
                      and any(d.model != spec.downgrade_to for d in plan.candidates))
        attributed = attributed_limits(req.policies, req.attribution)
        budgets, rates = self.rules.rules(spec, key, downgrades, attributed)
        if not budgets and not rates:
            return Ticket(self.books, req, principal, plan)
        ticket = await self._try(req, principal, plan, budgets, rates, partial=not downgrades)
        refusal = ticket.admission.refusal if ticket.admission else None
        waited_until = time.monotonic() + self.hold_wait_s
        while refusal is not None and refusal.kind == "budget" and refusal.period != "minute" and not downgrades \
                and time.monotonic() < waited_until and await self._held_by_others(principal.team, budgets, ticket):
            await asyncio.sleep(HOLD_POLL_S)   # other requests' holds may settle below their worst case
            ticket = await self._try(req, principal, plan, budgets, rates)
            refusal = ticket.admission.refusal if ticket.admission else None
        if refusal is not None and refusal.kind == "rate_tokens" and ticket.admission is not None:
            left = ticket.admission.rate.remaining_tokens   # the minute's tokens: the output is capped to fit
            if left is not None and left > 0 and req.endpoint != "embeddings":
                with contextlib.suppress(NoRoom):
                    ticket = await self._try(req, principal, plan, budgets, rates, partial=not downgrades,
                                             tokens_left=left)
                    refusal = ticket.admission.refusal if ticket.admission else None
        if refusal is not None and refusal.kind in ("budget", "budget_soft") and downgrades:
            assert spec.downgrade_to is not None
            cheaper = replace(resolve(spec.downgrade_to), route="downgrade", requested=plan.requested,
                              baseline=plan.baseline)
            req.route = cheaper.route
            ticket = await self._try(req, principal, cheaper, self.rules.rules(spec, key, False, attributed)[0], rates)
            refusal = ticket.admission.refusal if ticket.admission else None
        if refusal is not None:
            assert ticket.admission is not None
            if refusal.kind.startswith("budget"):
                self.metrics.budget_refused(principal.team)
            else:
                self.metrics.rate_limit_refused(principal.team)
            error = refusal_error(refusal, ticket.admission)
            await ticket.finish(error.code or "error")
            raise error
        return ticket

    async def _try(self, req: Request, principal: Principal, plan: Plan, budgets: tuple[BudgetRule, ...],
                   rates: tuple[RateRule, ...], partial: bool = True, tokens_left: int | None = None) -> Ticket:
        """Reserve; with ``tokens_left`` (what a TPM limit leaves in its minute), for an output capped to fit
        them (:class:`NoRoom` when not even one output token fits)."""
        prompt = plan.prompt_tokens
        if prompt is None:
            prompt = count_prompt(req.body, req.shape, plan.candidates[0].upstream_model)
        prompts = own_prompts(req, plan)
        body, token_cap = req.body, None
        if tokens_left is not None:
            bound = max(prompt_bound(d, prompts.get(d.id, prompt) if prompts else prompt) for d in plan.candidates)
            token_cap = (tokens_left - bound) // choices_of(body)
            if token_cap < 1:
                raise NoRoom
            body = {**{k: v for k, v in body.items() if k != "max_completion_tokens"}, "max_tokens": token_cap}
        worst, least, tokens = worst_case(body, plan.candidates, prompt, req.endpoint, prompts)
        worst, least, tokens = min(worst, MAX_AMOUNT), min(least, MAX_AMOUNT), min(tokens, MAX_AMOUNT)
        reservation = ReserveRequest(self.ids.hold(), principal.team, worst, tokens, budgets, rates,
                                     datetime.now(UTC), least, partial)
        ticket = Ticket(self.books, req, principal, plan, reservation,
                        capped=bool(budgets) and req.endpoint != "embeddings")
        ticket.token_cap = token_cap
        try:
            ticket.admission = admission = await self.state.reserve(reservation, ticket.intent)
        except StateUnavailable as exc:
            await self._down(req, ticket, exc)
            return ticket
        if admission.admitted and admission.reserved_nano < worst and req.endpoint != "embeddings":
            ticket.output_cap = affordable_output(admission.reserved_nano, req.body, plan.candidates, prompt,
                                                  prompts)
        return ticket

    async def admit_hit(self, req: Request, principal: Principal, plan: Plan) -> Ticket:
        """Count a cache hit against RPM (no tokens, no budget hold); refuse it only for a rate limit."""
        attributed = attributed_limits(req.policies, req.attribution)
        budgets, rates = self.rules.rules(principal.spec, principal.key, False, attributed)
        now = datetime.now(UTC)
        for rules in (budgets, ()):
            if not rules and not rates:
                break
            reservation = ReserveRequest(self.ids.hold(), principal.team, 0, 0, rules, rates, now)
            ticket = Ticket(self.books, req, principal, plan, reservation)
            try:
                ticket.admission = admission = await self.state.reserve(reservation, ticket.intent)
            except StateUnavailable as exc:
                await self._down(req, ticket, exc)
                return ticket
            refusal = admission.refusal
            if refusal is None:
                return ticket
            if refusal.kind != "budget":   # a spent budget does not refuse a free answer; a rate limit does
                self.metrics.rate_limit_refused(principal.team)
                error = refusal_error(refusal, admission)
                await ticket.finish(error.code or "error")
                raise error
        return Ticket(self.books, req, principal, plan)

    async def _down(self, req: Request, ticket: Ticket, exc: StateUnavailable) -> None:
        """The budget store is unreachable: admit unmetered in fail mode allow (the settle is replayed when
        it is back), else refuse (503). Either way the store may have applied the hold before its reply was
        lost, so the ticket settles it: at the real cost, or at $0 for a refusal (queued until the store
        answers), and the hold never waits out its TTL."""
        if not self.state.fail_open:
            error: GatewayError = state_unavailable(exc)
            await ticket.finish(error.code or "error")
            raise error
        log.warning("admitting %s unmetered, settling later: %s", req.request_id, exc)
