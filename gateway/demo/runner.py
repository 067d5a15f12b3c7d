"""``gateway demo``: the gateway on the simulated provider, a minute of mixed traffic, a spend summary.

The gateway runs on the demo policy set shipped in ``gateway/demo/policies/`` (models
at different prices and speeds, a self-hosted model priced by the GPU hour, injected
failures, a model whose first deployment fails, teams with budgets, a downgrade and a
rate limit). With one worker it runs in this process on embedded state (or on Redis
when ``GATEWAY_REDIS_URL`` is set); with ``--workers N`` it runs as a ``gateway serve``
child on shared Redis. A key is created per team in the key store, the traffic in
:mod:`gateway.demo.traffic` runs for ``--duration`` seconds, and the closing summary
reports spend by team from the ledger. ``--keep-serving`` leaves the gateway up for
Prometheus and Grafana afterwards. No API key is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from gateway.money import usd_text
from gateway.settings import MEMORY, Settings, SettingsError

DEMO_POLICIES = Path(__file__).with_name("policies")
TEAMS = ("research", "support", "marketing", "platform")


class DemoError(Exception):
    pass


def add_parser(sub: Any) -> None:
    demo = sub.add_parser("demo", help="run the gateway on simulated models and drive a minute of mixed traffic")
    demo.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (default 60)")
    demo.add_argument("--host", help="listen address (default 127.0.0.1)")
    demo.add_argument("--port", type=int, help="listen port (default 4000)")
    demo.add_argument("--workers", type=int, help="worker processes (default 1; more need Redis)")
    demo.add_argument("--redis-url", help="shared state (default GATEWAY_REDIS_URL; none: in memory)")
    demo.add_argument("--keep-serving", action="store_true",
                      help="leave the gateway up after the traffic (for Prometheus and Grafana); Ctrl-C stops it")


def run(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env().with_overrides(
            config_dir=str(DEMO_POLICIES), host=args.host, port=args.port, workers=args.workers,
            redis_url=args.redis_url)
    except SettingsError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    if "GATEWAY_DATA_DIR" not in os.environ:   # the demo's traffic stays out of the real ledger and budgets
        settings = settings.with_overrides(data_dir=MEMORY)
    if settings.workers > 1 and not settings.redis_url and not settings.persistent:
        print("gateway: demo --workers > 1 needs shared state: pass --redis-url or set GATEWAY_REDIS_URL",
              file=sys.stderr)
        return 2
    if args.duration <= 0:
        print("gateway: --duration must be positive", file=sys.stderr)
        return 2
    import uvloop

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(demo(settings, args.duration, args.keep_serving))
    except DemoError as exc:
        print(f"gateway: demo: {exc}", file=sys.stderr)
        return 1


async def demo(settings: Settings, duration: float, keep_serving: bool) -> int:
    from gateway.budgets.rules import budget_rules
    from gateway.demo.traffic import Run, drive
    from gateway.pipeline.lifecycle import SUMMARY_ROUTE
    from gateway.policy import load_policies

    policies = load_policies(settings.config_dir)
    windows = {spec.name: min(d.context_window or 0 for d in spec.deployments) for spec in policies.unique_models()}
    _check_port(settings.host, settings.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gateway: InProcessGateway | WorkerGateway = \
        WorkerGateway(settings) if settings.workers > 1 else InProcessGateway(settings)
    await gateway.start()
    try:
        keys = {team: (await gateway.state.key_store.create(team, "demo"))[1] for team in TEAMS}
        where = f"{settings.workers} workers on Redis" if settings.workers > 1 else \
            "1 worker on Redis" if settings.redis_url else "1 worker, in-memory state"
        print(f"gateway demo: {gateway.url} ({where}); {duration:g}s of traffic from {', '.join(TEAMS)}",
              file=sys.stderr, flush=True)
        since = time.time()
        traffic = Run(duration, stop)
        await drive(gateway.url, keys, traffic, windows)
        await gateway.written(since - 1, traffic.total().requests)
        totals = {row["key"]: row for row in await gateway.state.ledger.totals(since - 1, by="team")}
        summaries: dict[str, list[int]] = {}
        for r in await gateway.state.ledger.read(since - 1):
            if r.route == SUMMARY_ROUTE:
                summaries.setdefault(r.team, []).append(r.cost_nano)
        now = datetime.now(UTC)
        budgets = []
        for team in TEAMS:
            spec = policies.teams.get(team)
            if spec is not None and spec.budgets:
                budgets += [(team, u) for u in await gateway.state.budgets.usage(team, budget_rules(spec, None), now)]
        serving = keep_serving and not stop.is_set()
        print(summary(traffic, totals, budgets, gateway.url, summaries, serving=serving), flush=True)
        if serving:
            print(f"gateway still serving on {gateway.url} (metrics: {gateway.url}/metrics); Ctrl-C stops it\n"
                  f"{prometheus_hint(settings.port)}", flush=True)
            await gateway.serve_until(stop)
    finally:
        await gateway.stop()
    return 0


def summary(traffic: Any, totals: dict[str, dict[str, Any]], budgets: list[tuple[str, Any]], url: str,
            summaries: dict[str, list[int]] | None = None, *, serving: bool = False) -> str:
    """The closing report. ``requests`` are the demo's own requests (the header's count is their total);
    ``summaries`` the compression summary calls the gateway made for a team, each its own ledger record,
    their cost part of the team's spend; spend and savings come from the ledger."""

    summaries = summaries or {}
    head = f"{'team':<10} {'requests':>8} {'ok':>6} {'budget':>6} {'limited':>7} {'failed':>6} " \
           f"{'summaries':>9} {'spend USD':>12} {'saved USD':>12}"
    total = traffic.total()
    lines = [f"\nSpend by team (from the ledger), {total.requests} requests in "
             f"{min(traffic.elapsed(), traffic.duration_s):.0f}s:", head, "-" * len(head)]
    spend = saved = 0
    for team in sorted(traffic.tallies):
        t, row = traffic.tallies[team], totals.get(team, {})
        cost, savings = row.get("cost_nano", 0), sum(row.get("savings_nano", {}).values())
        spend, saved = spend + cost, saved + savings
        lines.append(f"{team:<10} {t.requests:>8} {t.ok:>6} {t.budget:>6} {t.rate_limited:>7} {t.failed:>6} "
                     f"{len(summaries.get(team, ())):>9} {usd_text(cost):>12} {usd_text(savings):>12}")
    lines.append("-" * len(head))
    calls = sum(len(v) for v in summaries.values())
    lines.append(f"{'total':<10} {total.requests:>8} {total.ok:>6} {total.budget:>6} {total.rate_limited:>7} "
                 f"{total.failed:>6} {calls:>9} {usd_text(spend):>12} {usd_text(saved):>12}")
    lines.append("columns: budget = refused by a budget, limited = rate limited,\n"
                 "         summaries = compression summary calls the gateway made to shorten long conversations\n"
                 "         (each its own ledger record, billed to the team: its cost is in the team's spend)")
    records = sum(row.get("requests", 0) for row in totals.values())
    lines.append(f"The ledger holds {records} records for this run: the {total.requests} requests and the "
                 f"{calls} summaries" + ("." if records == total.requests + calls else
                                         f" should make {total.requests + calls}; see the gateway's log."))
    if budgets:
        lines.append("\nBudgets now:")
        for team, u in budgets:
            used = 100 * u.spent_nano / u.limit_nano if u.limit_nano else 100.0
            lines.append(f"  {team:<10} {u.period:<8} spent ${usd_text(u.spent_nano)} of ${usd_text(u.limit_nano)} "
                         f"({used:.1f}%)")
    charged = total.cost_nano
    summary_cost = sum(sum(v) for v in summaries.values())
    extra = f" plus ${usd_text(summary_cost)} for the {calls} compression summaries it ran for them" if calls else ""
    lines.append(f"\nClients were charged ${usd_text(charged)} in all (the cost_usd the gateway returned){extra}; "
                 f"that is ${usd_text(charged + summary_cost)}, and the ledger says ${usd_text(spend)}.")
    if serving:
        lines.append(f"Metrics: {url}/metrics")
    else:
        lines.append("The gateway has stopped; run with --keep-serving to leave it up for Prometheus and Grafana.")
    return "\n".join(lines)


