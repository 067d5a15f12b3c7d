"""The HTTP edge: an app factory, the hot proxy routes as raw ASGI, the rest on FastAPI.

``create_app`` builds explicit state (settings, policies, the pooled HTTP client,
providers, metrics, the pipeline) and returns an ASGI callable. Each proxy path
(chat completions, completions, embeddings, with or without ``/v1``) has a codec
(:mod:`gateway.api.openai_codec`): the edge reads the body, the codec decodes it into
the pipeline's typed request, the pipeline's reply is written as JSON or SSE, and an
error is rendered by the same codec in its API's envelope. Every other route (models,
health, metrics, and the admin API of :mod:`gateway.admin.api`) is a FastAPI route.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from gateway.admin.api import AdminApi
from gateway.api.anthropic.codec import MessagesCodec
from gateway.api.anthropic.count import count_tokens_estimate
from gateway.api.openai_codec import OpenAICodec
from gateway.api.responses.codec import ResponsesCodec
from gateway.api.responses.conversation import response_not_found
from gateway.api.responses.items import input_items_page
from gateway.budgets.notify import Notifier
from gateway.budgets.rules import budget_rules
from gateway.errors import (
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    RequestTooLarge,
    error_body,
    internal_error,
)
from gateway.metrics import BudgetGauge, Metrics
from gateway.pipeline.auth import caller_key, secret_matches
from gateway.pipeline.codec import Codec
from gateway.pipeline.lifecycle import Pipeline
from gateway.pipeline.request import Inbound, Reply, StreamReply
from gateway.policy import Policies, load_policies
from gateway.policy.reloader import PolicyWatcher
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.base import Provider
from gateway.providers.httpclient import HttpClient
from gateway.providers.openai_compat import OpenAICompatProvider
from gateway.providers.simulated import SimulatedProvider
from gateway.routing.cooldowns import HealthBook
from gateway.settings import Settings
from gateway.state import State, open_state
from gateway.state.budgets import StateUnavailable
from gateway.state.notify_store import MemoryNotifyStore, NotifyStore, RedisNotifyStore, SqliteNotifyStore
from gateway.state.responses_store import open_responses_store

log = logging.getLogger("gateway")
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

COUNT_ROUTES = frozenset({"/v1/messages/count_tokens", "/messages/count_tokens"})


def proxy_routes(responses: ResponsesCodec) -> dict[str, Codec]:
    """Each proxy path (with and without ``/v1``) and the codec of its API."""
    codecs: dict[str, Codec] = {
        "/chat/completions": OpenAICodec("chat"), "/completions": OpenAICodec("completions"),
        "/embeddings": OpenAICodec("embeddings"), "/messages": MessagesCodec(), "/responses": responses,
    }
    return {**codecs, **{f"/v1{path}": codec for path, codec in codecs.items()}}


@dataclass
class AppState:
    settings: Settings
    client: HttpClient
    providers: dict[str, Provider]
    metrics: Metrics
    state: State
    pipeline: Pipeline
    responses: ResponsesCodec
    watcher: PolicyWatcher | None = None

    @property
    def policies(self) -> Policies:
        """The policies in force (swapped atomically by :meth:`reload`)."""
        return self.pipeline.policies

    def reload(self) -> Policies:
        """Load the policy files again and swap them in; on :class:`PolicyError` the last good set stays."""
        policies = load_policies(self.settings.config_dir)
        for kind, provider in build_providers(policies, self.client).items():
            self.providers.setdefault(kind, provider)
        self.pipeline.use_policies(policies)
        log.info("policies reloaded: %d models from %s", len(policies.unique_models()), ", ".join(policies.files))
        return policies


def build_providers(policies: Policies, client: HttpClient) -> dict[str, Provider]:
    providers: dict[str, Provider] = {"openai": OpenAICompatProvider(client), "simulated": SimulatedProvider(),
                                      "anthropic": AnthropicProvider(client)}
    if any(not d.openai_compatible and d.provider != "simulated" for d in policies.deployments):
        from gateway.providers.litellm_provider import LiteLLMProvider  # heavy import, only when used

        providers["litellm"] = LiteLLMProvider()
    return providers


def build_state(settings: Settings, policies: Policies | None = None) -> AppState:
    policies = policies or load_policies(settings.config_dir)
    client = HttpClient(connect_timeout=settings.connect_timeout_s)
    providers = build_providers(policies, client)
    metrics = Metrics(settings.metrics_dir if settings.workers > 1 else None)
    state = open_state(settings)
    openai = providers["openai"]
    assert isinstance(openai, OpenAICompatProvider)
    health = HealthBook(policies.health, state.redis, checker=openai.check)
    pipeline = Pipeline(policies, providers, metrics, state, settings, health)
    responses = ResponsesCodec(open_responses_store(state.redis, settings.responses_ttl_s,
                                                    settings.responses_max_entries, settings.responses_max_bytes))
    notify_store: NotifyStore
    if state.redis is not None:
        notify_store = RedisNotifyStore(state.redis)
    elif settings.persistent:   # claims and the outbox outlive a restart, shared by the machine's workers
        notify_store = SqliteNotifyStore(os.path.join(settings.data_dir, "notify.sqlite3"))
    else:
        notify_store = MemoryNotifyStore()
    state.notifier = Notifier(lambda: pipeline.policies.notify, state.budgets, notify_store, metrics)
    app_state = AppState(settings, client, providers, metrics, state, pipeline, responses)
    app_state.watcher = PolicyWatcher(settings.config_dir, app_state.reload, settings.policy_watch_s)
    return app_state


class GatewayApp:
    """The ASGI callable: proxy routes handled directly, everything else by FastAPI."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.api = _fastapi(state)
        self.routes = proxy_routes(state.responses)
        self.messages = self.routes["/v1/messages"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            codec = self.routes.get(scope["path"])
            if codec is not None:
                await self.proxy(codec, scope, receive, send)
                return
            if scope["path"] in COUNT_ROUTES:
                await self.count_tokens(self.messages, scope, receive, send)
                return
        await self.api(scope, receive, send)

    async def count_tokens(self, codec: Codec, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v1/messages/count_tokens``: the prompt's input tokens, never charged."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        pipeline = self.state.pipeline
        request_id = pipeline.ids.next(headers.get("x-request-id"))
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"Use POST for {scope['path']}.")
            raw = await read_body(receive, headers, self.state.settings.max_body_bytes)
            body = codec.decode(raw)
            if isinstance(body, dict) and "max_tokens" not in body:
                body = {**body, "max_tokens": 1}    # count_tokens takes no max_tokens
            tokens = await pipeline.count_tokens(Inbound(body, len(raw), headers, request_id), codec,
                                                 count_tokens_estimate)
        except GatewayError as exc:
            await send_error(send, codec, exc, request_id)
            return
        except Exception:
            log.exception("request %s failed", request_id)
            await send_error(send, codec, internal_error(), request_id)
            return
        data = orjson.dumps({"input_tokens": tokens})
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"x-request-id", request_id.encode()),
            (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    async def proxy(self, codec: Codec, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        pipeline = self.state.pipeline
        request_id = pipeline.ids.next(headers.get("x-request-id"))
        inbound: Inbound | None = None
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"Use POST for {scope['path']}.")
            raw = await read_body(receive, headers, self.state.settings.max_body_bytes)
            inbound = Inbound(codec.decode(raw), len(raw), headers, request_id)
            reply = await pipeline.handle(inbound, codec)
        except GatewayError as exc:
            pipeline.refused(inbound, exc.code or "error", codec.endpoint)
            await send_error(send, codec, exc, request_id, inbound.route if inbound is not None else None)
            return
        except Exception:
            log.exception("request %s failed", request_id)
            pipeline.refused(inbound, "internal_error", codec.endpoint)
            await send_error(send, codec, internal_error(), request_id)
            return
        if isinstance(reply, Reply):
            try:
                reply.headers.append((b"content-length", str(len(reply.body)).encode()))   # no chunked framing
                await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
                await send({"type": "http.response.body", "body": reply.body})
            finally:   # however the write went
                if reply.after is not None:
                    reply.after()
        else:
            await send_stream(reply, receive, send)


async def read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"The request body is larger than the {limit}-byte limit.")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequest("The client disconnected before sending the body.", code="client_closed")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"The request body is larger than the {limit}-byte limit.")
        chunks.append(chunk)
        if not message.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_error(send: Send, codec: Codec, exc: GatewayError, request_id: str, route: str | None = None) -> None:
    """The error reply, in the envelope of the codec's API."""
    headers = codec.error_headers(exc)
    headers.append((b"x-request-id", request_id.encode()))
    if route is not None:   # refused or failed after routing: which rule decided
        headers.append((b"x-gateway-route", route.encode()))
    body = codec.error_body(exc)
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_stream(reply: StreamReply, receive: Receive, send: Send) -> None:
    """Write SSE events until the stream ends or the client goes away."""
    events = reply.events
    disconnected = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnected.set()

    watcher = asyncio.ensure_future(watch())
    try:
        await send({"type": "http.response.start", "status": 200, "headers": reply.headers})
        await send({"type": "http.response.body", "body": reply.first, "more_body": True})
        async for event in events:
            if disconnected.is_set():
                break
            await send({"type": "http.response.body", "body": event, "more_body": True})
        if not disconnected.is_set():
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except OSError:
        pass  # the client went away mid-write
    finally:
        await events.aclose()
        watcher.cancel()


