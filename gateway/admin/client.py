"""What ``gateway keys ...``, ``gateway spend`` and ``gateway ledger export`` do: pick a backend, run one
operation, print it.

Three backends answer the same calls with the same documents: :class:`StoreAdmin` runs
:mod:`gateway.admin.ops` on the stores directly, on Redis (``GATEWAY_REDIS_URL`` set) or in the
embedded SQLite database of ``GATEWAY_DATA_DIR`` (the default per-user directory when unset), so
the gateway need not be running and no master key is needed; :class:`HttpAdmin` calls a running
gateway's admin API with ``GATEWAY_MASTER_KEY`` (``--url`` given, or ``GATEWAY_DATA_DIR=:memory:``,
whose state lives only in that process). Both raise ``GatewayError`` on failure (the gateway's own
error, a 503 for an unreachable Redis or gateway), which :func:`run` prints as one
line on stderr with a non-zero exit: 2 for a bad argument, 1 otherwise. The spend
report is rendered by :mod:`gateway.admin.spend_report` on either path.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import Any, Protocol, TextIO

import orjson

from gateway.admin import export as ledger_export
from gateway.admin import ops as adminops
from gateway.admin.spend_report import FORMATS, check_choice, render
from gateway.errors import GatewayError, InvalidRequest, ServiceUnavailable
from gateway.settings import Settings
from gateway.state.keys import KeyStore
from gateway.state.ledger import Ledger

HTTP_TIMEOUT_S = 30.0


class RemoteError(GatewayError):
    """An error the admin API answered with: its status and envelope, unchanged."""

    def __init__(self, status: int, message: str, code: str | None) -> None:
        super().__init__(message, code=code)
        self.status_code = status


class Backend(Protocol):
    async def create_key(self, fields: dict[str, Any]) -> dict[str, Any]: ...

    async def list_keys(self, team: str | None) -> list[dict[str, Any]]: ...

    async def revoke_key(self, key_id: str) -> dict[str, Any]: ...

    async def spend(self, team: str | None, since: str, by: str, fmt: str,
                    filters: dict[str, str | None] | None = None, top: int | None = None) -> str: ...

    async def export(self, team: str | None, since: str, until: str | None, fmt: str, out: TextIO) -> None: ...

    async def aclose(self) -> None: ...


class StoreAdmin:
    """The operations on the state stores directly, as the gateway's workers see them."""

    def __init__(self, keys: KeyStore, ledger: Ledger, where: str, close: Callable[[], Awaitable[None]],
                 known_teams: Callable[[], Collection[str] | None]) -> None:
        self.keys = keys
        self.ledger = ledger
        self.where = where
        self._close = close
        self.known_teams = known_teams

    @classmethod
    def redis(cls, settings: Settings, known_teams: Callable[[], Collection[str] | None]) -> StoreAdmin:
        from gateway.state import redis_client
        from gateway.state.keys import RedisKeyStore
        from gateway.state.ledger import RedisLedger

        client = redis_client(settings)
        where = f"Redis at {_without_password(settings.redis_url or '')}"
        ledger: Ledger = RedisLedger(client)
        if not settings.clickhouse_url:
            return cls(RedisKeyStore(client), ledger, where, client.aclose, known_teams)
        from gateway.state.ledger_archive import clickhouse_ledger
        archive = clickhouse_ledger(settings)   # the history is there; the Redis stream is only a buffer

        async def close() -> None:
            await archive.aclose()
            await client.aclose()

        return cls(RedisKeyStore(client), archive, where, close, known_teams)

    @classmethod
    def sqlite(cls, settings: Settings, known_teams: Callable[[], Collection[str] | None]) -> StoreAdmin:
        from gateway.state.keys_sqlite import SqliteKeyStore
        from gateway.state.ledger_sqlite import SqliteLedger
        from gateway.state.sqlite_db import SchemaError, connect, db_path

        where = f"the state database {db_path(settings.data_dir)}"
        try:
            db = connect(settings.data_dir)
        except (OSError, sqlite3.Error, SchemaError) as exc:
            raise ServiceUnavailable(f"cannot open {where}: {exc}", code="state_unavailable") from None

        async def close() -> None:
            db.close()

        return cls(SqliteKeyStore(db, owns_connection=False), SqliteLedger(db, owns_connection=False), where,
                   close, known_teams)

    @contextlib.contextmanager
    def _named(self) -> Iterator[None]:
        try:
            yield
        except ServiceUnavailable as exc:
            cause = exc.__cause__ or exc.message
            raise ServiceUnavailable(f"{self.where} is unreachable: {cause}", code=exc.code) from None

    async def create_key(self, fields: dict[str, Any]) -> dict[str, Any]:
        req = adminops.key_request(fields)
        with self._named():
            return await adminops.create_key(self.keys, req, self.known_teams())

    async def list_keys(self, team: str | None) -> list[dict[str, Any]]:
        with self._named():
            return await adminops.list_keys(self.keys, team)

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        with self._named():
            return await adminops.revoke_key(self.keys, key_id)

    async def spend(self, team: str | None, since: str, by: str, fmt: str,
                    filters: dict[str, str | None] | None = None, top: int | None = None) -> str:
        with self._named():
            return render(await adminops.spend(self.ledger, team, since, by, filters, top), fmt)

    async def export(self, team: str | None, since: str, until: str | None, fmt: str, out: TextIO) -> None:
        with self._named():
            async for chunk in ledger_export.export_chunks(self.ledger, team, since, until, fmt):
                out.write(chunk)

    async def aclose(self) -> None:
        await self._close()