def prometheus_hint(port: int) -> str:
    """How to scrape this gateway with a local Prometheus (no Docker): the config in the repository."""
    config = "deploy/prometheus/prometheus.local.yml"
    target = "" if port == 4000 else f" (it scrapes 127.0.0.1:4000: change its target to 127.0.0.1:{port})"
    return (f"Prometheus without Docker, from the repository root{target}:\n"
            f"  prometheus --config.file={config} --storage.tsdb.path=/tmp/gateway-prometheus\n"
            "then open http://127.0.0.1:9090 (alerts: the Alerts tab).")


def _check_port(host: str, port: int) -> None:
    from gateway.serving import port_problem

    problem = port_problem(host, port)
    if problem is not None:
        raise DemoError(problem)


class InProcessGateway:
    """One worker in this process, on the state the settings name (embedded, or Redis)."""

    def __init__(self, settings: Settings) -> None:
        import logging

        import uvicorn

        from gateway.api.app import GatewayApp, build_state
        from gateway.serving import uvicorn_options

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("gateway").setLevel(logging.ERROR)   # injected upstream failures are expected here
        self.app_state = build_state(settings)
        self.state = self.app_state.state
        self.url = f"http://{_connect_host(settings.host)}:{settings.port}"

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield   # the demo handles SIGINT/SIGTERM itself

        self.server = Server(uvicorn.Config(GatewayApp(self.app_state),
                                            **dict(uvicorn_options(settings), loop="none", log_level="warning")))
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.ensure_future(self.server.serve())
        for _ in range(600):
            if self.server.started:
                return
            if self.task.done():
                break
            await asyncio.sleep(0.05)
        raise DemoError(f"the gateway did not start on {self.url}")

    async def written(self, since: float, requests: int) -> None:
        await self.state.flush()

    async def serve_until(self, stop: asyncio.Event) -> None:
        await stop.wait()

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(Exception):
                await self.task


