#!/usr/bin/env python3
"""CPU milliseconds per request of one gateway process, per embedded-state configuration, in
interleaved rounds (so that every configuration sees the same machine load).

    memory            GATEWAY_DATA_DIR=:memory:, no budgets
    memory-budgets    the same, with the default team's budgets and RPM/TPM limits
    sqlite            the embedded SQLite state (a fresh data directory), no budgets
    sqlite-budgets    the same, with the default team's budgets and RPM/TPM limits

Every gateway runs at once, pinned to cpu 1 and idle but for its turn; the mock upstream and wrk
share cpu 0. Each round gives each configuration a 2 s warm-up, then ``--seconds`` of wrk at
``--connections``; its CPU is ``utime+stime`` (with reaped children) from ``/proc/<pid>/stat``
around the measured run, divided by the requests wrk completed. The budgets are those of
``run.py --budgets`` (monthly $1M, daily $100k, RPM 1e8, TPM 1e11) on team ``default``. Free
loopback ports; nothing is left running.

    python bench/state_cpu.py                                   # sqlite,sqlite-budgets, 3 rounds of 8 s
    python bench/state_cpu.py --configs memory,memory-budgets,sqlite,sqlite-budgets --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import BENCH, ROOT, free_port, start, start_mock_upstream, stop_process, wait_ready  # noqa: E402
from run import body_files, run_wrk, smoke  # noqa: E402

CONFIGS = ("memory", "memory-budgets", "sqlite", "sqlite-budgets")
TEAMS = ("teams:\n  default:\n    budgets: [{period: monthly, usd: 1000000}, {period: daily, usd: 100000}]\n"
         "    rpm: 100000000\n    tpm: 100000000000\n")
AUTH = ["Authorization: Bearer sk-bench"]


def cpu_s(pid: int) -> float:
    """utime + stime + cutime + cstime of ``pid``, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="sqlite,sqlite-budgets", help=f"comma list of {','.join(CONFIGS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--connections", type=int, default=32)
    args = p.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    if not configs or any(c not in CONFIGS for c in configs) or not 1 <= args.rounds <= 20 \
            or not 1 <= args.seconds <= 120:
        p.error(f"--configs from {CONFIGS}, --rounds 1..20, --seconds 1..120")
    tmp = Path(tempfile.mkdtemp(prefix="state-cpu-"))
    mock_port = free_port()
    mock = start_mock_upstream(mock_port, tmp / "mock.log", cpu="0", timeout=20)
    bodies = body_files(tmp)
    gateways: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        for config in configs:
            policies = tmp / f"policies-{config}"
            policies.mkdir()
            (policies / "models.yaml").write_text((BENCH / "policies" / "models.yaml").read_text()
                                                  .replace("127.0.0.1:18080", f"127.0.0.1:{mock_port}"))
            if config.endswith("-budgets"):
                (policies / "teams.yaml").write_text(TEAMS)
            env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
            env["GATEWAY_DATA_DIR"] = ":memory:" if config.startswith("memory") else str(tmp / f"data-{config}")
            env["GATEWAY_LOG_LEVEL"] = "warning"
            port = free_port()
            proc = start(["taskset", "-c", "1", sys.executable, "-m", "gateway", "serve", "--config", str(policies),
                          "--port", str(port)], tmp / f"gateway-{config}.log", env=env, cwd=ROOT)
            gateways[config] = (proc, f"http://127.0.0.1:{port}")
            err = wait_ready(f"http://127.0.0.1:{port}/health/ready", proc, 60) or smoke(f"http://127.0.0.1:{port}/v1",
                                                                                         AUTH)
            if err:
                print(f"{config}: {err}\n{(tmp / f'gateway-{config}.log').read_text()[-2000:]}", file=sys.stderr)
                return 1
        results: dict[str, list[float]] = {c: [] for c in configs}
        for r in range(args.rounds):
            for config in configs:
                proc, base = gateways[config]
                url = f"{base}/v1/chat/completions"
                run_wrk(url, bodies["mock-lat0"], args.connections, 2, AUTH, "0", tmp / "wrk.log")
                before = cpu_s(proc.pid)
                w = run_wrk(url, bodies["mock-lat0"], args.connections, args.seconds, AUTH, "0", tmp / "wrk.log")
                used = cpu_s(proc.pid) - before
                n = int(w.get("requests", 0))
                if not n or w.get("error"):
                    print(f"{config}: wrk failed: {w}", file=sys.stderr)
                    return 1
                results[config].append(used * 1000 / n)
                print(f"round {r + 1} {config}: {results[config][-1]:.4f} CPU ms/req over {n:,} requests "
                      f"({n / args.seconds:,.0f} req/s), load average {os.getloadavg()[0]:.1f}", flush=True)
        print("\n| configuration | CPU ms per request (median) | rounds |\n|---|---|---|")
        for config in configs:
            print(f"| {config} | {statistics.median(results[config]):.3f} | "
                  f"{', '.join(f'{x:.3f}' for x in results[config])} |")
    finally:
        for proc, _ in gateways.values():
            stop_process(proc, "gateway")
        stop_process(mock, "mock")
    return 0


if __name__ == "__main__":
    sys.exit(main())
