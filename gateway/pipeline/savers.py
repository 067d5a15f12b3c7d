"""The pipeline stages that save money: response cache, context compression, provider prompt caching.

:class:`SavingStages` is owned by the :class:`~gateway.pipeline.core.Pipeline` and called from
``Pipeline.handle`` by name: ``serve_from_cache`` (after resolve: a hit is answered here, in the
shape asked for, at $0), ``compress_to_fit`` (when no deployment's window holds the prompt) and
``compress`` (before reserve), ``prompt_caching`` (per deployment, in ``make_call``), and
``store``/``store_stream`` (after a successful miss). The decisions themselves live in
:mod:`gateway.savings.response_cache`, :mod:`gateway.savings.compression` and
:mod:`gateway.savings.prompt_caching`; this module only sequences them with the pipeline's own stages.

A hit holds no budget: it reserves $0 (so the remaining-budget header is still right) and takes
one request of the RPM allowance and no tokens; a budget that is already spent does not refuse a
hit, a rate limit does. The summary call of ``summarize`` is a sub-request through the pipeline's
resolve, reserve, call, price, settle and record stages, for the same team and key, with route
``compression_summary``; it is never served from the response cache.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from gateway.api import openai_sse as cache_stream
from gateway.budgets.rules import Ticket, budget_rules, rate_rules, refusal_error
from gateway.errors import ContextLengthExceeded, GatewayError, state_unavailable
from gateway.pipeline.request import Inbound, Outcome, Principal, Reply, StreamReply
from gateway.policy import CompressionSettings, Deployment, Policies, PromptCacheSettings
from gateway.routing.resolve import Plan
from gateway.savings import compression
from gateway.savings import prompt_caching as prompt_cache
from gateway.savings.accounting import hit_accounting
from gateway.savings.response_cache import (
    Entry,
    Lookup,
    MemoryStore,
    RedisStore,
    ResponseCache,
    Store,
    answer_for_storage,
)
from gateway.state import State
from gateway.state.budgets import ReserveRequest, StateUnavailable
from gateway.tokens import count_prompt

if TYPE_CHECKING:
    from gateway.pipeline.core import Pipeline

log = logging.getLogger("gateway")
SUMMARY_ROUTE = "compression_summary"


def build_store(state: State, policies: Policies) -> Store:
    """Redis when the state is shared (every worker and replica sees one cache), else in memory."""
    if state.redis is not None:
        return RedisStore(state.redis)
    return MemoryStore(policies.cache.memory_max_entries, policies.cache.memory_max_bytes)


async def _replay(events: list[bytes]) -> AsyncGenerator[bytes, None]:
    for event in events:
        yield event


class SavingStages:
    def __init__(self, pipeline: Pipeline, store: Store) -> None:
        self.pipeline = pipeline
        self.cache = ResponseCache(store)

    def policies(self, req: Inbound) -> Policies:
        """The policies ``req`` runs on: those in force when it arrived (a reload swaps only the next)."""
        return req.policies or self.pipeline.policies

    def use_policies(self, policies: Policies) -> None:
        store = self.cache.store
        if isinstance(store, MemoryStore):
            store.resize(policies.cache.memory_max_entries, policies.cache.memory_max_bytes)

    # ------------------------------------------------------------ response cache
    async def serve_from_cache(self, req: Inbound, principal: Principal, plan: Plan) -> Reply | StreamReply | None:
        """Look the request up; on a hit, answer it (no upstream call, $0), else note the miss or bypass."""
        if req.cache is not None:   # looked up already, before compressing a prompt too long for every window
            return None
        settings = self.policies(req).cache.for_request(principal.team, plan.route)
        body = req.original_body if req.original_body is not None else req.body
        req.cache = lookup = await self.cache.lookup(settings, principal.team, plan.model.name, req.endpoint,
                                                     body, req.headers)
        if lookup.entry is None:
            return None
        return await self.answer_hit(req, principal, plan, lookup.entry)

    async def answer_hit(self, req: Inbound, principal: Principal, plan: Plan, entry: Entry) -> Reply | StreamReply:
        p = self.pipeline
        stream = req.body.get("stream") is True and req.endpoint != "embeddings"
        try:
            ticket = await self.admit_hit(req, principal, plan)
        except GatewayError as exc:   # a rate limit: recorded at $0 like any refusal
            p.record(req, Outcome(principal, plan, None, stream=stream), exc.code or "error")
            raise
        deployment = next((d for d in plan.model.deployments if d.id == entry.deployment), plan.baseline)
        outcome = Outcome(principal, plan, deployment, stream=stream)
        accounting = hit_accounting(entry.input_tokens, entry.output_tokens, plan.baseline.price)
        outcome.baseline_nano, outcome.savings = accounting.baseline_nano, accounting.savings
        await p.settle(ticket, outcome)          # releases the $0 hold and the estimated tokens
        p.record(req, outcome, status="ok")
        headers = p.headers(req, ticket, deployment, outcome)
        body = entry.body
        if not stream:
            if isinstance(body.get("usage"), dict):
                body = {**body, "usage": {**body["usage"], "cost_usd": 0.0}}
            headers.append((b"x-gateway-cost-usd", b"0"))
            return Reply(orjson.dumps(body), headers)
        opts = req.body.get("stream_options")
        wants_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        events = cache_stream.replay_events(body, req.endpoint, wants_usage)
        headers[0] = (b"content-type", b"text/event-stream")
        headers.append((b"cache-control", b"no-cache"))
        return StreamReply(headers, events[0], _replay(events[1:]))

    async def admit_hit(self, req: Inbound, principal: Principal, plan: Plan) -> Ticket:
        """Count the hit against RPM (no tokens, no budget hold); refuse it only for a rate limit."""
        p = self.pipeline
        budgets, rates = budget_rules(principal.spec, principal.key), rate_rules(principal.spec, principal.key)
        now = datetime.now(UTC)
        for rules in (budgets, ()):
            if not rules and not rates:
                return Ticket(plan)
            reservation = ReserveRequest(p.ids.hold(), principal.team, 0, 0, rules, rates, now)
            try:
                admission = await p.state.reserve(reservation)
            except StateUnavailable as exc:
                if not p.state.fail_open:
                    raise state_unavailable(exc) from None
                return Ticket(plan)
            refusal = admission.refusal
            if refusal is None:
                return Ticket(plan, reservation, admission)
            if refusal.kind != "budget":
                m = p.metrics
                m.child(m.rate_limited, m.team_label(principal.team)).inc()
                raise refusal_error(refusal, admission)
        return Ticket(plan)   # not reached: the second pass has no budgets to refuse

    def assembler(self, req: Inbound) -> cache_stream.StreamAssembler | None:
        """Collects a streamed miss so it can be stored (None when it will not be)."""
        lookup = req.cache
        return cache_stream.StreamAssembler(req.endpoint) if lookup is not None and lookup.key else None

    def _storable(self, lookup: Lookup | None, ticket: Ticket) -> bool:
        # not an answer shortened to fit a budget's last cents, nor another model's (a downgrade)
        return (lookup is not None and lookup.key is not None and ticket.output_cap is None
                and ticket.plan.model.name == lookup.model)

    def _entry(self, req: Inbound, deployment: Deployment, body: dict[str, Any], outcome: Outcome) -> Entry:
        usage = outcome.usage
        removed = req.compression.removed if req.compression is not None else 0
        return Entry(answer_for_storage(body), req.endpoint,
                     (usage.input_tokens if usage else 0) + removed, usage.output_tokens if usage else 0,
                     deployment.id, datetime.now(UTC).timestamp())

    async def store(self, req: Inbound, ticket: Ticket, deployment: Deployment, body: dict[str, Any],
                    outcome: Outcome) -> None:
        if self._storable(req.cache, ticket):
            assert req.cache is not None
            await self.cache.store_answer(req.cache, self._entry(req, deployment, body, outcome))

    async def store_stream(self, req: Inbound, ticket: Ticket, deployment: Deployment,
                           assembled: cache_stream.StreamAssembler, outcome: Outcome) -> None:
        if not self._storable(req.cache, ticket) or not assembled.complete():
            return
        usage = None
        if assembled.usage is None and outcome.usage is not None:
            u = outcome.usage
            usage = {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
                     "total_tokens": u.total_tokens}
        assert req.cache is not None
        await self.cache.store_answer(req.cache, self._entry(req, deployment, assembled.answer(usage), outcome))

    # ------------------------------------------------------------ compression
    async def compress_to_fit(self, req: Inbound, principal: Principal, model: str,
                              exc: ContextLengthExceeded) -> Plan:
        """The prompt fits no deployment's window: compress it for the largest one and resolve again."""
        p = self.pipeline
        if req.endpoint != "chat":
            raise exc
        settings = self.policies(req).compression.for_request(principal.team, exc.route)
        windowed = [d for d in exc.candidates if d.context_window]
        if not settings.enabled or not windowed:
            raise exc
        widest = max(windowed, key=lambda d: d.context_window or 0)
        limit = compression.threshold(settings, widest.context_window)
        assert limit is not None
        tokens = count_prompt(req.body, "chat", widest.upstream_model)
        await self.run_compression(req, principal, settings, widest, tokens, limit,
                                   self.policies(req).prompt_cache.for_request(principal.team, exc.route))
        if req.compression is None or req.compression.removed == 0:
            raise exc
        req.raw_size = len(orjson.dumps(req.body))
        return p.resolve(req, principal, model)

    async def compress(self, req: Inbound, principal: Principal, plan: Plan) -> Plan:
        """Compress a chat request whose prompt passes the policy's threshold (the plan, updated)."""
        if req.endpoint != "chat" or req.compression is not None:
            return plan
        settings = self.policies(req).compression.for_request(principal.team, plan.route)
        if not settings.enabled:
            return plan
        chosen = plan.candidates[0]
        limit = compression.threshold(settings, chosen.context_window)
        if limit is None or (plan.prompt_tokens is None and req.raw_size * 2 <= limit):
            return plan      # a prompt has fewer tokens than half its bytes' worth: no count needed
        if plan.prompt_tokens is not None and plan.prompt_tokens <= limit:
            return plan
        tokens = count_prompt(req.body, "chat", chosen.upstream_model)
        if tokens <= limit:
            return plan
        await self.run_compression(req, principal, settings, chosen, tokens, limit,
                                   self.policies(req).prompt_cache.for_request(principal.team, plan.route))
        return plan if req.compression is None else replace(plan, prompt_tokens=req.compression.after)

    async def run_compression(self, req: Inbound, principal: Principal, settings: CompressionSettings,
                              deployment: Deployment, tokens: int, limit: int,
                              caching: PromptCacheSettings) -> None:
        protected = prompt_cache.protected_messages(req.body, deployment, caching)

        async def summarise(text: str) -> tuple[str, int] | None:
            return await self.summarise(req, principal, settings, text)

        result = await compression.compress(req.body, settings, deployment.upstream_model, tokens,
                                            compression.target(settings, limit), protected, summarise)
        if result is not None:
            req.original_body = req.body
            req.body, req.compression = result

    async def summarise(self, req: Inbound, principal: Principal, settings: CompressionSettings,
                        text: str) -> tuple[str, int] | None:
        """The summary of ``text`` by the policy's summary model, through routing, paid by the team."""
        p = self.pipeline
        assert settings.summary_model is not None
        body = compression.summary_request(settings, text)
        sub = Inbound("chat", body, len(orjson.dumps(body)), {}, f"{req.request_id}-summary", policies=req.policies)
        try:
            plan = replace(p.resolve(sub, principal, settings.summary_model), route=SUMMARY_ROUTE)
        except GatewayError as exc:
            log.warning("compression summary of %s skipped: %s", req.request_id, exc.message)
            return None
        try:
            ticket = await p.reserve(sub, principal, plan)
        except GatewayError as exc:
            log.warning("compression summary of %s refused: %s", req.request_id, exc.message)
            p.record(sub, Outcome(principal, plan, None, stream=False, overhead=True), exc.code or "error")
            return None
        outcome = Outcome(principal, ticket.plan, None, stream=False, overhead=True)
        try:
            deployment, answer = await p.call_with_fallbacks(sub, ticket, outcome)
        except GatewayError as exc:
            log.warning("compression summary of %s failed: %s", req.request_id, exc.message)
            await p.settle(ticket, outcome)
            p.record(sub, outcome, status=exc.code or "error")
            return None
        p.price(outcome, deployment, p.usage_of(sub, deployment, answer, outcome))
        await p.settle(ticket, outcome)
        p.record(sub, outcome, status="ok")
        choices = answer.get("choices")
        first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        content = (first.get("message") or {}).get("content") if isinstance(first.get("message"), dict) else None
        return (content if isinstance(content, str) else ""), outcome.cost_nano

    # ------------------------------------------------------------ prompt caching
    def mark_prompt_caching(self, req: Inbound, principal: Principal, plan: Plan) -> None:
        if req.endpoint == "chat":
            settings = self.policies(req).prompt_cache.for_request(principal.team, plan.route)
            if settings.enabled:
                req.prompt_cache = (settings, principal.team)

    def prompt_caching(self, req: Inbound, deployment: Deployment, body: dict[str, Any]) -> dict[str, Any]:
        """The body for ``deployment`` with breakpoints or a cache key, when the policy asks for them."""
        if req.prompt_cache is None:
            return body
        settings, team = req.prompt_cache
        return prompt_cache.apply(body, deployment, settings, team)