class WorkerGateway:
    """``gateway serve --workers N`` as a child process on shared Redis; keys and the ledger are read
    from the same Redis here."""

    def __init__(self, settings: Settings) -> None:
        from gateway.state import open_state

        self.settings = settings
        self.state = open_state(settings)
        self.url = f"http://{_connect_host(settings.host)}:{settings.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None

    async def start(self) -> None:
        import httpx

        s = self.settings
        self.log = tempfile.NamedTemporaryFile(prefix="gateway-demo-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", s.config_dir, "--host", s.host,
             "--port", str(s.port), "--workers", str(s.workers)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **s.to_env()})
        async with httpx.AsyncClient(timeout=1.0) as client:
            for _ in range(1200):
                if self.proc.poll() is not None:
                    break
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/health/ready")).status_code == 200:
                        print(f"gateway demo: gateway log in {self.log.name}", file=sys.stderr)
                        return
                await asyncio.sleep(0.05)
        await self.stop()
        raise DemoError(f"the gateway did not start on {self.url}; see {self.log.name}")

    async def written(self, since: float, requests: int) -> None:
        """Wait (10 s at most) until the workers' ledger writers have stored this run's records: at least
        one per client request (compression summaries add more), and no new ones for half a second
        (the writers flush every 0.1 s)."""
        seen, steady = -1, 0
        for _ in range(100):
            rows = await self.state.ledger.totals(since, by="team")
            count = sum(r["requests"] for r in rows)
            steady = steady + 1 if count == seen else 0
            if count >= requests and steady >= 5:
                return
            seen = count
            await asyncio.sleep(0.1)

    async def serve_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            for _ in range(300):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                self.proc.kill()
                self.proc.wait(5)
        if self.log is not None:
            self.log.close()
        await self.state.aclose()


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
