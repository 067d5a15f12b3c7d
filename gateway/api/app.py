"""The HTTP edge: an app factory, the hot proxy routes as raw ASGI, the rest on FastAPI.

``create_app`` builds explicit state (settings, policies, the pooled HTTP client,
providers, metrics, the pipeline) and returns an ASGI callable. The proxy
endpoints (chat completions, completions, embeddings, with or without ``/v1``)
are parsed here and handed to the pipeline; its reply is rendered as JSON or
SSE. Every other route (models, health, metrics, and the admin API of
``gateway/admin.py``) is a FastAPI route. This is
the only place where errors become HTTP responses.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
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
    error_headers,
    internal_error,
)
from gateway.metrics import BudgetGauge, Metrics
from gateway.pipeline.core import Pipeline
from gateway.pipeline.request import Inbound, Reply, StreamReply, bearer_token
from gateway.policy import Policies, load_policies
from gateway.policy.reloader import PolicyWatcher
from gateway.providers.base import Provider
from gateway.providers.httpclient import HttpClient
from gateway.providers.openai_compat import OpenAICompatProvider
from gateway.providers.simulated import SimulatedProvider
from gateway.routing.cooldowns import HealthBook
from gateway.settings import Settings
from gateway.state import State, open_state
from gateway.state.budgets import StateUnavailable

log = logging.getLogger("gateway")
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

PROXY_ROUTES = {
    "/v1/chat/completions": "chat", "/chat/completions": "chat",
    "/v1/completions": "completions", "/completions": "completions",
    "/v1/embeddings": "embeddings", "/embeddings": "embeddings",
}


@dataclass
class AppState:
    settings: Settings
    client: HttpClient
    providers: dict[str, Provider]
    metrics: Metrics
    state: State
    pipeline: Pipeline
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
    providers: dict[str, Provider] = {"openai": OpenAICompatProvider(client), "simulated": SimulatedProvider()}
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
    app_state = AppState(settings, client, providers, metrics, state, pipeline)
    app_state.watcher = PolicyWatcher(settings.config_dir, app_state.reload, settings.policy_watch_s)
    return app_state


class GatewayApp:
    """The ASGI callable: proxy routes handled directly, everything else by FastAPI."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.api = _fastapi(state)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = PROXY_ROUTES.get(scope["path"])
            if endpoint is not None:
                await self.proxy(endpoint, scope, receive, send)
                return
        await self.api(scope, receive, send)

    async def proxy(self, endpoint: str, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        pipeline = self.state.pipeline
        request_id = pipeline.ids.next(headers.get("x-request-id"))
        inbound: Inbound | None = None
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"Use POST for {scope['path']}.")
            raw = await read_body(receive, headers, self.state.settings.max_body_bytes)
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json",
                                     param="body") from None
            inbound = Inbound(endpoint, body, len(raw), headers, request_id)
            reply = await pipeline.handle(inbound)
        except GatewayError as exc:
            pipeline.refused(inbound, exc.code or "error")
            await send_error(send, exc, request_id, inbound.route if inbound is not None else None)
            return
        except Exception:
            log.exception("request %s failed", request_id)
            pipeline.refused(inbound, "internal_error")
            await send_error(send, internal_error(), request_id)
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


async def send_error(send: Send, exc: GatewayError, request_id: str, route: str | None = None) -> None:
    headers = error_headers(exc)
    headers.append((b"x-request-id", request_id.encode()))
    if route is not None:   # refused or failed after routing: which rule decided
        headers.append((b"x-gateway-route", route.encode()))
    body = error_body(exc)
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
        await state.state.aclose()
        for provider in state.providers.values():
            await provider.aclose()
        await state.client.aclose()

    api = FastAPI(title="LLM gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
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
        principal = await state.pipeline.authenticate(Inbound("models", None, 0, _lower(request), ""))
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

    @api.get("/health/live")
    async def live() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @api.get("/health/ready")
    async def ready() -> Response:
        from gateway.policy.models import missing_credentials

        redis_ok = await state.state.ping() if state.state.shared else None
        body = {"status": "ok" if redis_ok is not False else "unavailable",
                "models": len(state.policies.unique_models()), "policy_files": list(state.policies.files),
                "state": "redis" if state.state.shared else "memory", "redis_reachable": redis_ok,
                "unwritten_records": state.state.pending,
                "missing_credentials": [{"deployment": d, "variable": v}   # answered with an error naming v
                                        for d, v in missing_credentials(state.policies.deployments)]}
        return Response(orjson.dumps(body), status_code=200 if redis_ok is not False else 503,
                        media_type="application/json")

    @api.get("/metrics")
    async def metrics(request: Request) -> Response:
        key = state.settings.metrics_key
        if key is not None and not hmac.compare_digest((bearer_token(_lower(request)) or "").encode(), key.encode()):
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