class HttpAdmin:
    """The operations through a running gateway's ``/admin`` API."""

    def __init__(self, url: str, master_key: str) -> None:
        self.url = url.rstrip("/")
        self.master_key = master_key

    def _call(self, method: str, path: str, query: dict[str, str] | None = None,
              body: dict[str, Any] | None = None) -> bytes:
        q = {k: v for k, v in (query or {}).items() if v is not None}
        url = f"{self.url}/admin{path}" + (f"?{urllib.parse.urlencode(q)}" if q else "")
        request = urllib.request.Request(url, method=method, data=orjson.dumps(body) if body is not None else None,
                                         headers={"Authorization": f"Bearer {self.master_key}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as reply:
                return bytes(reply.read())
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                err = orjson.loads(raw)["error"]
                message, code = str(err["message"]), err.get("code")
            except (orjson.JSONDecodeError, KeyError, TypeError):
                message, code = f"HTTP {exc.code} from {url}: {raw[:200].decode(errors='replace')}", None
            raise RemoteError(exc.code, message, code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServiceUnavailable(f"cannot reach the gateway admin API at {self.url} ({reason}); is "
                                     f"`gateway serve` running there? (--url, or GATEWAY_REDIS_URL to use "
                                     f"Redis directly)", code="gateway_unreachable") from None

    async def _json(self, method: str, path: str, query: dict[str, str] | None = None,
                    body: dict[str, Any] | None = None) -> Any:
        return orjson.loads(await asyncio.to_thread(self._call, method, path, query, body))

    async def create_key(self, fields: dict[str, Any]) -> dict[str, Any]:
        return dict(await self._json("POST", "/keys", body=fields))

    async def list_keys(self, team: str | None) -> list[dict[str, Any]]:
        return list((await self._json("GET", "/keys", {"team": team} if team else None))["data"])

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        return dict(await self._json("DELETE", f"/keys/{urllib.parse.quote(key_id, safe='')}"))

    async def spend(self, team: str | None, since: str, by: str, fmt: str,
                    filters: dict[str, str | None] | None = None, top: int | None = None) -> str:
        query = {"since": since, "by": by, "format": fmt} | ({"team": team} if team else {})
        query |= {k: v for k, v in (filters or {}).items() if v} | ({"top": str(top)} if top is not None else {})
        return (await asyncio.to_thread(self._call, "GET", "/spend", query)).decode()

    async def export(self, team: str | None, since: str, until: str | None, fmt: str, out: TextIO) -> None:
        query = {"since": since, "format": fmt} | ({"team": team} if team else {}) | ({"until": until} if until else {})
        out.write((await asyncio.to_thread(self._call, "GET", "/ledger/export", query)).decode())

    async def aclose(self) -> None:
        return None


def _without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + netloc))


def backend_for(settings: Settings, url: str | None, known_teams: Callable[[], Collection[str] | None]) -> Backend:
    """``--url``: that gateway's admin API; else Redis, else the SQLite data directory, directly; with
    ``GATEWAY_DATA_DIR=:memory:`` the state is the running gateway's own: its admin API."""
    if url is None and settings.redis_url:
        return StoreAdmin.redis(settings, known_teams)
    if url is None and settings.persistent:
        return StoreAdmin.sqlite(settings, known_teams)
    if not settings.master_key:
        raise InvalidRequest("GATEWAY_MASTER_KEY is not set: the admin API needs it (or set GATEWAY_REDIS_URL, "
                             "or GATEWAY_DATA_DIR to a data directory, to work on the state directly).")
    return HttpAdmin(url or f"http://{settings.host}:{settings.port}", settings.master_key)


# ---------------------------------------------------------------------- printing
def _limits(key: dict[str, Any]) -> str:
    budget = f"${key['budget_usd']} {key['budget_period']}" if key.get("budget_usd") is not None else "none"
    return (f"budget {budget}, rpm {key.get('rpm') or '-'}, tpm {key.get('tpm') or '-'}, "
            f"expires {key.get('expires_at') or 'never'}")


def show_created(result: dict[str, Any]) -> str:
    key = result["key"]
    name = f", name {key['name']}" if key.get("name") else ""
    return (f"Created key {key['id']} for team {key['team']}{name}: {_limits(key)}.\n"
            f"Secret (shown only now; the gateway stores just its hash):\n{result['secret']}\n")


def show_keys(keys: list[dict[str, Any]]) -> str:
    if not keys:
        return "No keys.\n"
    header = ["ID", "TEAM", "NAME", "STATUS", "PREFIX", "BUDGET", "RPM", "TPM", "CREATED", "EXPIRES"]
    rows = [[k["id"], k["team"], k["name"] or "-", k["status"], k["prefix"],
             f"${k['budget_usd']} {k['budget_period']}" if k.get("budget_usd") is not None else "-",
             str(k.get("rpm") or "-"), str(k.get("tpm") or "-"), k["created_at"], k.get("expires_at") or "never"]
            for k in keys]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n"
                   for r in [header, *rows])


