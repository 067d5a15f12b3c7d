"""Relaying an open upstream stream to the client, and finishing its ticket however it ends.

:func:`relay` is the event generator of a :class:`~gateway.pipeline.request.StreamReply`:
it feeds each upstream chunk to the codec's stream encoder and yields what the encoder
makes of it. Its ``finally`` finishes the request's ticket whatever the exit (the stream
completed, the upstream failed or was cut mid-way, the client went away, a bug): the
upstream's reported usage when there is one, else the gateway's count of the prompt and
of what was delivered, so a cut stream is charged for what it delivered. A failure after
the first byte becomes the codec's error event, never a hang.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from gateway.errors import GatewayError, internal_error
from gateway.policy import Deployment
from gateway.pricing import Usage

from .codec import StreamEncoder
from .ticket import Ticket

log = logging.getLogger("gateway")
Chunks = AsyncGenerator[dict[str, Any], None]
StoreAnswer = Callable[[dict[str, Any] | None], Awaitable[None]]


async def relay(ticket: Ticket, deployment: Deployment, first: dict[str, Any] | None, chunks: Chunks,
                encoder: StreamEncoder, started: float, prompt_tokens: Callable[[], int],
                store: StoreAnswer) -> AsyncGenerator[bytes, None]:
    """The client's SSE bytes for an open stream (see the module docstring)."""
    error: GatewayError | None = None
    finished = False
    usage: Usage | None = None
    try:
        chunk = first
        while chunk is not None:
            out = encoder.feed(chunk)
            if out:
                yield out
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                chunk = None
        finished = True
    except GatewayError as exc:
        error = exc
    except Exception:  # a bug or a foreign error mid-stream: the client gets an event, not a hang
        log.exception("stream of %s failed", ticket.req.request_id)
        error = internal_error()
    finally:
        ticket.upstream_s += time.perf_counter() - started
        status = "ok" if finished else (error.code or "error") if error else "client_closed"
        try:
            usage = encoder.usage()
            ticket.upstream_cost_nano = encoder.upstream_cost()
            if usage is None:
                model = deployment.upstream_model
                usage = Usage(input_tokens=prompt_tokens(), output_tokens=encoder.output_tokens(model),
                              estimated=True)
            if not finished:
                await chunks.aclose()
        finally:
            await ticket.finish(status, usage)
    if finished:
        assert usage is not None
        closing = encoder.close(usage, ticket.cost_nano)   # first: it completes the answer (a translated
        await store(encoder.answer())                      # Response only exists once closed), then kept
        yield closing                                      # before the client sees the stream end
    elif error is not None:
        yield encoder.error(error, usage, ticket.cost_nano)
