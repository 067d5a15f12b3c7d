"""What crosses the pipeline's stages: the parsed request, who sent it, the reply, and what it did.

Plain data and small pure helpers shared by :mod:`gateway.pipeline.core` (the stages),
:mod:`gateway.pipeline.streaming` (the streaming stages) and :mod:`gateway.pipeline.savers`
(cache and compression): :class:`Inbound` as the edge hands it over, the
:class:`Principal` it was authenticated as, the :class:`Outcome` the price, settle and
record stages work from, the :class:`Reply` / :class:`StreamReply` the edge renders;
request ids, money as text and numbers, and the rules for combining upstream failures.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from gateway.errors import GatewayError, InvalidRequest, UpstreamError, UpstreamRateLimited, UpstreamTimeout
from gateway.policy import Deployment, Policies, PromptCacheSettings, TeamSpec
from gateway.pricing import Usage
from gateway.routing.resolve import Plan
from gateway.savings.compression import Report
from gateway.savings.response_cache import Lookup
from gateway.state.keys import KeyRecord

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Inbound:
    """A parsed request as the edge hands it over."""

    endpoint: str                  # "chat" | "completions" | "embeddings"
    body: Any
    raw_size: int
    headers: dict[str, str]        # lower-cased names
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    policies: Policies | None = None   # the set this request runs on, taken once (hot reload swaps the next)
    cache: Lookup | None = None            # the response cache's decision (None: not looked up)
    compression: Report | None = None      # what compression did, if it ran
    original_body: Any = None              # the body before compression
    prompt_cache: tuple[PromptCacheSettings, str] | None = None   # settings and team, when asked for
    team: str | None = None                # once authenticated
    route: str | None = None               # once routed: the rule that decided (also on error replies)
    recorded: bool = False                 # the record stage ran (metrics and ledger)

    @property
    def cache_result(self) -> str:
        return self.cache.result if self.cache is not None else "bypass"


@dataclass(slots=True)
class Principal:
    team: str
    spec: TeamSpec
    key: KeyRecord | None = None

    @property
    def key_id(self) -> str | None:
        return self.key.id if self.key is not None else None


@dataclass(slots=True)
class Reply:
    body: bytes
    headers: Headers
    status: int = 200
    after: Callable[[], None] | None = None   # the record stage: the edge runs it once the reply is written


@dataclass(slots=True)
class StreamReply:
    """An SSE reply: its first event, already produced (so the event generator has started and
    closing it always runs its settle-and-record cleanup), then the rest."""

    headers: Headers
    first: bytes
    events: AsyncGenerator[bytes, None]


@dataclass(slots=True)
class Outcome:
    """What one request did, for pricing and recording."""

    principal: Principal
    plan: Plan
    deployment: Deployment | None
    stream: bool
    usage: Usage | None = None
    cost_nano: int = 0
    baseline_nano: int = 0
    status: str = "ok"
    upstream_s: float = 0.0
    ttft_s: float | None = None
    savings: dict[str, int] = field(default_factory=dict)
    compression: Report | None = None
    overhead: bool = False                 # a compression summary call: baseline 0 (see gateway.savings.accounting)


class RequestIds:
    """Unique, cheap ids: a per-process random prefix and a counter.

    A request id may be the client's own ``x-request-id`` (for tracing across systems), so it
    is not unique; a budget hold always gets a fresh gateway id from :meth:`hold`, since the
    budget script treats a repeated hold id as a retry of the same request (a client resending
    one id must not ride on its first request's hold)."""

    def __init__(self) -> None:
        self._prefix = f"req_{os.urandom(6).hex()}"
        self._seq = count(1)

    def next(self, offered: str | None = None) -> str:
        if offered and len(offered) <= 128 and offered.isprintable():
            return offered
        return self.hold()

    def hold(self) -> str:
        """A fresh gateway id, never the client's."""
        return f"{self._prefix}{next(self._seq):x}"


def usd_str(nano: int) -> str:
    whole, frac = divmod(nano, 1_000_000_000)
    return f"{whole}.{frac:09d}".rstrip("0").rstrip(".") if frac else f"{whole}"


def nano_float(nano: int) -> float:
    """Nano-USD as a JSON number; the division is correctly rounded, so its repr is the exact decimal."""
    return nano / 1e9


def falls_back(plan: Plan, exc: UpstreamError) -> bool:
    """Whether a failure moves on to the plan's next candidate (the route's ``retry_on``)."""
    return exc.retryable and exc.failure in plan.retry_on


def provider_kind(deployment: Deployment) -> str:
    if deployment.openai_compatible:
        return "openai"
    if deployment.provider == "simulated":
        return "simulated"
    return "litellm"


def choice_text(choice: dict[str, Any]) -> str:
    if isinstance(choice.get("text"), str):
        return str(choice["text"])
    message = choice.get("message") or choice.get("delta") or {}
    parts = [message.get("content") or ""]
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {} if isinstance(call, dict) else {}
        parts.append(str(fn.get("name") or "") + str(fn.get("arguments") or ""))
    return "".join(p if isinstance(p, str) else "" for p in parts)


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


def bearer_token(headers: dict[str, str]) -> str | None:
    """The caller's key: ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (lower-cased header names)."""
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return headers.get("x-api-key") or None
