"""What crosses the pipeline's stages: the typed request, who sent it, and the reply the edge writes.

A codec (:mod:`gateway.api.codecs`) decodes a wire format into a :class:`Request`, parsed
and validated once: its endpoint, model, whether it streams, whether the client asked for a
usage chunk, its output limit, and the body in the internal (OpenAI chat-family) shape the
stages read. The authenticate stage adds the :class:`Principal`; the pipeline hands back a
:class:`Reply` or a :class:`StreamReply` for the edge to write. Also here: request ids and
money as a JSON number.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from gateway.policy import Policies, PromptCacheSettings, TeamSpec
from gateway.savings.compression import Report
from gateway.savings.response_cache import Lookup
from gateway.state.keys import KeyRecord

from .attribution import NOBODY, Attribution

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Inbound:
    """A request as the edge read it: the decoded body, before authentication and validation. The
    pipeline fills in who sent it and, once validated, the typed :class:`Request` (so the edge can
    say, on an error, which route decided and whether the request's ticket recorded it)."""

    body: Any
    raw_size: int
    headers: dict[str, str]        # lower-cased names
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    team: str | None = None
    request: Request | None = None

    @property
    def route(self) -> str | None:
        return self.request.route if self.request is not None else None

    @property
    def recorded(self) -> bool:
        return self.request is not None and self.request.recorded

    @property
    def model(self) -> str | None:
        model = self.body.get("model") if isinstance(self.body, dict) else None
        return model if isinstance(model, str) else None


@dataclass(slots=True)
class Request:
    """One request, parsed once: every later stage reads these fields instead of the body."""

    endpoint: str                  # the inbound API: chat | completions | embeddings | messages | responses
    shape: str                     # the shape of ``body``: chat | completions | embeddings
    body: dict[str, Any]           # the internal body (OpenAI shape) stages read, compress and send
    model: str                     # the requested model (or route) name
    stream: bool                   # the client gets SSE events (never for embeddings)
    wants_usage: bool              # the client asked for a usage chunk (stream_options.include_usage)
    output_limit: int | None       # the client's own output cap, if it set one
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
    overhead: bool = False                 # a compression summary call made on behalf of another request
    recorded: bool = False                 # its ticket wrote the ledger record (the edge counts the rest)
    native: Any = None                     # the body as the client sent it, when the API is not chat-shaped
    origins: list[tuple[int, ...]] | None = None   # per message of ``body``: the ``native`` messages it came from
    dropped: tuple[str, ...] = ()          # features a translation to chat cannot carry (x-gateway-dropped)
    cacheable: bool = True                 # the response cache may answer or keep it
    cache_body: Any = None                 # what the response cache keys on, when not the body (before
                                           # compression): a Responses request as sent, earlier turns inlined;
                                           # a Messages request as sent
    context: Any = None                    # what the codec loaded for it (an earlier turn of a conversation)
    prefer: str | None = None              # a deployment to try first (the one holding that conversation)
    user: Any = None                       # the end user the body names (OpenAI's user, metadata.user_id)
    attribution: Attribution = NOBODY      # end user, tags, session, agent (after validation)

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
    closing it always runs its finish), then the rest."""

    headers: Headers
    first: bytes
    events: AsyncGenerator[bytes, None]


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


def nano_float(nano: int) -> float:
    """Nano-USD as a JSON number; the division is correctly rounded, so its repr is the exact decimal."""
    return nano / 1e9
