"""This tree's gateway against another checkout's, interleaved in one run: the A/B comparison.

On this VM, wall-clock figures drift by more than the 5 % a regression check is meant to resolve
from one minute to the next, so two gateways measured in separate runs (or one after the other in
one run) differ by when they ran as much as by what they run. This runner alternates them: after
one shared mock upstream and a direct measurement, each of ``--rounds`` rounds starts one gateway,
measures scenario ``a`` (32 connections) and ``a1`` (1 connection) as ``bench/run.py`` does (wrk,
the gateway pinned to cpu 1, the load and the mock on cpu 0, CPU read from /proc), stops it, then
does the same for the other; the order flips every round (ABBA), so a steady drift weighs on both
alike. It prints every round and the medians, with B's median as a share of A's, and writes
``ab.json`` under ``--out``.

    git worktree add --detach /tmp/base 2fd65a0
    python bench/ab.py --baseline /tmp/base --rounds 6
    python bench/ab.py --baseline /tmp/base --env GATEWAY_LOG_LEVEL=warning   # env for this tree only
    python bench/ab.py --baseline /tmp/base --budgets   # budgets and limits on a private Redis

Both gateways run ``python -m gateway serve --config bench/policies`` from their own checkout, with
the state in memory; with ``--budgets``, on one private redis-server (emptied before each gateway
starts) with the default team holding ``bench/run.py --budgets``' monthly and daily budgets and RPM/TPM
limits (no virtual key: the two commits need not store keys alike). Ports 18080 (mock) and 4100
must be free. Every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from harness import free_port, port_in_use, start, start_mock_upstream, start_redis, stop_process, wait_ready
from run import (
    ROOT,
    SCENARIOS,
    body_files,
    budgets_policy,
    cpu_seconds,
    log,
    run_wrk,
    scenario_request,
    smoke,
    team_budgets,
)

PORT = 4100


def empty_redis(port: int) -> None:
    """FLUSHALL on the private Redis, so each gateway starts from the same (empty) state."""
    import redis

    with redis.Redis(host="127.0.0.1", port=port) as client:
        client.flushall()


def measure_gateway(tree: Path, config: str, env: dict[str, str], args: argparse.Namespace,
                    bodies: dict[str, Path], run_dir: Path, name: str) -> dict[str, Any]:
    """Start the gateway of ``tree`` (policies from ``config``) on cpu 1, measure a and a1, stop it."""
    cmd = ["taskset", "-c", "1", sys.executable, "-m", "gateway", "serve", "--config", config,
           "--port", str(PORT)]
    proc = start(cmd, run_dir / f"gateway-{name}.log", env=env, cwd=tree)
    out: dict[str, Any] = {}
    try:
        base = f"http://127.0.0.1:{PORT}"
        err = wait_ready(base + "/health/ready", proc, 90) or smoke(base + "/v1", args.header)
        if err:
            return {"error": err}
        for key in ("a", "a1"):
            sc = SCENARIOS[key]
            url, body, headers = scenario_request(sc, base + "/v1", args.header, bodies)
            run_wrk(url, body, sc["conns"], args.warmup, headers, "0", run_dir / f"raw-{name}.log")
            c0 = cpu_seconds(proc.pid)
            r = run_wrk(url, body, sc["conns"], args.duration, headers, "0", run_dir / f"raw-{name}.log")
            cpu = cpu_seconds(proc.pid) - c0
            if r.get("error") or r.get("errors"):
                return {"error": f"{key}: {r.get('error') or str(r['errors']) + ' failed requests'}"}
            out[f"{key}_rps"] = r["rps"]
            out[f"{key}_p50"] = r["p50_ms"]
            out[f"{key}_cpu"] = round(cpu * 1000 / r["requests"], 4) if r["requests"] else None
    finally:
        stop_process(proc, f"gateway {name}")
    return out


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="a checkout of the commit to compare with (B)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per scenario per gateway per round")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for this tree's gateway only")
    p.add_argument("--header", action="append", default=["Authorization: Bearer sk-bench"])
    p.add_argument("--budgets", action="store_true", help="budgets and limits on a private redis-server")
    p.add_argument("--out", default="/tmp/gateway-bench")
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= 20 or not 0 < args.duration <= 60 or not 0 <= args.warmup <= 30:
        p.error("--rounds must be in [1, 20], --duration in (0, 60] and --warmup in [0, 30]")
    baseline = Path(args.baseline).resolve()
    if not (baseline / "gateway").is_dir():
        p.error(f"{baseline} holds no gateway/ package")
    for port in (18080, PORT):
        if port_in_use(port):
            sys.exit(f"ab.py: port {port} is already in use; stop whatever listens there first")
    started = dt.datetime.now()
    run_dir = Path(args.out) / (started.strftime("%Y%m%d-%H%M%S") + "-ab")
    run_dir.mkdir(parents=True, exist_ok=True)
    bodies = body_files(run_dir)
    common = dict(os.environ, GATEWAY_DATA_DIR=":memory:", BENCH_ANTHROPIC_KEY="sk-bench-anthropic")
    env_a = dict(common, **dict(e.split("=", 1) for e in args.env))
    configs = {"A": "bench/policies", "B": "bench/policies"}   # each checkout's own
    redis_proc = None
    if args.budgets:
        # each checkout's own bench models (the two commits' policy formats may differ), the default team's
        # budgets and limits (the team every keyless request is in)
        configs = {name: budgets_policy(tree / "bench" / "policies" / "models.yaml", run_dir / f"policies-{name}",
                                        team_budgets("default")) for name, tree in (("A", ROOT), ("B", baseline))}
        redis_port = free_port()
        redis_proc = start_redis(redis_port, run_dir, cpu="0")
        common["GATEWAY_REDIS_URL"] = env_a["GATEWAY_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    trees = {"A": (ROOT, env_a), "B": (baseline, common)}
    rows: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    mock = start_mock_upstream(18080, run_dir / "mock.log", cpu="0", timeout=20)
    try:
        for i in range(args.rounds):
            for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                tree, env = trees[name]
                if redis_proc is not None:
                    empty_redis(redis_port)
                r = measure_gateway(tree, configs[name], env, args, bodies, run_dir, f"{name}{i + 1}")
                if r.get("error"):
                    sys.exit(f"ab.py: gateway {name} ({tree}), round {i + 1}: {r['error']}")
                rows[name].append(r)
                log(f"round {i + 1} {name}: a {r['a_rps']:,.0f} req/s, {r['a_cpu']} CPU ms/req; "
                    f"a1 p50 {r['a1_p50']:.3f} ms")
    finally:
        stop_process(mock, "mock")
        if redis_proc is not None:
            stop_process(redis_proc, "redis-server")
    keys = ("a_rps", "a_cpu", "a1_p50", "a1_cpu")
    med = {name: {k: median(rows[name], k) for k in keys} for name in rows}
    share: dict[str, float | None] = {}
    for k in keys:
        a, b = med["A"][k], med["B"][k]
        share[k] = round(a / b, 4) if a and b else None
    lines = ["| median of rounds | a req/s | a CPU ms/req | a1 p50 ms | a1 CPU ms/req |", "|---|---|---|---|---|"]
    state = ", budgets on Redis" if args.budgets else ""
    for name, label in (("A", f"A: this tree {' '.join(args.env)}".rstrip() + state), ("B", f"B: {baseline}{state}")):
        m = med[name]
        lines.append(f"| {label} | {m['a_rps']:,.0f} | {m['a_cpu']:.4f} | {m['a1_p50']:.3f} | {m['a1_cpu']:.4f} |")
    lines.append("| A ÷ B | " + " | ".join(f"{share[k]:.3f}" if share[k] else "-" for k in keys) + " |")
    print("\n".join(lines))
    (run_dir / "ab.json").write_text(json.dumps({"started": started.isoformat(timespec="seconds"),
                                                 "baseline": str(baseline), "env_a": args.env,
                                                 "budgets": args.budgets,
                                                 "rounds": rows, "median": med, "a_over_b": share}, indent=1))
    log(f"results in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