def show_revoked(result: dict[str, Any]) -> str:
    key = result["key"]
    if result["revoked"]:
        return f"Revoked key {key['id']} (team {key['team']}); every worker refuses it within the key cache TTL.\n"
    return f"Key {key['id']} (team {key['team']}) was already {key['status']}; nothing changed.\n"


# ---------------------------------------------------------------------- commands
async def _command(backend: Backend, command: str, args: Any) -> str:
    if command == "ledger":
        await backend.export(args.team, args.since, args.until, args.format, sys.stdout)   # as it is read
        return ""
    if command == "spend":
        check_choice("format", args.format, FORMATS)
        filters = {name: getattr(args, name, None) for name in ("key", "user", "tag", "session")}
        return await backend.spend(args.team, args.since, args.by, args.format, filters, getattr(args, "top", None))
    if args.action == "create":
        fields = {name: getattr(args, name) for name in adminops.KEY_FIELDS if getattr(args, name) is not None}
        result = await backend.create_key(fields)
        for warning in result.get("warnings") or ():
            print(f"gateway: warning: {warning}", file=sys.stderr)
        return orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n" if args.json \
            else show_created(result)
    if args.action == "list":
        keys = await backend.list_keys(args.team)
        return orjson.dumps(keys, option=orjson.OPT_INDENT_2).decode() + "\n" if args.json else show_keys(keys)
    result = await backend.revoke_key(args.id)
    return orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n" if args.json else show_revoked(result)


def run(settings: Settings, args: Any, known_teams: Callable[[], Collection[str] | None]) -> int:
    """Run ``keys <action>``, ``spend`` or ``ledger export`` from parsed arguments; returns the exit status."""
    async def go() -> str:
        backend = backend_for(settings, args.url, known_teams)
        try:
            return await _command(backend, args.command, args)
        finally:
            await backend.aclose()

    try:
        out = asyncio.run(go())
    except GatewayError as exc:
        print(f"gateway: {exc.message}", file=sys.stderr)
        return 2 if exc.status_code == 400 else 1
    except ValueError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gateway: interrupted", file=sys.stderr)
        return 130
    sys.stdout.write(out)
    return 0
