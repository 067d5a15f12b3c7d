"""The admin API (``/admin/*``), guarded by ``GATEWAY_MASTER_KEY``, and policy reloads across workers.

:class:`AdminApi` owns the routes: create, list and revoke virtual keys, the teams'
budget usage, the spend report, the ledger export and the policy reload. Each route checks the master
key (``Authorization: Bearer`` or ``x-api-key``; 403 ``admin_disabled`` when none is
configured, 401 ``invalid_api_key`` when it does not match), parses its parameters
strictly and calls :mod:`gateway.admin.ops`; failures are ``GatewayError``s, which the
app's handlers render. ``/admin/spend`` first writes this process's buffered ledger
records (waiting for a write in progress), so on embedded state, and for this worker
on Redis, the report includes every request answered before it; other workers and
replicas write theirs within their flush interval (0.1 s). A reload swaps the policies
of the process that answered it; on shared state it also bumps a generation counter in
Redis that every other worker and replica polls (``RELOAD_POLL_S``), so they reload
the same files too. An invalid file is refused with a 400 naming file:line: key, and
the last good set stays in force everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.admin import export as ledger_export
from gateway.admin import ops as adminops
from gateway.admin.export import EXPORT_MEDIA_TYPES
from gateway.admin.spend_report import FORMATS, MEDIA_TYPES, check_choice, render
from gateway.background import cancel
from gateway.errors import AuthenticationFailed, InvalidRequest, PermissionDenied
from gateway.pipeline.auth import caller_key, secret_matches
from gateway.policy import PolicyError

if TYPE_CHECKING:
    from gateway.api.app import AppState

log = logging.getLogger("gateway.admin.api")
RELOAD_KEY = "gw:v1:policy:generation"
RELOAD_POLL_S = 1.0


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status, media_type="application/json")


def _query(request: Request, allowed: tuple[str, ...]) -> dict[str, str]:
    params = request.query_params
    for name in params:
        if name not in allowed:
            raise InvalidRequest(f"Unknown query parameter '{name}'; expected: {', '.join(allowed) or 'none'}.",
                                 code="unknown_parameter", param=name)
        if len(params.getlist(name)) > 1:
            raise InvalidRequest(f"Query parameter '{name}' given more than once.", param=name)
    return dict(params)


class AdminApi:
    def __init__(self, app: AppState) -> None:
        self.app = app
        self.generation: int | None = None   # the reload generation this process has applied (shared state)
        self._task: asyncio.Task[None] | None = None
        self.router = APIRouter(prefix="/admin")
        r = self.router
        r.add_api_route("/keys", self.create_key, methods=["POST"])
        r.add_api_route("/keys", self.list_keys, methods=["GET"])
        r.add_api_route("/keys/{key_id}", self.revoke_key, methods=["DELETE"])
        r.add_api_route("/teams", self.teams, methods=["GET"])
        r.add_api_route("/users", self.users, methods=["GET"])
        r.add_api_route("/tags", self.tags, methods=["GET"])
        r.add_api_route("/sessions", self.sessions, methods=["GET"])
        r.add_api_route("/spend", self.spend, methods=["GET"])
        r.add_api_route("/ledger/export", self.export, methods=["GET"])
        r.add_api_route("/reload", self.reload, methods=["POST"])

    def authorize(self, request: Request) -> None:
        master = self.app.settings.master_key
        if master is None:
            raise PermissionDenied("The admin API is disabled: set GATEWAY_MASTER_KEY to enable it.",
                                   code="admin_disabled")
        token = caller_key({k.lower(): v for k, v in request.headers.items()})
        if not token:
            raise AuthenticationFailed("Missing master key: send 'Authorization: Bearer <GATEWAY_MASTER_KEY>'.")
        if not secret_matches(token, master):
            raise AuthenticationFailed("Invalid master key.")

    # ------------------------------------------------------------------ keys
    async def create_key(self, request: Request) -> Response:
        self.authorize(request)
        _query(request, ())
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json",
                                 param="body") from None
        req = adminops.key_request(body)
        result = await adminops.create_key(self.app.state.key_store, req, self.app.policies.teams)
        self.app.state.keys.clear()   # this process sees the new key (and the end of open mode) at once
        return _json(result, 201)

    async def list_keys(self, request: Request) -> Response:
        self.authorize(request)
        team = _query(request, ("team",)).get("team") or None
        return _json({"object": "list", "data": await adminops.list_keys(self.app.state.key_store, team)})

    async def revoke_key(self, key_id: str, request: Request) -> Response:
        self.authorize(request)
        _query(request, ())
        result = await adminops.revoke_key(self.app.state.key_store, key_id)
        self.app.state.keys.clear()   # at once here; other workers and replicas within the key cache TTL
        return _json(result)

    # ------------------------------------------------------------------ reports
    async def teams(self, request: Request) -> Response:
        self.authorize(request)
        _query(request, ())
        teams = await adminops.team_views(list(self.app.policies.teams.values()), self.app.state.budgets)
        return _json({"object": "list", "data": teams})

    async def _limits(self, request: Request, section: str) -> Response:
        self.authorize(request)
        q = _query(request, ("name",))
        table = getattr(self.app.policies, section)
        return _json(await adminops.limit_views(table, self.app.state.budgets, q.get("name")))

    async def users(self, request: Request) -> Response:
        return await self._limits(request, "users")

    async def tags(self, request: Request) -> Response:
        return await self._limits(request, "tags")

    async def sessions(self, request: Request) -> Response:
        return await self._limits(request, "sessions")

    async def spend(self, request: Request) -> Response:
        self.authorize(request)
        q = _query(request, ("team", "since", "by", "format", "key", "user", "tag", "session", "top"))
        fmt = q.get("format", "json")
        try:
            check_choice("format", fmt, FORMATS)
        except ValueError as exc:
            raise InvalidRequest(str(exc), code="invalid_value", param="format") from None
        with adminops.state_errors("The spend ledger"):
            await self.app.state.flush(wait=True)   # this process's buffered records first (see above)
        top = q.get("top")
        if top is not None and not top.isdigit():
            raise InvalidRequest(f"top must be a positive integer, got {top!r}", code="invalid_value", param="top")
        report = await adminops.spend(self.app.state.ledger, q.get("team"), q.get("since", "7d"), q.get("by", "team"),
                                      {n: q.get(n) for n in ("key", "user", "tag", "session")},
                                      int(top) if top is not None else None)
        return Response(render(report, fmt), media_type=MEDIA_TYPES[fmt])

    async def export(self, request: Request) -> Response:
        self.authorize(request)
        q = _query(request, ("team", "since", "until", "format"))
        fmt = q.get("format", "jsonl")
        with adminops.state_errors("The spend ledger"):
            await self.app.state.flush(wait=True)   # this process's buffered records first, as for /spend
        body = await ledger_export.export(self.app.state.ledger, q.get("team"), q.get("since", "7d"), q.get("until"),
                                          fmt)
        return Response(body, media_type=EXPORT_MEDIA_TYPES[fmt])

    # ------------------------------------------------------------------ reload
    async def reload(self, request: Request) -> Response:
        self.authorize(request)
        _query(request, ())
        try:
            policies = self.app.reload()
        except PolicyError as exc:
            raise InvalidRequest(f"Policies not reloaded, the last good set stays in force: {exc}",
                                 code="invalid_policy", param=exc.key) from None
        except (OSError, UnicodeError) as exc:
            raise InvalidRequest(f"Policies not reloaded, the last good set stays in force: cannot read the "
                                 f"policy files: {exc}", code="invalid_policy") from None
        generation = await self.announce()
        return _json({"status": "reloaded", "files": list(policies.files),
                      "models": sorted(s.name for s in policies.unique_models()),
                      "teams": sorted(policies.teams), "generation": generation})

    async def announce(self) -> int | None:
        """Tell the other workers and replicas to reload (shared state only); None if not told."""
        redis = self.app.state.redis
        if redis is None:
            return None
        try:
            self.generation = int(await redis.incr(RELOAD_KEY))
        except Exception as exc:   # this process reloaded; the others keep theirs until told
            log.warning("policies reloaded here, but the other workers could not be told: %r", exc)
            return None
        return self.generation

    async def start(self) -> None:
        """On shared state: note the current reload generation and follow later ones."""
        redis = self.app.state.redis
        if redis is None or self._task is not None:
            return
        with contextlib.suppress(Exception):
            self.generation = int(await redis.get(RELOAD_KEY) or 0)
        self._task = asyncio.get_running_loop().create_task(self._follow(redis))

    async def _follow(self, redis: Any) -> None:
        while True:
            await asyncio.sleep(RELOAD_POLL_S)
            try:
                current = int(await redis.get(RELOAD_KEY) or 0)
            except Exception:
                continue   # Redis down: the request path reports it; poll again
            if self.generation is None:
                self.generation = current
            elif current != self.generation:
                self.generation = current
                try:
                    self.app.reload()
                except (PolicyError, OSError, UnicodeError) as exc:
                    log.error("policy reload %d announced but refused here, last good set kept: %s", current, exc)

    async def aclose(self) -> None:
        await cancel(self._task)
        self._task = None
