#!/usr/bin/env python3
"""Budget bypass benchmark (issue 11): can any mix of traffic push settled spend past a budget, or leave it
badly under-used? It starts its own redis-server, the mock upstream and two ``gateway serve --workers 4``
processes on that one Redis (loopback, free ports; it stops only what it started), then sends 10,000 requests
over every endpoint (chat, completions, embeddings, Messages, Responses; stream and not), with streams the
client cuts at a random point, conversations long enough to make the gateway call the summary model
(compression), and repeated deterministic requests that the response cache answers, against small team and
key budgets, from 64 concurrent clients spread over both gateways.

Then, once every hold has settled, per budget: the limit, what was settled, what is still reserved, and the
same team's settled spend in a sequential run (one request at a time, same request mix, a twin team). It checks
that settled never passes any limit, nothing is left reserved, and the concurrent run settled no less than the
sequential one minus the in-flight worst case (concurrency x the largest hold). Exit status 1 when a check fails.

    python bench/bypass.py [--requests 10000] [--concurrency 64] [--gateways 2] [--workers 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.state.budgets import BudgetRule  # noqa: E402
from gateway.state.budgets_redis import RedisBudgetStore  # noqa: E402
from gateway.state.keys import RedisKeyStore  # noqa: E402

USD = 1_000_000_000
TEAM_USD = 5
KEY_USD = 2
TEAMS = ("t0", "t1", "t2", "t3")
SEQ_TEAM = "seq"
# $100 per M input tokens, $1,000 per M output: a short chat request costs about $0.01 ($0.0101 with 10 output)
PRICE = "price: {input_per_mtok: 100, output_per_mtok: 1000}"
MAX_OUT = 10
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def policy(mock: str) -> str:
    teams = "".join(f"  {t}: {{budgets: [{{period: daily, usd: {TEAM_USD}}}]}}\n" for t in (*TEAMS, SEQ_TEAM))
    return f"""models:
  chat:
    deployments:
      - {{provider: openai, name: chat, model: mock-tokens{MAX_OUT}-chunks{MAX_OUT}, api_base: '{mock}/v1',
         max_output_tokens: {MAX_OUT}, context_window: 100000, apis: [chat, completions], {PRICE}}}
  embed:
    deployments:
      - {{provider: openai, name: embed, model: mock-embed, api_base: '{mock}/v1', capabilities: [embeddings],
         {PRICE}}}
cache:
  mode: deterministic
compression:
  enabled: true
  trigger_tokens: 400
  target_tokens: 200
  strategies: [summarize, drop_middle]
  summary_model: chat
  summary_max_tokens: 16
  keep_first_turns: 1
  keep_last_turns: 1
