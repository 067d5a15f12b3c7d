"""Calling the plan's candidates in order until one answers: the one fallback loop.

:class:`Attempts` owns the providers, the deployment health book and the upstream-failure
metrics. :meth:`Attempts.complete` (a JSON answer) and :meth:`Attempts.open_stream` (a stream
that has produced its first chunk) share one loop: each candidate gets the time left of the
route's deadline, a failure is counted against the deployment's health and falls back to the
next candidate when the route's ``retry_on`` names it, and once every candidate failed the
client gets one combined error. A stream never falls back after its first chunk (the client
has bytes). What an attempt charged and how long it took is written on the request's
:class:`~gateway.pipeline.ticket.Ticket`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar, cast

from gateway.errors import GatewayError, InvalidRequest, UpstreamError, UpstreamRateLimited, UpstreamTimeout
from gateway.policy import Deployment
from gateway.policy.models import credential_error
from gateway.providers.base import Call, Provider
from gateway.routing.cooldowns import HealthBook
from gateway.routing.resolve import Plan

from .request import Request
from .ticket import Ticket

log = logging.getLogger("gateway")
HEALTH_FAILURES = frozenset({"server_error", "timeout", "connection", "rate_limit", "auth"})  # count toward cooldown
T = TypeVar("T")
Chunks = AsyncGenerator[dict[str, Any], None]
BuildCall = Callable[[Deployment, float], Call]


def _complete(provider: Provider, call: Call) -> Awaitable[dict[str, Any]]:
    return provider.complete(call)   # the coroutine itself: no wrapper coroutine per attempt


class Attempts:
    def __init__(self, providers: dict[str, Provider], health: HealthBook, metrics: Any,
                 default_timeout_s: float) -> None:
        self.providers = providers
        self.health = health
        self.metrics = metrics
        self.default_timeout_s = default_timeout_s

    async def complete(self, req: Request, ticket: Ticket, build: BuildCall) -> tuple[Deployment, dict[str, Any]]:
        """The first candidate's JSON answer that did not fail."""
        deployment, body, started = await self._run(req, ticket, build, _complete)
        elapsed = time.perf_counter() - started
        ticket.upstream_s += elapsed
        self.health.succeeded(deployment, elapsed)
        return deployment, body

    async def open_stream(self, req: Request, ticket: Ticket,
                          build: BuildCall) -> tuple[Deployment, dict[str, Any] | None, Chunks, float]:
        """The first candidate whose stream produced its first chunk: (deployment, that chunk or None for
        an empty stream, the rest, when the attempt started)."""
        async def once(provider: Provider, call: Call) -> tuple[dict[str, Any] | None, Chunks]:
            chunks = cast(Chunks, provider.stream(call))
            try:
                return await chunks.__anext__(), chunks
            except StopAsyncIteration:
                return None, chunks
            except BaseException:
                await chunks.aclose()
                raise

        deployment, (first, chunks), started = await self._run(req, ticket, build, once)
        now = time.perf_counter()
        ticket.ttft_s = now - req.started
        self.health.succeeded(deployment, ttft_s=now - started)
        return deployment, first, chunks, started

    async def _run(self, req: Request, ticket: Ticket, build: BuildCall,
                   once: Callable[[Provider, Call], Awaitable[T]]) -> tuple[Deployment, T, float]:
        plan = ticket.plan
        failures: list[tuple[Deployment, UpstreamError]] = []
        for deployment in plan.candidates[:plan.max_attempts]:
            call = build(deployment, self.timeout(req, plan, deployment, failures))
            ticket.deployment = deployment
            started = time.perf_counter()
            try:
                missing = credential_error(deployment)   # its key variable is unset: nothing is sent
                if missing is not None:
                    raise missing
                result = await once(self.providers[provider_kind(deployment, call.endpoint)], call)
            except UpstreamError as exc:
                ticket.upstream_s += time.perf_counter() - started
                self.failed(deployment, exc, failures)
                if not falls_back(plan, exc):
                    raise
                continue
            if failures:
                frm, why = failures[-1]
                self.metrics.fell_back(frm.model, deployment.model, why.failure)
            return deployment, result, started
        raise combined_failure(failures)

    def timeout(self, req: Request, plan: Plan, deployment: Deployment,
                failures: list[tuple[Deployment, UpstreamError]]) -> float:
        """The next attempt's timeout: the deployment's own, cut to what is left of the route's deadline."""
        timeout = deployment.timeout_s or self.default_timeout_s
        deadline = plan.deadline_s
        if deadline is None:
            return timeout
        left = deadline - (time.perf_counter() - req.started)
        if left <= 0.001:
            tried = "; ".join(f"{d.id}: {exc.message}" for d, exc in failures) or "no attempt finished"
            raise UpstreamTimeout(f"The route '{plan.route}' deadline of {deadline:g}s passed ({tried}).")
        return min(timeout, left)

    def failed(self, deployment: Deployment, exc: UpstreamError,
               failures: list[tuple[Deployment, UpstreamError]]) -> None:
        failures.append((deployment, exc))
        self.metrics.upstream_failed(deployment.provider, deployment.model, exc.failure)
        if exc.failure in HEALTH_FAILURES:
            self.health.failed(deployment)
        log.warning("upstream failure on %s: %s", deployment.id, exc.message)


def falls_back(plan: Plan, exc: UpstreamError) -> bool:
    """Whether a failure moves on to the plan's next candidate (the route's ``retry_on``)."""
    return exc.retryable and exc.failure in plan.retry_on


def provider_kind(deployment: Deployment, endpoint: str = "chat") -> str:
    """Which provider sends a call in wire format ``endpoint`` to ``deployment``."""
    if endpoint == "messages":
        return "anthropic"
    if deployment.openai_compatible:
        return "openai"
    if deployment.provider == "simulated":
        return "simulated"
    return "litellm"


def combined_failure(failures: list[tuple[Deployment, UpstreamError]]) -> GatewayError:
    """One error for a request whose every candidate failed."""
    if not failures:
        return InvalidRequest("No deployment can serve this request.", code="no_deployment")
    if len(failures) == 1:
        return failures[0][1]
    kinds = {type(exc) for _, exc in failures}
    listing = "; ".join(f"{d.id}: {exc.message}" for d, exc in failures)
    if kinds == {UpstreamTimeout}:
        return UpstreamTimeout(f"Every candidate deployment timed out: {listing}")
    if kinds == {UpstreamRateLimited}:
        return UpstreamRateLimited(f"Every candidate deployment is rate limited: {listing}")
    return UpstreamError(f"Every candidate deployment failed: {listing}")
