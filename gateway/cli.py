"""The ``gateway`` command: ``serve``, ``check`` and ``demo`` (in :mod:`gateway.demo`).

Flags override the ``GATEWAY_*`` settings for this process (and its workers).
``check`` validates the policy files and prints what they define; any error
names file, line and key and exits non-zero.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace

from gateway import demo
from gateway.policy import Policies, PolicyError, load_policies
from gateway.settings import Settings, SettingsError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="LLM gateway with cost accounting.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="policy directory (default: policies/)")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 4000)")
    serve.add_argument("--workers", type=int, help="worker processes (default 1)")
    check = sub.add_parser("check", help="validate the policy files and print what they define")
    check.add_argument("--config", help="policy directory (default: policies/)")
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
    try:
        policies = load_policies(settings.config_dir)
    except PolicyError as exc:
        print(f"gateway: invalid policy: {exc}", file=sys.stderr)
        return 1
    if args.command == "check":
        print(describe(policies))
        return 0
    return serve(settings, policies)


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
    lines.append("routes: default (each model's deployments, weighted, with fallback)")
    lines.append("teams:")
    for team in policies.teams.values():
        budgets = ", ".join(f"${b.limit_nano / 1e9:g} {b.period}" for b in team.budgets) or "no budget"
        limits = "".join(f", {k} {v}" for k, v in (("rpm", team.rpm), ("tpm", team.tpm)) if v)
        allowed = f", models {sorted(team.allowed_models)}" if team.allowed_models is not None else ""
        exceed = f" then {team.on_exceed}" + (f" to {team.downgrade_to}" if team.downgrade_to else "")
        lines.append(f"  {team.name}: {budgets}{exceed if team.budgets else ''}{limits}{allowed}")
    return "\n".join(lines)


def serve(settings: Settings, policies: Policies) -> int:
    import uvicorn

    if settings.workers > 1 and not settings.redis_url:
        print("gateway: --workers > 1 needs shared state: set GATEWAY_REDIS_URL", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    common = dict(host=settings.host, port=settings.port, loop="uvloop", http="httptools",
                  access_log=False, log_level=settings.log_level, lifespan="on",
                  proxy_headers=False, server_header=False)
    if settings.workers > 1:
        from gateway.metrics import multiprocess_dir

        with multiprocess_dir(settings.metrics_dir) as metrics_dir:   # the workers' metrics, summed at scrape
            os.environ.update(replace(settings, metrics_dir=metrics_dir).to_env())
            uvicorn.run("gateway.app:create_app", factory=True, workers=settings.workers, **common)  # type: ignore[arg-type]
    else:
        # one process keeps its metrics in memory; prometheus-client reads this variable on import
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        settings = replace(settings, metrics_dir=None)
        os.environ.update(settings.to_env())
        from gateway.app import create_app

        uvicorn.run(create_app(settings, policies), **common)  # type: ignore[arg-type]
    return 0
