"""The ``gateway`` command: ``serve``, ``check``, ``route``, ``keys``, ``spend``, ``ledger`` and ``demo``.

Flags override the ``GATEWAY_*`` settings for this process (and its workers).
``serve`` checks its address before it announces anything, says where its
policies came from (the built-in demo set when there is no ``policies/`` here
and none was named) and which deployments lack their key variable, and runs
uvicorn with the options of :mod:`gateway.serving` and the log setup of
:mod:`gateway.access_log`. ``check`` validates the policy files and prints what
they define; any error names file, line and key and exits non-zero. ``keys``, ``spend`` and ``ledger export`` are run by
:mod:`gateway.admin.client` (on Redis or the SQLite data directory directly, or through the admin API).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace

from gateway.demo import runner as demo
from gateway.policy import Policies, PolicyError, load_policies
from gateway.policy.models import missing_credentials
from gateway.settings import Settings, SettingsError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="LLM gateway with cost accounting.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="policy directory (default: policies/, else the built-in demo policies)")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 4000)")
    serve.add_argument("--workers", type=int, help="worker processes (default 1)")
    check = sub.add_parser("check", help="validate the policy files, print what they define, run their test cases")
    check.add_argument("--config", help="policy directory (default: policies/)")
    route = sub.add_parser("route", help="explain how a request would be routed")
    route.add_argument("--config", help="policy directory (default: policies/)")
    route.add_argument("--team", default="default", help="the caller's team (default: default)")
    route.add_argument("--model", help="the requested model (default: the request file's \"model\")")
    route.add_argument("--key", help="the caller's key id, for rules that match on keys")
    route.add_argument("--file", help="a JSON request body (default: one short user message)")
    route.add_argument("--endpoint", default="chat",
                       choices=["chat", "completions", "embeddings", "messages", "responses"])
    route.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                       help="a request header, e.g. x-gateway-tags:batch (repeatable)")
    keys = sub.add_parser("keys", help="create, list and revoke virtual keys")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key; its secret is printed once")
    create.add_argument("--team", required=True, help="the team the key's traffic belongs to")
    create.add_argument("--name", help="a label for the key")
    create.add_argument("--budget-usd", help="the key's own budget in USD (inside its team's)")
    create.add_argument("--budget-period", help="daily, weekly, monthly or total (default monthly)")
    create.add_argument("--rpm", type=int, help="requests per minute for this key")
    create.add_argument("--tpm", type=int, help="tokens per minute for this key")
    create.add_argument("--max-usd-per-minute", help="spend-rate brake: USD per UTC minute for this key")
    create.add_argument("--expires-in-days", type=float, help="the key stops working after this many days")
    listing = actions.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--team", help="only this team's keys")
    revoke = actions.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("id", help="the key id (key_...)")
    spend = sub.add_parser("spend", help="spend report from the ledger, with savings")
    spend.add_argument("--team", help="only this team")
    spend.add_argument("--since", default="7d", help="30m, 24h, 7d, 2w or an ISO date (default 7d)")
    spend.add_argument("--by", default="team",
                       help="one or two of team, key, user, tag, session, model, provider, deployment, route, "
                            "endpoint, day (e.g. team,user; default team)")
    spend.add_argument("--key", help="only this key id")
    spend.add_argument("--user", help="only this end user")
    spend.add_argument("--tag", help="only requests with this tag")
    spend.add_argument("--session", help="only this session")
    spend.add_argument("--top", type=int, help="the N costliest rows; the rest summed as (other)")
    spend.add_argument("--format", default="table", choices=("table", "csv", "json"))
    ledger = sub.add_parser("ledger", help="the spend ledger's records")
    ledger_actions = ledger.add_subparsers(dest="action", required=True)
    export = ledger_actions.add_parser("export", help="every record in a time range, as CSV or JSONL, oldest first")
    export.add_argument("--since", default="7d", help="30m, 24h, 7d, 2w or an ISO date (default 7d)")
    export.add_argument("--until", help="the end of the range, same forms (default now)")
    export.add_argument("--team", help="only this team")
    export.add_argument("--format", default="jsonl", choices=("csv", "jsonl"))
    for admin in (create, listing, revoke, spend, export):
        admin.add_argument("--url", help="the gateway's address when GATEWAY_REDIS_URL is not set "
                                         "(default http://GATEWAY_HOST:GATEWAY_PORT)")
        admin.add_argument("--config", help="policy directory, to warn about unknown teams (default: policies/)")
    for action in (create, listing, revoke):
        action.add_argument("--json", action="store_true", help="print JSON")
    demo.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return demo.run(args)
    try:
        settings = Settings.from_env().with_overrides(
            config_dir=args.config, host=getattr(args, "host", None), port=getattr(args, "port", None),
            workers=getattr(args, "workers", None))
    except SettingsError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    if args.command in ("keys", "spend", "ledger"):
        from gateway.admin.client import run

        return run(settings, args, lambda: policy_teams(settings.config_dir))
    if args.command == "serve":
        chosen = args.config is not None or bool(os.environ.get("GATEWAY_CONFIG_DIR"))
        return serve(settings, config_chosen=chosen)
    try:
        policies = load_policies(settings.config_dir)
    except PolicyError as exc:
        print(f"gateway: invalid policy: {exc}{_config_hint(settings.config_dir)}", file=sys.stderr)
        return 1
    if args.command == "check":
        print(describe(policies))
        return check_cases(policies)
    return route(policies, args)


def _config_hint(config_dir: str) -> str:
    if os.path.isdir(config_dir):
        return ""
    return (f" ({os.path.abspath(config_dir)}; run from the repository, whose policies/ holds the defaults, "
            "or give --config DIR)")


def check_cases(policies: Policies) -> int:
    from gateway.api.shapes import routing_shape
    from gateway.routing.explain import run_cases

    results = run_cases(policies, routing_shape)
    if not results:
        return 0
    print(f"policy tests: {sum(r.ok for r in results)} of {len(results)} pass")
    for r in results:
        print(f"  {r.line()}")
    return 0 if all(r.ok for r in results) else 1


def route(policies: Policies, args: argparse.Namespace) -> int:
    from gateway.routing.explain import explain, route_input

    body: dict[str, object] = {"messages": [{"role": "user", "content": "Hello"}]}
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as fh:
                loaded = json.load(fh)
        except (OSError, ValueError) as exc:
            print(f"gateway: cannot read a JSON request from {args.file}: {exc}", file=sys.stderr)
            return 2
        if not isinstance(loaded, dict):
            print(f"gateway: {args.file} must hold a JSON object", file=sys.stderr)
            return 2
        body = loaded
    model = args.model or body.get("model")
    if not isinstance(model, str) or not model:
        print("gateway: give --model, or a \"model\" in the request file", file=sys.stderr)
        return 2
    headers = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep:
            print(f"gateway: --header wants NAME:VALUE, got {item!r}", file=sys.stderr)
            return 2
        headers[name.strip().lower()] = value.strip()
    from gateway.api.shapes import routing_shape
    text, plan = explain(policies, route_input(policies, args.team, model, body, args.endpoint, headers, args.key,
                                               routing_shape))
    print(text)
    return 0 if plan is not None else 1


def policy_teams(config_dir: str) -> frozenset[str] | None:
    """The teams the policies define, or None when they cannot be read here (no warning then)."""
    try:
        return frozenset(load_policies(config_dir).teams)
    except (PolicyError, OSError, UnicodeError):
        return None


def describe(policies: Policies) -> str:
    lines = [f"policy files: {', '.join(policies.files)}", "models:"]
    for spec in policies.unique_models():
        alias = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        lines.append(f"  {spec.name}{alias}")
        for d in spec.deployments:
            p = d.price
            price = (f"in ${p.input / 1e6:g}/Mtok out ${p.output / 1e6:g}/Mtok ({d.price_source})"
                     if d.price_source != "unpriced" else "unpriced")
            key = f" key from ${d.api_key_env}{'' if d.api_key else ' (NOT SET)'}" if d.api_key_env else ""
            lines.append(f"    - {d.id}: provider {d.provider}, weight {d.weight:g}, "
                         f"context {d.context_window or '?'}, {price}{key}")
    lines.append("routes (first match wins):")
    for r in policies.routes:
        cands = ", ".join(d.id for d in r.candidates)
        lines.append(f"  {r.name}: {r.strategy} over [{cands}]")
    lines.append("  default: the requested model's own deployments, weighted, with fallback")
    lines.append("teams:")
    for team in policies.teams.values():
        budgets = ", ".join(f"${b.limit_nano / 1e9:g} {b.period}" for b in team.budgets) or "no budget"
        limits = "".join(f", {k} {v}" for k, v in (("rpm", team.rpm), ("tpm", team.tpm)) if v)
        allowed = f", models {sorted(team.allowed_models)}" if team.allowed_models is not None else ""
        exceed = f" then {team.on_exceed}" + (f" to {team.downgrade_to}" if team.downgrade_to else "")
        brake = f", max ${team.max_usd_per_minute_nano / 1e9:g}/minute" if team.max_usd_per_minute_nano else ""
        lines.append(f"  {team.name}: {budgets}{exceed if team.budgets else ''}{limits}{brake}{allowed}")
    for title, table in (("users", policies.users), ("tags", policies.tags), ("sessions", policies.sessions)):
        named = list(table.entries.items()) + ([("default (each other)", table.default)] if table.default else [])
        if named:
            lines.append(f"{title}:")
        for name, lim in named:
            budgets = ", ".join(f"${b.limit_nano / 1e9:g} {b.period}" for b in lim.budgets) or "no budget"
            extra = "".join(f", {k} {v}" for k, v in (("rpm", lim.rpm), ("tpm", lim.tpm)) if v)
            if lim.max_usd_per_minute_nano:
                extra += f", max ${lim.max_usd_per_minute_nano / 1e9:g}/minute"
            lines.append(f"  {name}: {budgets}{extra}")
    for hook in policies.notify.webhooks:
        watched = ", ".join(f"{s}:{o}" if o else s for s, o in hook.watches)
        lines.append(f"notify {hook.name}: {hook.url} at {', '.join(f'{t:.0%}' for t in hook.thresholds)} "
                     f"of [{watched}]{' (signed)' if hook.secret else ''}")
    return "\n".join(lines)


def serve(settings: Settings, config_chosen: bool = True) -> int:
    """``gateway serve``: check the address, find and load the policies, say where they came from and what
    they lack, then run uvicorn (one process, or ``--workers N`` on Redis or SQLite) until stopped."""
    import uvicorn

    from gateway.access_log import configure_logging, logging_config
    from gateway.serving import frozen, port_problem, uvicorn_options

    if settings.workers > 1 and not settings.redis_url and not settings.persistent:
        print("gateway: --workers > 1 needs shared state: set GATEWAY_REDIS_URL or a GATEWAY_DATA_DIR "
              "(not :memory:)", file=sys.stderr)
        return 2
    problem = port_problem(settings.host, settings.port)
    if problem is not None:
        print(f"gateway: {problem}", file=sys.stderr)
        return 1
    configure_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("gateway")
    if not config_chosen and not os.path.isdir(settings.config_dir):
        log.warning("no %s directory in %s (and no --config or GATEWAY_CONFIG_DIR): serving the built-in demo "
                    "policies, simulated models only; give --config DIR for your own",
                    settings.config_dir, os.getcwd())
        settings = replace(settings, config_dir=str(demo.DEMO_POLICIES))
    try:
        policies = load_policies(settings.config_dir)
    except PolicyError as exc:
        print(f"gateway: invalid policy: {exc}{_config_hint(settings.config_dir)}", file=sys.stderr)
        return 1
    settings = replace(settings, config_dir=os.path.abspath(settings.config_dir))
    log.info("policies from %s: %s; %d models", settings.config_dir,
             ", ".join(os.path.basename(f) for f in policies.files), len(policies.unique_models()))
    if settings.redis_url:
        log.info("state: Redis")
    elif settings.persistent:
        from gateway.state.sqlite_db import db_path
        log.info("state: SQLite database %s (GATEWAY_DATA_DIR)", db_path(settings.data_dir))
    else:
        log.warning("state: in memory (GATEWAY_DATA_DIR=:memory:), lost at exit")
    for deployment, variable in missing_credentials(policies.deployments):
        log.warning("deployment %s: its key variable %s is not set, so requests routed to it are answered "
                    "with an error naming %s (nothing is sent upstream) until it is set and the gateway "
                    "restarted", deployment, variable, variable)
    common = dict(uvicorn_options(settings), log_level=settings.log_level,
                  log_config=logging_config(settings.log_level, settings.log_format))
    if settings.workers > 1:
        from gateway.metrics import multiprocess_dir

        with multiprocess_dir(settings.metrics_dir) as metrics_dir:   # the workers' metrics, summed at scrape
            os.environ.update(replace(settings, metrics_dir=metrics_dir).to_env())
            uvicorn.run("gateway.serving:worker_app", factory=True, workers=settings.workers, **common)  # type: ignore[arg-type]
    else:
        # one process keeps its metrics in memory; prometheus-client reads this variable on import
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        settings = replace(settings, metrics_dir=None)
        os.environ.update(settings.to_env())
        from gateway.api.app import create_app

        uvicorn.run(frozen(create_app(settings, policies)), **common)  # type: ignore[arg-type]
    return 0
