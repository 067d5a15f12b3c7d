"""Streaming requests: open the upstream stream with fallbacks, then relay it as SSE events.

:meth:`StreamStages.open` tries the plan's candidates until one produces its first chunk
(a failure before that falls back like a non-streaming call; after it, never: the
client already has bytes). :meth:`StreamStages.events` relays the chunks, keeps the
upstream's usage chunk back (the gateway always asks for one) and sends it, with
``cost_usd``, only when the client asked; however the stream ends (finished, failed
upstream, client gone) it prices what was delivered, settles and records, and a
failure becomes an error event. The stages of the pipeline it calls live in
:mod:`gateway.pipeline.core`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, cast

import orjson

from gateway.budgets.rules import Ticket
from gateway.errors import GatewayError, UpstreamError, UpstreamTimeout, internal_error
from gateway.pipeline.request import (
    Inbound,
    Outcome,
    Principal,
    StreamReply,
    choice_text,
    combined_failure,
    falls_back,
    nano_float,
    provider_kind,
)
from gateway.policy import Deployment
from gateway.pricing import Usage, usage_from_openai
from gateway.tokens import count_completion_text, count_prompt

if TYPE_CHECKING:
    from gateway.pipeline.core import Pipeline

log = logging.getLogger("gateway")


class StreamStages:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def open(self, req: Inbound, principal: Principal, ticket: Ticket) -> StreamReply:
        """Call the candidates until one's stream yields its first chunk; then hand the rest over as events."""
        p = self.pipeline
        client_opts = req.body.get("stream_options")
        wants_usage = isinstance(client_opts, dict) and client_opts.get("include_usage") is True
        outcome = Outcome(principal, ticket.plan, None, stream=True, compression=req.compression)
        failures: list[tuple[Deployment, UpstreamError]] = []
        plan = ticket.plan
        for deployment in plan.candidates[:plan.max_attempts]:
            try:
                timeout = p.attempt_timeout(req, plan, deployment, failures)
            except UpstreamTimeout:
                await p.settle(ticket, outcome)
                p.record(req, outcome, status="upstream_timeout")
                raise
            call = p.make_call(req, ticket, deployment, timeout)
            call.body["stream_options"] = {**(client_opts or {}), "include_usage": True}
            outcome.deployment = deployment
            chunks = cast(AsyncGenerator[dict[str, Any], None],
                          p.providers[provider_kind(deployment)].stream(call))
            started = time.perf_counter()
            try:
                first = await chunks.__anext__()
            except StopAsyncIteration:
                first = None
            except UpstreamError as exc:
                outcome.upstream_s += time.perf_counter() - started
                p.upstream_failed(deployment, exc, failures)
                if not falls_back(plan, exc):
                    await p.settle(ticket, outcome)
                    p.record(req, outcome, status=exc.code or "error")
                    raise
                continue
            outcome.ttft_s = time.perf_counter() - req.started
            p.health.succeeded(deployment, ttft_s=time.perf_counter() - started)
            if failures:
                p.fell_back(failures[-1], deployment)
            headers = p.headers(req, ticket, deployment, None)
            headers[0] = (b"content-type", b"text/event-stream")
            headers.append((b"cache-control", b"no-cache"))
            events = self.events(req, ticket, outcome, deployment, first, chunks, wants_usage, started)
            return StreamReply(headers, await events.__anext__(), events)
        failure = combined_failure(failures)
        await p.settle(ticket, outcome)
        p.record(req, outcome, status=failure.code or "error")
        raise failure

    async def events(self, req: Inbound, ticket: Ticket, outcome: Outcome, deployment: Deployment,
                            first: dict[str, Any] | None, chunks: AsyncGenerator[dict[str, Any], None],
                            wants_usage: bool, started: float) -> AsyncGenerator[bytes, None]:
        """The SSE events of an open stream; prices, settles and records it however it ends."""
        p = self.pipeline
        texts: dict[int, list[str]] = {}
        reported: dict[str, Any] | None = None
        usage_chunk: dict[str, Any] | None = None
        error: GatewayError | None = None
        finished = False
        assembler = p.savers.assembler(req)     # a miss to store once the stream completes
        try:
            chunk = first
            while chunk is not None:
                if assembler is not None:
                    assembler.add(chunk)
                usage = chunk.get("usage")
                if isinstance(usage, dict):
                    reported = usage
                choices = chunk.get("choices")
                if isinstance(usage, dict) and not choices:
                    usage_chunk = chunk           # held back: priced, then sent last if asked for
                else:
                    if isinstance(choices, list):
                        collect_text(choices, texts)
                    if usage is not None and not wants_usage:
                        chunk = {k: v for k, v in chunk.items() if k != "usage"}
                    yield b"data: " + orjson.dumps(chunk) + b"\n\n"
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    chunk = None
            finished = True
        except GatewayError as exc:
            error = exc
        except Exception:  # a bug or a foreign error mid-stream: the client gets an event, not a hang
            log.exception("stream failed")
            error = internal_error()
        finally:
            outcome.upstream_s += time.perf_counter() - started
            usage_obj = usage_from_openai(reported) if reported else None
            if usage_obj is None:
                model = deployment.upstream_model
                out = sum(count_completion_text("".join(parts), model) for parts in texts.values())
                usage_obj = Usage(input_tokens=count_prompt(req.body, req.endpoint, model),
                                  output_tokens=out, estimated=True)
            p.price(outcome, deployment, usage_obj)
            status = "ok" if finished else (error.code or "error") if error else "client_closed"
            try:
                if not finished:
                    await chunks.aclose()
            finally:
                await p.settle(ticket, outcome)
                p.record(req, outcome, status=status)
        if finished and assembler is not None:
            await p.savers.store_stream(req, ticket, deployment, assembler, outcome)
        if wants_usage:
            if usage_chunk is None:
                usage_chunk = {"id": f"chatcmpl-{req.request_id}", "object": "chat.completion.chunk",
                               "created": int(time.time()), "model": deployment.upstream_model,
                               "choices": [], "usage": usage_dict(usage_obj)}
            usage_chunk["usage"] = {**usage_chunk["usage"], "cost_usd": nano_float(outcome.cost_nano)}
            yield b"data: " + orjson.dumps(usage_chunk) + b"\n\n"
        if error is not None:
            yield b"data: " + orjson.dumps(error.body()) + b"\n\n"
        else:
            yield b"data: [DONE]\n\n"


def collect_text(choices: list[Any], texts: dict[int, list[str]]) -> None:
    for choice in choices:
        if isinstance(choice, dict):
            index = choice.get("index", 0)
            texts.setdefault(index if isinstance(index, int) else 0, []).append(choice_text(choice))


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens, "estimated": usage.estimated}
