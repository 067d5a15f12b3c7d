"""The request path, one method per stage, read top to bottom in :meth:`Pipeline.handle`.

authenticate → validate → resolve policy (pure) → serve from the response cache →
compress → reserve → call the upstream with fallbacks (prompt-cache breakpoints per
deployment) → price → settle → store in the response cache → record (for a JSON reply, run by
the edge once the reply is written, so its cost is off the response's latency). The saving stages
live in :mod:`gateway.pipeline.savers`, the streaming ones in :mod:`gateway.pipeline.streaming`,
the data they pass around in :mod:`gateway.pipeline.request`. Non-streaming requests return a
:class:`Reply`; streaming ones a :class:`StreamReply` whose events price and record the
stream when it ends, however it ends. The HTTP edge only parses and renders.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any

import orjson

from gateway.api.openai_validation import validate
from gateway.budgets.rules import (
    Ticket,
    affordable_output,
    budget_rules,
    call_output_cap,
    cap_output,
    rate_headers,
    rate_rules,
    refusal_error,
    worst_case,
)
from gateway.errors import (
    AuthenticationFailed,
    ContextLengthExceeded,
    GatewayError,
    UpstreamError,
    UpstreamTimeout,
    state_unavailable,
)
from gateway.pipeline.request import (
    Headers,
    Inbound,
    Outcome,
    Principal,
    Reply,
    RequestIds,
    StreamReply,
    bearer_token,
    choice_text,
    combined_failure,
    falls_back,
    nano_float,
    provider_kind,
    usd_str,
)
from gateway.pipeline.savers import SavingStages, build_store
from gateway.pipeline.streaming import StreamStages, usage_dict
from gateway.policy import Deployment, Policies, TeamSpec
from gateway.policy.teams import DEFAULT_TEAM
from gateway.pricing import Usage, usage_from_openai
from gateway.providers.base import Call, Provider
from gateway.routing.cooldowns import HealthBook
from gateway.routing.resolve import Plan, RouteInput, resolve_policy
from gateway.savings.accounting import SavingsMeter, account
from gateway.settings import Settings
from gateway.state import State
from gateway.state.budgets import BudgetRule, RateRule, ReserveRequest, StateUnavailable
from gateway.state.keys import KeyRecord
from gateway.state.ledger import LedgerRecord
from gateway.tokens import count_completion_text, count_prompt

log = logging.getLogger("gateway")
OTHER_MODEL = "other"
HEALTH_FAILURES = frozenset({"server_error", "timeout", "connection", "rate_limit", "auth"})  # count toward cooldown


class Pipeline:
    def __init__(self, policies: Policies, providers: dict[str, Provider], metrics: Any, state: State,
                 settings: Settings, health: HealthBook | None = None) -> None:
        self.providers = providers
        self.metrics = metrics
        self.state = state
        self.health = health or HealthBook(policies.health)
        self.master_key = settings.master_key
        self.upstream_timeout_s = settings.upstream_timeout_s
        self.ids = RequestIds()
        self.savings = SavingsMeter(metrics)
        self.savers = SavingStages(self, build_store(state, policies))
        self.streams = StreamStages(self)
        self.use_policies(policies)

    def use_policies(self, policies: Policies) -> None:
        """Swap the policies in force; requests already past ``resolve`` finish on the old ones."""
        self.policies = policies
        self.metrics.set_known_models(policies.models)
        self.health.spec = policies.health
        self.health.watch(policies.deployments)
        self.savers.use_policies(policies)
        self.metrics.set_known_teams(policies.teams)

    def deployment_health(self) -> dict[tuple[str, str, str], bool]:
        """Whether each configured deployment is usable (not cooled down), keyed (model, provider,
        deployment id); read at scrape time for ``gateway_deployment_healthy``."""
        healthy = self.health.healthy()
        return {(d.model, d.provider, d.id): healthy.get(d.id, True) for d in self.policies.deployments}

    # ------------------------------------------------------------------ stages
    async def handle(self, req: Inbound) -> Reply | StreamReply:
        req.policies = self.policies
        principal = await self.authenticate(req)
        req.team = principal.team
        model = validate(req.endpoint, req.body)
        try:
            plan = self.resolve(req, principal, model)
        except ContextLengthExceeded as exc:   # too long for every deployment: a cached answer or compression
            req.route = exc.route
            if exc.plan is not None and (cached := await self.savers.serve_from_cache(req, principal, exc.plan)):
                return cached
            plan = await self.savers.compress_to_fit(req, principal, model, exc)
        req.route = plan.route
        cached = await self.savers.serve_from_cache(req, principal, plan)
        if cached is not None:
            return cached
        plan = await self.savers.compress(req, principal, plan)
        self.savers.mark_prompt_caching(req, principal, plan)
        try:
            ticket = await self.reserve(req, principal, plan)
        except GatewayError as exc:   # refused before any upstream call: recorded at $0
            self.record(req, Outcome(principal, plan, None, stream=req.body.get("stream") is True,
                                     compression=req.compression), exc.code or "error")
            raise
        if req.body.get("stream") is True and req.endpoint != "embeddings":
            return await self.streams.open(req, principal, ticket)
        outcome = Outcome(principal, ticket.plan, None, stream=False, compression=req.compression)
        try:
            deployment, body = await self.call_with_fallbacks(req, ticket, outcome)
        except GatewayError as exc:
            await self.settle(ticket, outcome)
            self.record(req, outcome, status=exc.code or "error")
            raise
        usage = self.usage_of(req, deployment, body, outcome)
        self.price(outcome, deployment, usage)
        if not isinstance(body.get("usage"), dict):   # the upstream reported none: the gateway's count
            body["usage"] = usage_dict(usage)
        body["usage"]["cost_usd"] = nano_float(outcome.cost_nano)
        await self.settle(ticket, outcome)
        await self.savers.store(req, ticket, deployment, body, outcome)
        headers = self.headers(req, ticket, deployment, outcome)
        headers.append((b"x-gateway-cost-usd", usd_str(outcome.cost_nano).encode()))
        return Reply(orjson.dumps(body), headers, after=partial(self.record, req, outcome, "ok"))

    async def authenticate(self, req: Inbound) -> Principal:
        token = bearer_token(req.headers)
        if not token:
            raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>'.")
        if self.master_key is not None and hmac.compare_digest(token, self.master_key):
            return self.principal(DEFAULT_TEAM, None, req.policies)
        try:
            key = await self.state.keys.lookup(token)
            if key is None and self.master_key is None and not await self.state.keys.has_keys():
                return self.principal(DEFAULT_TEAM, None, req.policies)   # first run: no master key, no keys yet
        except StateUnavailable as exc:
            raise state_unavailable(exc) from None
        if key is None:
            raise AuthenticationFailed("Invalid API key.")
        if not key.active(time.time()):
            raise AuthenticationFailed(f"The API key {key.id} has been revoked or has expired.")
        return self.principal(key.team, key, req.policies)

    def principal(self, team: str, key: KeyRecord | None, policies: Policies | None = None) -> Principal:
        teams = (policies or self.policies).teams
        return Principal(team, teams.get(team) or TeamSpec(team), key)

    def resolve(self, req: Inbound, principal: Principal, model: str) -> Plan:
        """The routing decision (a pure function of the policies, the request and a health snapshot)."""
        inp = RouteInput(team=principal.team, model=model, endpoint=req.endpoint, body=req.body,
                         raw_size=req.raw_size, key_id=principal.key_id, headers=req.headers,
                         allowed=principal.spec.allowed_models)
        return resolve_policy(req.policies or self.policies, inp, self.health.view())

    async def reserve(self, req: Inbound, principal: Principal, plan: Plan) -> Ticket:
        """Hold the worst case against every budget and take the rate allowance, or refuse.

        A team whose policy says ``downgrade`` goes to its cheaper model once it is past its
        soft threshold or its budget cannot cover the whole worst case on the requested model."""
        spec, key = principal.spec, principal.key
        downgrades = (spec.on_exceed == "downgrade" and spec.downgrade_to is not None
                      and any(d.model != spec.downgrade_to for d in plan.candidates))
        budgets, rates = budget_rules(spec, key, soft=downgrades), rate_rules(spec, key)
        if not budgets and not rates:
            return Ticket(plan)
        ticket = await self.try_reserve(req, principal, plan, budgets, rates, partial=not downgrades)
        refusal = ticket.admission.refusal if ticket.admission else None
        if refusal is not None and refusal.kind in ("budget", "budget_soft") and downgrades:
            assert spec.downgrade_to is not None
            cheaper = replace(self.resolve(req, principal, spec.downgrade_to), route="downgrade",
                              requested=plan.requested, baseline=plan.baseline)
            req.route = cheaper.route
            ticket = await self.try_reserve(req, principal, cheaper, budget_rules(spec, key), rates)
            refusal = ticket.admission.refusal if ticket.admission else None
        if refusal is not None:
            assert ticket.admission is not None
            m = self.metrics
            m.child(m.budget_rejections if refusal.kind.startswith("budget") else m.rate_limited,
                    m.team_label(principal.team)).inc()
            raise refusal_error(refusal, ticket.admission)
        return ticket

    async def try_reserve(self, req: Inbound, principal: Principal, plan: Plan, budgets: tuple[BudgetRule, ...],
                          rates: tuple[RateRule, ...], partial: bool = True) -> Ticket:
        prompt = plan.prompt_tokens
        if prompt is None:
            prompt = count_prompt(req.body, req.endpoint, plan.candidates[0].upstream_model)
        worst, least, tokens = worst_case(req.body, plan.candidates, prompt, req.endpoint)
        reservation = ReserveRequest(self.ids.hold(), principal.team, worst, tokens, budgets, rates,
                                     datetime.now(UTC), least, partial)
        ticket = Ticket(plan, reservation, capped=bool(budgets) and req.endpoint != "embeddings")
        try:
            ticket.admission = admission = await self.state.reserve(reservation)
        except StateUnavailable as exc:
            if not self.state.fail_open:
                raise state_unavailable(exc) from None
            log.warning("admitting %s unmetered, settling later: %s", req.request_id, exc)
            return ticket
        if admission.admitted and admission.reserved_nano < worst and req.endpoint != "embeddings":
            ticket.output_cap = affordable_output(admission.reserved_nano, req.body, plan.candidates, prompt)
        return ticket

    async def call_with_fallbacks(self, req: Inbound, ticket: Ticket,
                                  outcome: Outcome) -> tuple[Deployment, dict[str, Any]]:
        plan = ticket.plan
        failures: list[tuple[Deployment, UpstreamError]] = []
        for deployment in plan.candidates[:plan.max_attempts]:
            call = self.make_call(req, ticket, deployment, self.attempt_timeout(req, plan, deployment, failures))
            outcome.deployment = deployment
            started = time.perf_counter()
            try:
                body = await self.providers[provider_kind(deployment)].complete(call)
            except UpstreamError as exc:
                outcome.upstream_s += time.perf_counter() - started
                self.upstream_failed(deployment, exc, failures)
                if not falls_back(plan, exc):
                    raise
                continue
            elapsed = time.perf_counter() - started
            outcome.upstream_s += elapsed
            self.health.succeeded(deployment, elapsed)
            if failures:
                self.fell_back(failures[-1], deployment)
            return deployment, body
        raise combined_failure(failures)

    def attempt_timeout(self, req: Inbound, plan: Plan, deployment: Deployment,
                        failures: list[tuple[Deployment, UpstreamError]]) -> float:
        """The next attempt's timeout: the deployment's own, cut to what is left of the route's deadline."""
        timeout = deployment.timeout_s or self.upstream_timeout_s
        deadline = plan.deadline_s
        if deadline is None:
            return timeout
        left = deadline - (time.perf_counter() - req.started)
        if left <= 0.001:
            tried = "; ".join(f"{d.id}: {exc.message}" for d, exc in failures) or "no attempt finished"
            raise UpstreamTimeout(f"The route '{plan.route}' deadline of {deadline:g}s passed ({tried}).")
        return min(timeout, left)

    def make_call(self, req: Inbound, ticket: Ticket, deployment: Deployment, timeout_s: float) -> Call:
        body = dict(req.body)
        body["model"] = deployment.upstream_model
        cap = call_output_cap(ticket, req.body, deployment)
        if cap is not None:
            cap_output(body, cap, deployment, req.endpoint)
        body = self.savers.prompt_caching(req, deployment, body)
        return Call(req.endpoint, body, deployment, timeout_s)

    def usage_of(self, req: Inbound, deployment: Deployment, body: dict[str, Any],
                 outcome: Outcome) -> Usage:
        usage = usage_from_openai(body.get("usage") if isinstance(body.get("usage"), dict) else None)
        if usage is not None:
            return usage
        model = deployment.upstream_model
        output = 0
        for choice in body.get("choices") or ():
            if isinstance(choice, dict):
                output += count_completion_text(choice_text(choice), model)
        return Usage(input_tokens=count_prompt(req.body, req.endpoint, model), output_tokens=output,
                     estimated=True)

    def price(self, outcome: Outcome, deployment: Deployment, usage: Usage) -> None:
        """Cost, baseline and savings by source (routing, prompt_cache, compression): gateway.savings.accounting."""
        outcome.usage = usage
        removed = outcome.compression.removed if outcome.compression is not None else 0
        priced = account(usage, deployment.price, outcome.plan.baseline.price, removed_tokens=removed,
                         overhead=outcome.overhead)
        outcome.cost_nano, outcome.baseline_nano, outcome.savings = priced.cost_nano, priced.baseline_nano, \
            priced.savings

    async def settle(self, ticket: Ticket, outcome: Outcome) -> None:
        """Charge what the request really cost (0 if it failed unbilled) and release the rest of the hold."""
        if ticket.reservation is None:
            return
        usage = outcome.usage
        tokens = usage.input_tokens + usage.output_tokens if usage is not None else 0
        await self.state.settle(ticket.reservation, outcome.cost_nano, tokens)

    def record(self, req: Inbound, outcome: Outcome, status: str) -> None:
        req.recorded = True
        self.state.record(ledger_record(req, outcome, status))
        m = self.metrics
        d = outcome.deployment
        team = m.team_label(outcome.principal.team)
        model = m.model_label(d.model if d is not None else outcome.plan.requested)
        provider = d.provider if d else "none"
        cache = req.cache_result
        now = time.perf_counter()
        c = m.for_request(team, model, provider, outcome.plan.route, m.code_label(status), cache, outcome.stream)
        c.requests.inc()
        if req.cache is not None:
            m.child(m.cache_requests, team, cache).inc()
        if outcome.compression is not None:
            for strategy, tokens in outcome.compression.saved.items():
                m.child(m.compression_saved, team, strategy).inc(tokens)
        c.overhead.observe(max(0.0, now - req.started - outcome.upstream_s))
        c.duration.observe(now - req.started)
        if outcome.savings:
            self.savings.add(team, outcome.savings)
        if d is not None and cache != "hit":
            c.upstream().observe(outcome.upstream_s)
            if outcome.ttft_s is not None:
                c.ttft().observe(outcome.ttft_s)
        usage = outcome.usage
        if usage is not None:
            for kind, n in (("input", usage.input_tokens), ("output", usage.output_tokens),
                            ("cached_input", usage.cached_input_tokens),
                            ("cache_write", usage.cache_write_tokens + usage.cache_write_1h_tokens),
                            ("reasoning", usage.reasoning_tokens)):
                if n:
                    c.tokens(kind).inc(n)
            if outcome.cost_nano:
                c.cost().inc(outcome.cost_nano / 1e9)

    def refused(self, req: Inbound | None, status: str) -> None:
        """Count a request refused before any plan was made (bad JSON, bad key, unknown model, ...):
        ``gateway_requests_total`` with route and provider ``none``; no ledger record (nothing was spent)."""
        if req is not None and req.recorded:
            return
        m = self.metrics
        requested = req.body.get("model") if req is not None and isinstance(req.body, dict) else None
        team = m.team_label(req.team) if req is not None and req.team is not None else "none"
        model = m.model_label(requested) if isinstance(requested, str) else OTHER_MODEL
        m.child(m.requests, team, model, "none", "none", m.code_label(status), "bypass").inc()

    def headers(self, req: Inbound, ticket: Ticket, deployment: Deployment, outcome: Outcome | None) -> Headers:
        headers = [
            (b"content-type", b"application/json"),
            (b"x-request-id", req.request_id.encode()),
            (b"x-gateway-model", deployment.id.encode()),
            (b"x-gateway-provider", deployment.provider.encode()),
            (b"x-gateway-route", ticket.plan.route.encode()),
            (b"x-gateway-cache", req.cache_result.encode()),
        ]
        if req.compression is not None:
            headers.append((b"x-gateway-compression", req.compression.header.encode()))
        admission = ticket.admission
        if admission is not None:
            if admission.remaining_nano is not None:   # after settling; for a stream, with its hold still out
                remaining = admission.remaining_nano
                if outcome is not None:
                    remaining = max(0, remaining + admission.reserved_nano - outcome.cost_nano)
                headers.append((b"x-gateway-budget-remaining-usd", usd_str(remaining).encode()))
            headers.extend(rate_headers(admission))
        return headers

    def upstream_failed(self, deployment: Deployment, exc: UpstreamError,
                        failures: list[tuple[Deployment, UpstreamError]]) -> None:
        failures.append((deployment, exc))
        m = self.metrics
        m.child(m.upstream_errors, deployment.provider, m.model_label(deployment.model), exc.failure).inc()
        if exc.failure in HEALTH_FAILURES:
            self.health.failed(deployment)
        log.warning("upstream failure on %s: %s", deployment.id, exc.message)

    def fell_back(self, failure: tuple[Deployment, UpstreamError], to: Deployment) -> None:
        frm, exc = failure
        m = self.metrics
        m.child(m.fallbacks, m.model_label(frm.model), m.model_label(to.model), exc.failure).inc()

def ledger_record(req: Inbound, outcome: Outcome, status: str) -> LedgerRecord:
    d, usage, plan = outcome.deployment, outcome.usage or Usage(), outcome.plan
    report = outcome.compression
    return LedgerRecord(
        request_id=req.request_id, ts=time.time(), team=outcome.principal.team, key_id=outcome.principal.key_id,
        requested_model=plan.requested, model=d.model if d else plan.model.name, deployment=d.id if d else "",
        provider=d.provider if d else "", route=plan.route, input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens, cached_input_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens + usage.cache_write_1h_tokens,
        reasoning_tokens=usage.reasoning_tokens, cost_nano=outcome.cost_nano, baseline_nano=outcome.baseline_nano,
        savings=dict(outcome.savings), latency_ms=round((time.perf_counter() - req.started) * 1000, 3),
        ttft_ms=round(outcome.ttft_s * 1000, 3) if outcome.ttft_s is not None else None, status=status,
        cache=req.cache_result, compressed=report is not None,
        compression_saved_tokens=report.removed if report is not None else 0,
        estimated=usage.estimated, stream=outcome.stream)