def _fastapi(state: AppState) -> FastAPI:
    admin = AdminApi(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("gateway ready: %d models from %s", len(state.policies.unique_models()),
                 state.settings.config_dir)
        state.state.start()
        if state.state.notifier is not None:
            state.state.notifier.start()
        state.pipeline.health.start()
        if state.watcher is not None:
            state.watcher.start()
        await admin.start()
        if state.settings.master_key is None:
            try:
                open_mode = not await state.state.keys.has_keys()
            except Exception:
                open_mode = False
            if open_mode:
                log.warning("no GATEWAY_MASTER_KEY and no keys: accepting any bearer token as team 'default'")
        yield
        if state.watcher is not None:
            await state.watcher.stop()
        await state.pipeline.health.aclose()
        await admin.aclose()
        if state.state.notifier is not None:
            await state.state.notifier.aclose()
        await state.state.aclose()
        state.metrics.flush()          # the last requests' tallies, before a worker's metrics file is left
        for provider in state.providers.values():
            await provider.aclose()
        await state.client.aclose()

    api = FastAPI(title="LLM gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    api.include_router(admin.router)

    @api.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        return Response(error_body(exc), exc.status_code, headers=exc.headers, media_type="application/json")

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        err: GatewayError = NotFound(f"No route for {request.method} {request.url.path}.") \
            if exc.status_code == 404 else MethodNotAllowed(f"{request.method} is not allowed here.") \
            if exc.status_code == 405 else InvalidRequest(str(exc.detail))
        return Response(error_body(err), err.status_code, media_type="application/json")

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        err = InvalidRequest(f"Invalid request: {exc.errors()[:1]}")
        return Response(error_body(err), 400, media_type="application/json")

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return Response(error_body(internal_error()), 500, media_type="application/json")

    async def visible_models(request: Request) -> list[str]:
        """The model names (and aliases) the caller's key may use."""
        principal = await state.pipeline.authenticate(_lower(request), state.policies)
        policies = state.policies
        names = {name for name, spec in policies.models.items()
                 if principal.spec.allows(spec.name) or principal.spec.allows(name)}
        names.update(name for name in policies.route_names if principal.spec.allows(name))
        return sorted(names)

    async def models(request: Request) -> Response:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "gateway"}
                for name in await visible_models(request)]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    async def model(name: str, request: Request) -> Response:
        if name not in await visible_models(request):
            raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
        return Response(orjson.dumps({"id": name, "object": "model", "created": 0, "owned_by": "gateway"}),
                        media_type="application/json")

    for prefix in ("/v1", ""):
        api.add_api_route(f"{prefix}/models", models, methods=["GET"])
        api.add_api_route(f"{prefix}/models/{{name:path}}", model, methods=["GET"])

    async def stored(response_id: str, request: Request) -> tuple[str, Any]:
        """The caller's team and the response it stored under ``response_id`` (404 for any other's)."""
        principal = await state.pipeline.authenticate(_lower(request), state.policies)
        record = await state.responses.store.get(response_id, principal.team)
        if record is None:
            raise response_not_found(response_id)
        return principal.team, record

    async def get_response(response_id: str, request: Request) -> Response:
        _, record = await stored(response_id, request)
        return Response(orjson.dumps(record.response), media_type="application/json")

    async def delete_response(response_id: str, request: Request) -> Response:
        team, _ = await stored(response_id, request)
        await state.responses.store.delete(response_id, team)
        return Response(orjson.dumps({"id": response_id, "object": "response", "deleted": True}),
                        media_type="application/json")

    async def response_input_items(response_id: str, request: Request) -> Response:
        _, record = await stored(response_id, request)
        return Response(orjson.dumps(input_items_page(record.input_items, dict(request.query_params))),
                        media_type="application/json")

    for prefix in ("/v1", ""):
        api.add_api_route(f"{prefix}/responses/{{response_id}}", get_response, methods=["GET"])
        api.add_api_route(f"{prefix}/responses/{{response_id}}", delete_response, methods=["DELETE"])
        api.add_api_route(f"{prefix}/responses/{{response_id}}/input_items", response_input_items, methods=["GET"])

    @api.get("/health/live")
    async def live() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @api.get("/health/ready")
    async def ready() -> Response:
        from gateway.policy.models import missing_credentials

        redis_ok = await state.state.ping() if state.state.shared else None
        body = {"status": "ok" if redis_ok is not False else "unavailable",
                "models": len(state.policies.unique_models()), "policy_files": list(state.policies.files),
                "state": state.state.backend, "redis_reachable": redis_ok,
                "unwritten_records": state.state.pending,   # ledger records and settles waiting for the store
                "ledger_slots_waiting": state.state.ledger.waiting_slots,   # a cluster: slots of masters down
                "missing_credentials": [{"deployment": d, "variable": v}   # answered with an error naming v
                                        for d, v in missing_credentials(state.policies.deployments)]}
        return Response(orjson.dumps(body), status_code=200 if redis_ok is not False else 503,
                        media_type="application/json")

    @api.get("/metrics")
    async def metrics(request: Request) -> Response:
        key = state.settings.metrics_key
        if key is not None and not secret_matches(caller_key(_lower(request)), key):
            raise AuthenticationFailed("GET /metrics needs 'Authorization: Bearer <GATEWAY_METRICS_KEY>'.")
        body = state.metrics.render(await budget_gauges(state), state.pipeline.deployment_health())
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return api


async def budget_gauges(state: AppState) -> list[BudgetGauge]:
    """Budget limit, spend and soft limit per team and period, read from the budget store at scrape time."""
    now = datetime.now(UTC)
    out: list[BudgetGauge] = []
    for team in state.policies.teams.values():
        if not team.budgets:
            continue
        try:
            usage = await state.state.budgets.usage(team.name, budget_rules(team, None), now)
        except StateUnavailable:
            break   # scraped again soon; the request path reports the outage
        label = state.metrics.team_label(team.name)
        out.extend(BudgetGauge(label, u.period, u.limit_nano, u.spent_nano, round(u.limit_nano * team.soft_alert))
                   for u in usage)
    return out


def _lower(request: Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items()}


def create_app(settings: Settings | None = None, policies: Policies | None = None) -> GatewayApp:
    return GatewayApp(build_state(settings or Settings.from_env(), policies))
