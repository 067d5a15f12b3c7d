"""The gateway app in process, driven through its ASGI interface, for lifecycle and hostile-input tests.

:class:`Gateway` wraps an app built with :func:`gateway.api.app.create_app` on the embedded state:
it posts raw bodies (optionally going away mid-stream), counts the state's settles per hold, and
reads the ledger and the budgets' reserved amounts back.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections import Counter
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from gateway.api.app import GatewayApp, create_app
from gateway.budgets.rules import budget_rules
from gateway.settings import Settings
from gateway.state.budgets import ReserveRequest
from gateway.state.ledger import LedgerRecord

Message = MutableMapping[str, Any]


class Gateway:
    """The app in process, its settles counted per hold and its ledger read back."""

    def __init__(self, app: GatewayApp, shares: Gateway | None = None) -> None:
        """``shares``: another view of the same app whose HTTP clients this one adds to (closed with it)."""
        self.app = app
        self.http_clients: list[Any] = shares.http_clients if shares is not None else []
        self.settles: Counter[str] = Counter()
        state = app.state.state
        settle = state.settle

        async def counting(req: ReserveRequest, cost_nano: int, tokens: int) -> None:
            self.settles[req.request_id] += 1
            await settle(req, cost_nano, tokens)

        state.settle = counting

    def sdk_client(self, sdk: Callable[..., Any], http: Any, key: str, base_url: str = "http://gateway") -> Any:
        """An official SDK's client (``openai.AsyncOpenAI``, ``anthropic.AsyncAnthropic``) talking to the app
        in process through ``http`` (the SDK's own HTTP package: its ``AsyncClient`` and ``ASGITransport``)."""
        client = http.AsyncClient(transport=http.ASGITransport(app=self.app), base_url="http://gateway")
        self.http_clients.append(client)
        return sdk(base_url=base_url, api_key=key, max_retries=0, http_client=client)

    async def key(self, team: str, **kw: Any) -> str:
        _, secret = await self.app.state.state.key_store.create(team, "test", **kw)
        return str(secret)

    async def post(self, key: str, body: dict[str, Any] | bytes, path: str = "/v1/chat/completions",
                   disconnect_after: int | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """(status, body bytes); ``disconnect_after``: the client goes away after that many body parts;
        ``headers``: more request headers."""
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        sent: list[Message] = []
        parts = 0
        gone = asyncio.Event()
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": raw, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal parts
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                parts += 1
                if disconnect_after is not None and parts >= disconnect_after:
                    gone.set()

        scope = {"type": "http", "method": "POST", "path": path, "headers": [
            (b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json"),
            *((k.encode(), v.encode("latin-1")) for k, v in (headers or {}).items())]}
        await self.app(scope, receive, send)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")

    async def records(self) -> list[LedgerRecord]:
        state = self.app.state.state
        await state.flush()
        return list(await state.ledger.read(0))

    async def one_exit(self, team: str) -> LedgerRecord:
        """The team's single ledger record, after checking its hold was settled exactly once."""
        records = [r for r in await self.records() if r.team == team]
        assert len(records) == 1, records
        assert all(n == 1 for n in self.settles.values()), self.settles
        return records[0]

    async def reserved(self, team: str) -> int:
        state = self.app.state.state
        spec = self.app.state.policies.teams[team]
        usage = await state.budgets.usage(team, budget_rules(spec, None), datetime.now(UTC))
        return sum(u.reserved_nano for u in usage)




@asynccontextmanager
async def in_process(policy_dir: Path, policy: str) -> AsyncIterator[Gateway]:
    """The app on ``policy`` (a ``models.yaml`` text), started, and stopped afterwards."""
    (policy_dir / "models.yaml").write_text(textwrap.dedent(policy))
    app = create_app(Settings(config_dir=str(policy_dir)))
    app.state.state.start()
    gw = Gateway(app)
    try:
        yield gw
    finally:
        for client in gw.http_clients:
            await client.aclose()
        await app.state.state.aclose()
        await app.state.client.aclose()
