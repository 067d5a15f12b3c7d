"""The savers stage: response cache, context compression and provider prompt caching, in request order.

:class:`SavingStages` sequences the decisions that live in :mod:`gateway.savings`
(:mod:`~gateway.savings.response_cache`, :mod:`~gateway.savings.compression`,
:mod:`~gateway.savings.prompt_caching`) for one request: ``lookup`` (after resolve: the
cached answer, if any; the pipeline answers a hit through its own ticket), ``compress_to_fit``
(when no deployment's window holds the prompt) and ``compress`` (before reserve),
``prompt_caching`` (per deployment, when the call is built), and ``store`` / ``store_stream``
(after a successful miss). It holds no reference to the pipeline: the one thing compression
needs from it, a summary of a transcript, comes in as a function (``Summarize``) that runs a
sub-request through the same lifecycle, paid by the same team.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.policy import CompressionSettings, Deployment, Policies, PromptCacheSettings
from gateway.routing.resolve import Plan
from gateway.savings import compression, prompt_caching
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
from gateway.tokens import count_prompt

from .request import Principal, Request
from .ticket import Ticket

# The summary of a transcript by the policy's summary model: (text, its cost in nano-USD), or None.
# Endpoints compressed (on their chat-shaped body): chat; Responses and Messages, whose codecs map what
# compression kept back onto whole input items / messages for a deployment that speaks their API.
COMPRESSED = frozenset({"chat", "responses", "messages"})
PROMPT_CACHED = frozenset({"chat", "messages"})   # endpoints whose calls get breakpoints or a cache key
Summarize = Callable[[Request, Principal, CompressionSettings, str], Awaitable[tuple[str, int] | None]]


def build_store(state: State, policies: Policies) -> Store:
    """Redis when the state is shared (every worker and replica sees one cache), else in memory."""
    if state.redis is not None:
        return RedisStore(state.redis)
    return MemoryStore(policies.cache.memory_max_entries, policies.cache.memory_max_bytes)


class SavingStages:
    def __init__(self, store: Store, summarize: Summarize) -> None:
        self.cache = ResponseCache(store)
        self.summarize = summarize

    def use_policies(self, policies: Policies) -> None:
        store = self.cache.store
        if isinstance(store, MemoryStore):
            store.resize(policies.cache.memory_max_entries, policies.cache.memory_max_bytes)

    @staticmethod
    def policies(req: Request) -> Policies:
        assert req.policies is not None, "the pipeline sets a request's policies when it arrives"
        return req.policies

    # ------------------------------------------------------------ response cache
    async def lookup(self, req: Request, principal: Principal, plan: Plan) -> Entry | None:
        """The cached answer for the request, if any; notes the hit, miss or bypass on ``req.cache``."""
        if req.cache is not None or not req.cacheable:   # looked up already (a too-long prompt), or never
            return None
        settings = self.policies(req).cache.for_request(principal.team, plan.route)
        body = req.cache_body if req.cache_body is not None else \
            req.original_body if req.original_body is not None else req.body
        if self.cache.bypasses(settings, req.endpoint, body):   # decided here, without a call into the store
            req.cache = Lookup("bypass")
            return None
        req.cache = lookup = await self.cache.lookup(settings, principal.team, plan.model.name, req.endpoint,
                                                     body, req.headers)
        return lookup.entry

    @staticmethod
    def assembles(req: Request) -> bool:
        """Whether a streamed miss is to be assembled so that it can be stored."""
        return req.cache is not None and req.cache.key is not None

    @staticmethod
    def _storable(lookup: Lookup | None, ticket: Ticket) -> bool:
        # not an answer shortened to fit a budget's last cents, nor another model's (a downgrade)
        return (lookup is not None and lookup.key is not None and ticket.output_cap is None
                and ticket.plan.model.name == lookup.model)

    @staticmethod
    def _entry(req: Request, deployment: Deployment, body: dict[str, Any], ticket: Ticket) -> Entry:
        usage = ticket.usage
        removed = req.compression.removed if req.compression is not None else 0
        return Entry(answer_for_storage(body), req.endpoint,
                     (usage.input_tokens if usage else 0) + removed, usage.output_tokens if usage else 0,
                     deployment.id, datetime.now(UTC).timestamp())

    async def store(self, req: Request, ticket: Ticket, deployment: Deployment, body: dict[str, Any]) -> None:
        if self._storable(req.cache, ticket):
            assert req.cache is not None
            await self.cache.store_answer(req.cache, self._entry(req, deployment, body, ticket))

    async def store_stream(self, req: Request, ticket: Ticket, deployment: Deployment,
                           answer: dict[str, Any] | None) -> None:
        """Store a streamed miss the stream's encoder assembled (None: incomplete, not stored)."""
        if answer is None or not self._storable(req.cache, ticket):
            return
        if not isinstance(answer.get("usage"), dict) and ticket.usage is not None:
            u = ticket.usage
            answer["usage"] = {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
                               "total_tokens": u.total_tokens}
        assert req.cache is not None
        await self.cache.store_answer(req.cache, self._entry(req, deployment, answer, ticket))

    # ------------------------------------------------------------ compression
    async def compress_to_fit(self, req: Request, principal: Principal, too_long: Plan) -> bool:
        """The prompt fits no deployment's window: compress it for the largest one. True when it shrank
        (the caller resolves again)."""
        if req.endpoint not in COMPRESSED:
            return False
        settings = self.policies(req).compression.for_request(principal.team, too_long.route)
        windowed = [d for d in too_long.candidates if d.context_window]
        if not settings.enabled or not windowed:
            return False
        widest = max(windowed, key=lambda d: d.context_window or 0)
        limit = compression.threshold(settings, widest.context_window)
        assert limit is not None
        tokens = count_prompt(req.body, "chat", widest.upstream_model)
        await self._run(req, principal, settings, widest, tokens, limit,
                        self.policies(req).prompt_cache.for_request(principal.team, too_long.route))
        if req.compression is None or req.compression.removed == 0:
            return False
        req.raw_size = len(orjson.dumps(req.body))
        return True

    async def compress(self, req: Request, principal: Principal, plan: Plan) -> Plan:
        """Compress a chat, Responses or Messages request whose prompt passes the policy's threshold (the plan,
        updated)."""
        if req.endpoint not in COMPRESSED or req.compression is not None:
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
        await self._run(req, principal, settings, chosen, tokens, limit,
                        self.policies(req).prompt_cache.for_request(principal.team, plan.route))
        return plan if req.compression is None else replace(plan, prompt_tokens=req.compression.after)

    async def _run(self, req: Request, principal: Principal, settings: CompressionSettings,
                   deployment: Deployment, tokens: int, limit: int, caching: PromptCacheSettings) -> None:
        if req.origins is not None and isinstance(req.native, dict) and deployment.speaks(req.endpoint):
            protected = prompt_caching.native_protected(req.native, req.origins, deployment, caching)
        else:
            protected = prompt_caching.protected_messages(req.body, deployment, caching)

        async def summarise(text: str) -> tuple[str, int] | None:
            return await self.summarize(req, principal, settings, text)

        result = await compression.compress(req.body, settings, deployment.upstream_model, tokens,
                                            compression.target(settings, limit), protected, summarise)
        if result is not None:
            req.original_body = req.body
            req.body, req.compression = result

    # ------------------------------------------------------------ prompt caching
    def mark_prompt_caching(self, req: Request, principal: Principal, plan: Plan) -> None:
        if req.endpoint in PROMPT_CACHED:
            settings = self.policies(req).prompt_cache.for_request(principal.team, plan.route)
            if settings.enabled:
                req.prompt_cache = (settings, principal.team)

    @staticmethod
    def prompt_caching(req: Request, deployment: Deployment, wire: str, body: dict[str, Any]) -> dict[str, Any]:
        """The body of a ``wire`` call to ``deployment`` with breakpoints or a cache key, when the policy asks
        for them: a chat body (the request's own, or a Messages request translated), or a Messages body sent
        natively; other wire formats are sent as built."""
        if req.prompt_cache is None:
            return body
        settings, team = req.prompt_cache
        if wire == "chat":
            if req.origins is not None and prompt_caching.uses_cache_control(deployment) \
                    and isinstance(req.native, dict) and prompt_caching.native_has_cache_control(req.native):
                return body   # a translated Messages request whose client placed its own breakpoints
            return prompt_caching.apply(body, deployment, settings, team)
        if wire == "messages":
            return prompt_caching.apply_messages(body, deployment, settings)
        return body
