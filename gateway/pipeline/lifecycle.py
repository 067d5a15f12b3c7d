"""One request's lifecycle, read top to bottom in :meth:`Pipeline.handle`.

decode (the codec, at the edge) → authenticate → validate into a typed request (the codec) →
resolve a plan (pure; it may say "too long") → savers: response cache, compression, prompt
caching → reserve, which returns the ticket → attempts with fallbacks → encode the reply (the
codec). From reserve on, the :class:`~gateway.pipeline.ticket.Ticket` alone prices, settles and
records, exactly once, whatever the exit: the JSON path finishes it in ``try``/``except``, a
stream in its relay's ``finally`` (:mod:`gateway.pipeline.streaming`), a cache hit, a refusal and
a compression summary call the same way. The stages live beside this module: admission
(reserve), attempts (the one fallback loop), savers, streaming, ticket; the pipeline only
sequences them and owns no money arithmetic of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from typing import Any

import orjson

from gateway.budgets.rules import call_output_cap, output_cap, rate_headers, requested_output
from gateway.errors import AuthenticationFailed, GatewayError, InvalidRequest, ServiceUnavailable
from gateway.money import usd_text
from gateway.policy import CompressionSettings, Deployment, Policies, TeamSpec
from gateway.policy.teams import DEFAULT_TEAM
from gateway.pricing import Usage, usage_from_openai
from gateway.providers.base import Call, Provider
from gateway.routing.cooldowns import HealthBook
from gateway.routing.resolve import Plan, RouteInput, resolve_policy
from gateway.savings import compression
from gateway.savings.accounting import hit_accounting
from gateway.savings.response_cache import Entry
from gateway.settings import Settings
from gateway.state import State
from gateway.state.budgets import StateUnavailable
from gateway.state.keys import KeyRecord
from gateway.state.ledger import NONE, LedgerRecord
from gateway.tokens import count_completion_text, count_prompt

from .admission import Admission
from .attempts import Attempts
from .attribution import attribution
from .auth import caller_key, secret_matches
from .codec import Codec
from .request import Headers, Inbound, Principal, Reply, Request, RequestIds, StreamReply
from .savers import SavingStages, build_store
from .streaming import relay
from .ticket import Books, Ticket, record_refusal

log = logging.getLogger("gateway")
SUMMARY_ROUTE = "compression_summary"
LEDGERED_REFUSALS = frozenset({"state_unavailable"})   # refusals before a ticket that the ledger records


def exit_status(exc: BaseException) -> str:
    """The ledger status of a request that ended with ``exc``."""
    if isinstance(exc, GatewayError):
        return exc.code or "error"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "client_closed"
    return "internal_error"


class Pipeline:
    def __init__(self, policies: Policies, providers: dict[str, Provider], metrics: Any, state: State,
                 settings: Settings, health: HealthBook | None = None) -> None:
        self.metrics = metrics
        self.state = state
        self.health = health or HealthBook(policies.health)
        self.master_key = settings.master_key
        self.ids = RequestIds()
        self.books = Books(state, metrics)
        self.admission = Admission(state, self.books, self.ids, metrics)
        self.attempts = Attempts(providers, self.health, metrics, settings.upstream_timeout_s)
        self.savers = SavingStages(build_store(state, policies), self.summarize)
        self.unlisted: dict[str, TeamSpec] = {}   # the spec of each team the policies do not list (no limits)
        self.use_policies(policies)

    def use_policies(self, policies: Policies) -> None:
        """Swap the policies in force; requests already past ``handle``'s first line finish on the old ones."""
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

    # ------------------------------------------------------------------ the lifecycle
    async def handle(self, inbound: Inbound, codec: Codec) -> Reply | StreamReply:
        policies = self.policies
        principal = await self.authenticate(inbound.headers, policies)
        inbound.team = principal.team
        inbound.request = req = codec.validate(inbound)
        req.policies, req.team = policies, principal.team
        req.attribution = attribution(req.headers, req.user)
        if codec.stateful:
            await codec.load(req, principal.team)
        plan = self.resolve(req, principal, req.model)
        if plan.too_long is not None:   # too long for every window: a cached answer, or compression
            req.route = plan.route
            entry = await self.savers.lookup(req, principal, plan)
            if entry is not None:
                return await self.answer_hit(req, codec, principal, plan, entry)
            if not await self.savers.compress_to_fit(req, principal, plan):
                raise plan.too_long_error()
            plan = self.resolve(req, principal, req.model)
            if plan.too_long is not None:
                raise plan.too_long_error()
        req.route = plan.route
        entry = await self.savers.lookup(req, principal, plan)
        if entry is not None:
            return await self.answer_hit(req, codec, principal, plan, entry)
        plan = await self.savers.compress(req, principal, plan)
        self.savers.mark_prompt_caching(req, principal, plan)
        ticket = await self.admission.reserve(req, principal, plan,
                                              lambda model: self.resolve(req, principal, model))
        if req.stream:
            return await self.open_stream(req, codec, ticket)
        return await self.complete(req, codec, ticket)

    async def authenticate(self, headers: dict[str, str], policies: Policies) -> Principal:
        token = caller_key(headers)
        if not token:
            raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.")
        if self.master_key is not None and secret_matches(token, self.master_key):
            return self.principal(DEFAULT_TEAM, None, policies)
        try:
            key = await self.state.keys.lookup(token)
            if key is None and self.master_key is None and not await self.state.keys.has_keys():
                return self.principal(DEFAULT_TEAM, None, policies)   # first run: no master key, no keys yet
        except StateUnavailable as exc:
            log.warning("key lookup failed, key state unreachable: %s", exc)
            mode = "allow" if self.state.fail_open else "refuse"
            raise ServiceUnavailable(
                f"The API key could not be verified: key state is unreachable and this gateway has not seen the "
                f"key recently (GATEWAY_REDIS_FAIL_MODE={mode}). Retry shortly.", code="state_unavailable") from None
        if key is None:
            raise AuthenticationFailed("Invalid API key.")
        if not key.active(time.time()):
            raise AuthenticationFailed(f"The API key {key.id} has been revoked or has expired.")
        return self.principal(key.team, key, policies)

    def principal(self, team: str, key: KeyRecord | None, policies: Policies | None = None) -> Principal:
        spec = (policies or self.policies).teams.get(team)
        if spec is None:   # one spec per unlisted team, not one per request (rules are memoised by spec)
            spec = self.unlisted.get(team)
            if spec is None:
                if len(self.unlisted) >= 4096:
                    self.unlisted.clear()
                spec = self.unlisted[team] = TeamSpec(team)
        return Principal(team, spec, key)

    def resolve(self, req: Request, principal: Principal, model: str) -> Plan:
        """The routing decision (a pure function of the policies, the request and a health snapshot)."""
        inp = RouteInput(team=principal.team, model=model, endpoint=req.shape, body=req.body,
                         raw_size=req.raw_size, key_id=principal.key_id, headers=req.headers,
                         allowed=principal.spec.allowed_models)
        plan = resolve_policy(req.policies or self.policies, inp, self.health.view(), allow_too_long=True)
        if req.prefer is not None and len(plan.candidates) > 1 and plan.candidates[0].id != req.prefer:
            first = [d for d in plan.candidates if d.id == req.prefer]   # affinity: the deployment holding the turn
            if first:
                plan = replace(plan, candidates=(*first, *(d for d in plan.candidates if d.id != req.prefer)))
        return plan

    def build_call(self, req: Request, codec: Codec, ticket: Ticket, deployment: Deployment,
                   timeout_s: float) -> Call:
        """The upstream call for ``deployment``: the codec's body for it, the upstream model, the output cap
        the ticket's hold pays for, and prompt-cache breakpoints when the policy asks for them."""
        wire, body = codec.call_body(req, deployment)
        if req.dropped and wire != req.endpoint and (ticket.principal.spec.strict_translation or (
                ticket.plan.rule is not None and ticket.plan.rule.strict_translation)):
            raise InvalidRequest(f"{deployment.id} does not speak the {req.endpoint} API, and translating this "
                                 f"request would drop: {', '.join(req.dropped)} (strict_translation is on).",
                                 code="unsupported_feature")
        body["model"] = deployment.upstream_model
        cap = call_output_cap(ticket.capped, ticket.output_cap, req.body, deployment)
        if ticket.token_cap is not None:   # the rate limit's tokens left this minute, whatever the price
            cap = min(cap if cap is not None else output_cap(req.body, deployment), ticket.token_cap)
        if cap is not None:
            codec.cap_output(wire, body, cap, deployment)
        if wire == req.shape or wire == req.endpoint:   # the internal chat shape, or the client's own API
            body = self.savers.prompt_caching(req, deployment, wire, body)
        return Call(wire, body, deployment, timeout_s, req.headers)

    async def complete(self, req: Request, codec: Codec, ticket: Ticket) -> Reply:
        """A JSON reply: call with fallbacks, finish the ticket, encode; the record runs after the write."""
        try:
            deployment, body = await self.attempts.complete(
                req, ticket, lambda d, timeout: self.build_call(req, codec, ticket, d, timeout))
            wire = codec.wire(req, deployment)
            usage = codec.reply_usage(wire, body) or self.estimate(req, deployment, codec.estimate_output(
                wire, body, deployment.upstream_model))
            ticket.upstream_cost_nano = codec.upstream_cost(wire, body)
            await ticket.finish("ok", usage, record_later=True)
            data, answer = codec.encode_reply(req, wire, body, usage, ticket.cost_nano, deployment)
            await self.savers.store(req, ticket, deployment, answer)
            if codec.stateful:
                await keep(codec, req, ticket, deployment, answer)
            headers = self.headers(req, ticket, deployment, settled=True, wire=wire)
            headers.append((b"x-gateway-cost-usd", usd_text(ticket.cost_nano).encode()))
        except BaseException as exc:
            if ticket.finished:
                ticket.record()
            else:
                await ticket.finish(exit_status(exc))
            raise
        return Reply(data, headers, after=ticket.record)

    async def open_stream(self, req: Request, codec: Codec, ticket: Ticket) -> StreamReply:
        """Open the first candidate whose stream produces a chunk; the relay finishes the ticket."""
        chunks: AsyncGenerator[dict[str, Any], None] | None = None
        try:
            deployment, first, chunks, started = await self.attempts.open_stream(
                req, ticket, lambda d, timeout: self.build_call(req, codec, ticket, d, timeout))
            wire = codec.wire(req, deployment)
            encoder = codec.stream(req, wire, deployment, self.savers.assembles(req))
            headers = self.headers(req, ticket, deployment, settled=False, wire=wire)
            headers[0] = (b"content-type", b"text/event-stream")
            headers.append((b"cache-control", b"no-cache"))

            async def store(answer: dict[str, Any] | None) -> None:
                await self.savers.store_stream(req, ticket, deployment, answer)
                if codec.stateful:
                    await keep(codec, req, ticket, deployment, answer)

            events = relay(ticket, deployment, first, chunks, encoder, started,
                           lambda: count_prompt(req.body, req.shape, deployment.upstream_model), store)
            return StreamReply(headers, await anext(events, b""), events)
        except BaseException as exc:
            if chunks is not None:
                await chunks.aclose()
            await ticket.finish(exit_status(exc))
            raise

    def estimate(self, req: Request, deployment: Deployment, output_tokens: int) -> Usage:
        """The gateway's own count, for a reply whose upstream reported no usage."""
        return Usage(input_tokens=count_prompt(req.body, req.shape, deployment.upstream_model),
                     output_tokens=output_tokens, estimated=True)

    async def answer_hit(self, req: Request, codec: Codec, principal: Principal, plan: Plan,
                         entry: Entry) -> Reply | StreamReply:
        """A response-cache hit: no upstream call, $0, through its own ticket (a rate limit still applies)."""
        ticket = await self.admission.admit_hit(req, principal, plan)
        deployment = next((d for d in plan.model.deployments if d.id == entry.deployment), plan.baseline)
        ticket.deployment = deployment
        await ticket.finish("ok", hit=hit_accounting(entry.input_tokens, entry.output_tokens, plan.baseline.price))
        headers = self.headers(req, ticket, deployment, settled=True)
        parts, answer = codec.replay(req, entry.body)
        if codec.stateful:   # a hit is a response like any other: a later turn or a GET may name its id
            await keep(codec, req, ticket, deployment, answer)
        if not req.stream:
            headers.append((b"x-gateway-cost-usd", b"0"))
            return Reply(parts[0], headers)
        headers[0] = (b"content-type", b"text/event-stream")
        headers.append((b"cache-control", b"no-cache"))
        return StreamReply(headers, parts[0], _replay(parts[1:]))

    async def summarize(self, req: Request, principal: Principal, settings: CompressionSettings,
                        text: str) -> tuple[str, int] | None:
        """The summary of ``text`` by the policy's summary model: a sub-request through routing, reserve,
        attempts and its own ticket, paid by the same team (route ``compression_summary``)."""
        assert settings.summary_model is not None
        body = compression.summary_request(settings, text)
        sub = Request("chat", "chat", body, settings.summary_model, False, False, requested_output(body),
                      len(orjson.dumps(body)), {}, f"{req.request_id}-summary", policies=req.policies, overhead=True)
        try:
            plan = replace(self.resolve(sub, principal, settings.summary_model), route=SUMMARY_ROUTE)
            if plan.too_long is not None:
                raise plan.too_long_error()
            ticket = await self.admission.reserve(sub, principal, plan,
                                                  lambda model: self.resolve(sub, principal, model))
        except GatewayError as exc:   # a refusal is recorded by its own ticket
            log.warning("compression summary of %s skipped: %s", req.request_id, exc.message)
            return None
        try:
            deployment, answer = await self.attempts.complete(
                sub, ticket, lambda d, timeout: Call("chat", {**sub.body, "model": d.upstream_model}, d, timeout))
            usage = usage_from_openai(answer.get("usage") if isinstance(answer.get("usage"), dict) else None)
            if usage is None:
                usage = self.estimate(sub, deployment, count_summary(answer, deployment.upstream_model))
            await ticket.finish("ok", usage)
        except GatewayError as exc:
            log.warning("compression summary of %s failed: %s", req.request_id, exc.message)
            await ticket.finish(exc.code or "error")
            return None
        except BaseException as exc:
            await ticket.finish(exit_status(exc))
            raise
        return summary_text(answer), ticket.cost_nano

    async def count_tokens(self, inbound: Inbound, codec: Codec,
                           estimate: Callable[[dict[str, Any]], int]) -> int:
        """Input tokens of a request, never charged: by the first candidate's own counting endpoint when it
        speaks the request's API natively, else (or when that fails) by ``estimate``."""
        principal = await self.authenticate(inbound.headers, self.policies)
        inbound.team = principal.team
        inbound.request = req = codec.validate(inbound)
        req.policies = self.policies
        plan = self.resolve(req, principal, req.model)
        deployment = plan.candidates[0]
        counter = self.attempts.providers.get("anthropic") if req.endpoint == "messages" else None
        if counter is not None and deployment.speaks(req.endpoint) and isinstance(req.native, dict):
            call = Call("count_tokens", {**req.native, "model": deployment.upstream_model}, deployment,
                        deployment.timeout_s or self.attempts.default_timeout_s, req.headers)
            try:
                tokens = int(await counter.count_tokens(call))   # type: ignore[attr-defined]
                self.metrics.tokens_counted(principal.team, "upstream")
                return tokens
            except GatewayError as exc:
                log.warning("count_tokens on %s failed, estimating: %s", deployment.id, exc.message)
        self.metrics.tokens_counted(principal.team, "estimate")
        return estimate(req.native if isinstance(req.native, dict) else req.body)

    def headers(self, req: Request, ticket: Ticket, deployment: Deployment, settled: bool,
                wire: str | None = None) -> Headers:
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
        if req.dropped and wire is not None and wire != req.endpoint:   # translated: what the target cannot do
            headers.append((b"x-gateway-dropped", ", ".join(req.dropped).encode()))
            log.info("request %s to %s: dropped %s", req.request_id, deployment.id, ", ".join(req.dropped))
        admission = ticket.admission
        if admission is not None:
            if admission.remaining_nano is not None:   # after settling; for a stream, with its hold still out
                remaining = admission.remaining_nano
                if settled:
                    remaining = max(0, remaining + admission.reserved_nano - ticket.cost_nano)
                headers.append((b"x-gateway-budget-remaining-usd", usd_text(remaining).encode()))
            headers.extend(rate_headers(admission))
        return headers

    def refused(self, inbound: Inbound | None, status: str, endpoint: str = "chat") -> None:
        """Count a request refused before its ticket existed (bad JSON, bad key, unknown model, key state
        unreachable, ...): ``gateway_requests_total`` with route and provider ``none``, an access line, and
        for a refusal the gateway's state caused (:data:`LEDGERED_REFUSALS`) a $0 ledger record: team ``(none)``
        when not known yet, no key id, model ``(none)``, the requested model and the endpoint."""
        if inbound is not None and inbound.recorded:
            return
        self.metrics.refused(inbound.team if inbound is not None else None,
                             inbound.model if inbound is not None else None, status)
        if inbound is not None:
            record_refusal(self.books, LedgerRecord(
                request_id=inbound.request_id, ts=time.time(), team=inbound.team or NONE, key_id=None,
                requested_model=inbound.model or "", model=NONE, deployment="", provider="", route="none",
                input_tokens=0, output_tokens=0, status=status, endpoint=endpoint,
                latency_ms=round((time.perf_counter() - inbound.started) * 1000, 3)),
                ledger=status in LEDGERED_REFUSALS)


def summary_text(answer: dict[str, Any]) -> str:
    choices = answer.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = first.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


def count_summary(answer: dict[str, Any], model: str) -> int:
    return count_completion_text(summary_text(answer), model)


async def keep(codec: Codec, req: Request, ticket: Ticket, deployment: Deployment,
               answer: dict[str, Any] | None) -> None:
    """The codec keeps the answer for later turns; a failure to keep it costs the client nothing now."""
    try:
        await codec.keep(req, ticket.principal.team, deployment, answer)
    except Exception:
        log.exception("could not keep the answer of %s for later turns", req.request_id)


async def _replay(events: list[bytes]) -> AsyncGenerator[bytes, None]:
    for event in events:
        yield event