teams:
{teams}"""


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@dataclass
class Shot:
    kind: str
    path: str
    body: dict[str, Any]
    stream: bool
    cut_after: int | None = None       # bytes read before the client hangs up (a cut stream)


KINDS = ("chat", "chat-stream", "chat-cut", "completions", "completions-stream", "embeddings", "messages",
         "messages-stream", "messages-cut", "responses", "responses-stream", "cached", "compressed")


def shot(rng: random.Random, kinds: tuple[str, ...] = KINDS) -> Shot:
    """One request of the mix."""
    kind = rng.choice(kinds)
    msg = [{"role": "user", "content": text(rng, rng.randint(3, 12))}]
    if kind.startswith("chat") or kind == "cached" or kind == "compressed":
        body: dict[str, Any] = {"model": "chat", "messages": msg, "max_tokens": MAX_OUT}
        if kind == "cached":                     # deterministic and from a small set: the response cache answers
            body |= {"temperature": 0,
                     "messages": [{"role": "user", "content": f"cached question {rng.randint(0, 4)}"}]}
        if kind == "compressed":                 # long enough to be summarised by the summary model
            body["messages"] = [{"role": "user" if i % 2 == 0 else "assistant", "content": text(rng, 60)}
                                for i in range(11)]
        stream = kind in ("chat-stream", "chat-cut")
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return Shot(kind, "/v1/chat/completions", body, stream, rng.randint(1, 1500) if kind == "chat-cut" else None)
    if kind.startswith("completions"):
        stream = kind.endswith("stream")
        body = {"model": "chat", "prompt": text(rng, 8), "max_tokens": MAX_OUT, "stream": stream}
        return Shot(kind, "/v1/completions", body, stream)
    if kind == "embeddings":
        return Shot(kind, "/v1/embeddings", {"model": "embed", "input": text(rng, 10)}, False)
    if kind.startswith("messages"):
        stream = kind != "messages"
        body = {"model": "chat", "max_tokens": MAX_OUT, "messages": msg, "stream": stream}
        return Shot(kind, "/v1/messages", body, stream, rng.randint(1, 1500) if kind == "messages-cut" else None)
    stream = kind.endswith("stream")
    return Shot(kind, "/v1/responses", {"model": "chat", "input": text(rng, 8), "max_output_tokens": MAX_OUT,
                                        "stream": stream}, stream)


@dataclass
class Tally:
    sent: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    by_kind_ok: dict[str, int] = field(default_factory=dict)
    cut: int = 0
    cache_hits: int = 0
    compressed: int = 0

    def add(self, key: str) -> None:
        self.by_status[key] = self.by_status.get(key, 0) + 1


async def send(client: httpx.AsyncClient, url: str, key: str, s: Shot, tally: Tally) -> str:
    headers = {"authorization": f"Bearer {key}", "x-api-key": key}
    tally.sent += 1
    try:
        async with client.stream("POST", url + s.path, json=s.body, headers=headers) as resp:
            if resp.headers.get("x-gateway-cache") == "hit":
                tally.cache_hits += 1
            if resp.headers.get("x-gateway-compression"):
                tally.compressed += 1
            got = 0
            head = b""
            async for chunk in resp.aiter_bytes():
                got += len(chunk)
                if len(head) < 4096:
                    head += chunk
                if s.cut_after is not None and got >= s.cut_after and resp.status_code == 200:
                    tally.cut += 1
                    break                         # leaving the block closes the connection mid-stream
            status = str(resp.status_code)
            if resp.status_code >= 400:
                try:
                    error = json.loads(head or b"{}").get("error", {})
                    status += " " + str(error.get("code") or error.get("type"))
                except (ValueError, AttributeError):
                    pass
    except httpx.HTTPError as exc:
        status = f"transport {type(exc).__name__}"
    tally.add(status)
    if status == "200":
        tally.by_kind_ok[s.kind] = tally.by_kind_ok.get(s.kind, 0) + 1
    return status


@dataclass
class Budget:
    scope: str
    owner: str
    team: str
    limit: int
    spent: int = 0
    reserved: int = 0


async def usage(rc: Redis, budgets: list[Budget]) -> None:
    store = RedisBudgetStore(rc)
    now = datetime.now(UTC)
    for b in budgets:
        [u] = await store.usage(b.team, [BudgetRule(b.scope, b.owner, "daily", b.limit)], now)
        b.spent, b.reserved = u.spent_nano, u.reserved_nano


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: process exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready within {timeout}s:\n{log.read_text()[-2000:]}")


async def run(args: argparse.Namespace, work: Path, procs: list[subprocess.Popen[bytes]]) -> int:
    rport, mport = free_port(), free_port()
    procs.append(start(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", str(work)], work / "redis.log"))
    procs.append(start([sys.executable, str(ROOT / "bench" / "mock_upstream.py"), "--port", str(mport)],
                       work / "mock.log"))
    wait_ready(f"http://127.0.0.1:{mport}/health", procs[-1], work / "mock.log")
    (work / "policies").mkdir()
    (work / "policies" / "models.yaml").write_text(policy(f"http://127.0.0.1:{mport}"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{rport}/0", "GATEWAY_LOG_LEVEL": "warning"}
    urls = []
    for g in range(args.gateways):
        port = free_port()
        log = work / f"gateway{g}.log"
        procs.append(start([sys.executable, "-m", "gateway", "serve", "--config", str(work / "policies"),
                            "--port", str(port), "--workers", str(args.workers)], log, env))
        urls.append(f"http://127.0.0.1:{port}")
        wait_ready(f"{urls[-1]}/health/ready", procs[-1], log)
    rc = Redis(host="127.0.0.1", port=rport)
    keys: dict[str, list[tuple[str, str]]] = {}
    budgets: list[Budget] = []
    ks = RedisKeyStore(rc)
    for team in (*TEAMS, SEQ_TEAM):
        capped, secret_a = await ks.create(team, "capped", budget_usd=str(KEY_USD), budget_period="daily")
        _, secret_b = await ks.create(team, "open")
        keys[team] = [(secret_a, capped.id), (secret_b, "")]
        budgets += [Budget("team", team, team, TEAM_USD * USD), Budget("key", capped.id, team, KEY_USD * USD)]

    # the concurrent run: every request to a random team, key and gateway
    rng = random.Random(args.seed)
    kinds = tuple(args.only.split(",")) if args.only else KINDS
    plan = [(rng.choice(TEAMS), rng.randrange(2), rng.randrange(len(urls)), shot(rng, kinds))
            for _ in range(args.requests)]
    tally = Tally()
    queue: asyncio.Queue[tuple[str, int, int, Shot]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                team, k, g, s = queue.get_nowait()
                await send(client, urls[g], keys[team][k][0], s, tally)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        concurrent_s = time.monotonic() - started
        # the sequential twin: the same mix, one request at a time, until the budget is used up
        seq = Tally()
        srng = random.Random(args.seed + 1)
        refused_in_a_row = 0
        while refused_in_a_row < 40 and seq.sent < args.sequential_max:
            status = await send(client, urls[seq.sent % len(urls)], keys[SEQ_TEAM][srng.randrange(2)][0],
                                shot(srng, kinds), seq)
            refused_in_a_row = refused_in_a_row + 1 if status.startswith("429") else 0

    deadline = time.monotonic() + 60                  # cut streams settle once the gateway sees the hang-up
    while True:
        await usage(rc, budgets)
        if all(b.reserved == 0 for b in budgets) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    await rc.aclose()

    # the largest hold one request can take: the compressed chat request (prompt ~700 tokens, counted +25%
    # at most) plus its summary call, each with MAX_OUT output tokens; bounded generously at 1,000 input tokens
    worst_hold = 2 * (1000 * 100_000 + 16 * 1_000_000)
    in_flight = args.concurrency * worst_hold
    seq_spent = next(b.spent for b in budgets if b.scope == "team" and b.owner == SEQ_TEAM)
    failures: list[str] = []
    rows = []
    for b in budgets:
        over = b.spent > b.limit
        under = b.scope == "team" and b.owner != SEQ_TEAM and b.spent < seq_spent - in_flight
        if over:
            failures.append(f"{b.scope} {b.owner}: settled {b.spent} above the limit {b.limit}")
        if b.reserved:
            failures.append(f"{b.scope} {b.owner}: {b.reserved} still reserved")
        if under:
            failures.append(f"{b.scope} {b.owner}: settled {b.spent}, sequential {seq_spent}, in flight {in_flight}")
        rows.append({"scope": b.scope, "owner": b.owner if b.scope == "team" else f"{b.team}/capped-key",
                     "limit_usd": b.limit / USD, "settled_usd": b.spent / USD, "reserved_usd": b.reserved / USD,
                     "headroom_usd": (b.limit - b.spent) / USD})
    result = {"requests": tally.sent, "concurrency": args.concurrency, "gateways": args.gateways,
              "workers": args.workers, "seconds": round(concurrent_s, 1), "statuses": tally.by_status,
              "answered_by_kind": tally.by_kind_ok, "streams_cut_by_client": tally.cut,
              "cache_hits": tally.cache_hits, "compressed": tally.compressed,
              "sequential": {"requests": seq.sent, "statuses": seq.by_status, "settled_usd": seq_spent / USD},
              "in_flight_worst_case_usd": in_flight / USD, "budgets": rows, "failures": failures}
    print(f"{tally.sent} requests, {args.concurrency} concurrent, {args.gateways} gateways x {args.workers} workers,"
          f" {concurrent_s:.1f} s")
    print("statuses:", json.dumps(tally.by_status, sort_keys=True))
    print("answered by kind:", json.dumps(tally.by_kind_ok, sort_keys=True))
    print(f"streams cut by the client: {tally.cut}, cache hits: {tally.cache_hits}, compressed: {tally.compressed}")
    print(f"sequential twin: {seq.sent} requests, settled ${seq_spent / USD:.6f} of ${TEAM_USD}; "
          f"in-flight worst case ${in_flight / USD:.4f}")
    print(f"{'budget':<18} {'limit':>8} {'settled':>12} {'reserved':>10} {'headroom':>10}")
    for r in rows:
        print(f"{r['scope'] + ' ' + r['owner']:<18} {r['limit_usd']:>8.2f} {r['settled_usd']:>12.6f} "
              f"{r['reserved_usd']:>10.6f} {r['headroom_usd']:>10.6f}")
    overruns = [line for g in range(args.gateways)
                for line in (work / f"gateway{g}.log").read_text(errors="replace").splitlines() if "overrun" in line]
    result["overrun_log_lines"] = len(overruns)
    print(f"overruns logged by the gateways: {len(overruns)}", *overruns[:5], sep="\n  ")
    print("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 1 if failures else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--gateways", type=int, default=2)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--sequential-max", type=int, default=3000, help="cap on the sequential twin's requests")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--only", help="comma-separated request kinds (default: all of them): " + ",".join(KINDS))
    args = p.parse_args()
    if shutil.which("redis-server") is None:
        print("bypass: redis-server is not on the PATH", file=sys.stderr)
        return 2
    procs: list[subprocess.Popen[bytes]] = []
    work = Path(tempfile.mkdtemp(prefix="bypass-"))
    try:
        return asyncio.run(run(args, work, procs))
    finally:
        for proc in reversed(procs):              # only what this run started, by PID
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
