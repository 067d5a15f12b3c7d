#!/usr/bin/env python3
"""Memory benchmark: resident memory of one gateway worker after 50k and 100k requests.

SPEC section 9: "resident memory per worker after 100k requests <= 250 MB and flat
(under 5% growth from 50k to 100k)". For each configuration this script

    1. starts the gateway pinned to cpu 1 (``python -m gateway serve --config <policies>
       --port <free port>``, one worker, from the repository root), the mock upstream
       pinned to cpu 0 (once, shared by the configurations) on a free loopback port;
       the bench policy is copied to a temporary directory with its ``api_base``
       pointed at that port;
    2. warms it up (``--warmup-requests``) and samples VmRSS and VmHWM from
       ``/proc/<pid>/status`` ("start");
    3. drives load in short wrk runs (bench/post.lua, ``mock-lat0``, 32 connections),
       each followed by a few streaming requests (bench/stream_client.py,
       ``mock-lat0-chunks20-delay5``, about ``--stream-share`` of the requests), until
       the gateway has served at least ``--checkpoint`` requests, samples again, goes
       on to ``--requests``, samples a last time.

Requests served are counted from wrk's and stream_client's own summaries (warm-up
included) and cross-checked against the sum of ``gateway_requests_total`` on the
gateway's ``/metrics``. Configurations:

    embedded          the default: no Redis, in-process keys, budgets and ledger; no budgets
    embedded-budgets  the same with a budget and RPM/TPM limits on the default team
                      (every request reserves and settles in the in-memory store)
    redis             GATEWAY_REDIS_URL at a private redis-server on a free loopback port,
                      a virtual key with its own budget and limits in team "bench", which
                      has budgets and RPM/TPM limits (as ``bench/run.py --budgets``)

Every loop is bounded in count and in time (``--max-seconds`` per configuration);
only processes this script started are stopped, by PID; temporary directories are
removed. Output: a Markdown table on stdout; under ``--out`` (default
/tmp/gateway-bench/memory) a directory per run with ``results.json`` (every sample),
``table.md``, the gateway logs and the raw load-generator output, and ``latest.json``.

    python bench/memory.py                                  # embedded and redis, 100k requests each
    python bench/memory.py --configs embedded,embedded-budgets,redis
    python bench/memory.py --requests 20000 --checkpoint 10000 --configs embedded
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402  (bench/harness.py: processes, ports and readiness, shared with tests/)
    BENCH,
    ROOT,
    descendants,
    free_port,
    http_get,
    start,
    start_mock_upstream,
    start_redis,
    stop_process,
    wait_ready,
)
from run import bench_key, body_files, log, run_wrk, smoke  # noqa: E402  (bench/run.py: the same load helpers)

CONFIGS = ("embedded", "embedded-budgets", "redis")
TEAMS_BENCH = ("teams:\n  bench:\n    budgets: [{period: monthly, usd: 1000000}, {period: daily, usd: 100000}]\n"
               "    rpm: 100000000\n    tpm: 100000000000\n")
TEAMS_DEFAULT = TEAMS_BENCH.replace("  bench:", "  default:")
TARGET_MB = 250.0
TARGET_GROWTH_PCT = 5.0
PLAIN_MODEL = "mock-lat0"
STREAM_MODEL = "mock-lat0-chunks20-delay5"


def memory_of(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of pid in MiB (empty when the process is gone)."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    out[name] = round(int(rest.split()[0]) / 1024, 2)  # kB
    except OSError:
        pass
    return out


def served_by_metrics(base: str) -> int | None:
    """The sum of gateway_requests_total on the gateway's /metrics, None if unreadable."""
    try:
        status, body = http_get(base + "/metrics", 5.0)
    except (OSError, urllib.error.URLError):
        return None
    if status != 200:
        return None
    total = 0.0
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("gateway_requests_total{") or line.startswith("gateway_requests_total "):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def run_streams(url: str, body: Path, n: int, conns: int, headers: list[str], cpu: str,
                raw_log: Path) -> dict[str, Any]:
    """At most n streams (and at most 60 s) through stream_client.py."""
    cmd = ["taskset", "-c", cpu, sys.executable, str(BENCH / "stream_client.py"), "--url", url, "--body", str(body),
           "-c", str(max(1, min(conns, n))), "-n", str(n), "-d", "60", "--timeout", "30"]
    for h in headers:
        cmd += ["-H", h]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired:
        return {"error": "stream_client did not finish in time", "requests": 0}
    with raw_log.open("a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n{done.stdout}{done.stderr}\n")
    try:
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result
    except (IndexError, json.JSONDecodeError):
        return {"error": f"stream_client exited {done.returncode}: {done.stderr.strip()[-300:]}", "requests": 0}


class Driver:
    """Load for one gateway: counts what it sent and keeps every RSS sample."""

    def __init__(self, base: str, pid: int, headers: list[str], bodies: dict[str, Path], args: argparse.Namespace,
                 raw_log: Path) -> None:
        self.base, self.pid, self.headers, self.bodies, self.args, self.raw_log = \
            base, pid, headers, bodies, args, raw_log
        self.sent = self.plain = self.streams = self.errors = 0
        self.rate = 2000.0            # req/s guess until the first phase measures it
        self.samples: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.deadline = time.monotonic() + args.max_seconds
        self.redis_pid: int | None = None   # sampled too: what the shared state costs Redis

    def sample(self, label: str) -> dict[str, Any]:
        s = {"label": label, "sent": self.sent, "plain": self.plain, "streams": self.streams,
             "t": round(time.monotonic(), 2), **memory_of(self.pid)}
        if self.redis_pid is not None:
            s["redis_VmRSS"] = memory_of(self.redis_pid).get("VmRSS")
        if label:
            s["served_metrics"] = served_by_metrics(self.base)
        self.samples.append(s)
        return s

    def phase(self, want: int) -> None:
        """One wrk run sized to about ``want`` requests (1 s to --phase-seconds), then its share of streams."""
        url = self.base + "/v1/chat/completions"
        seconds = max(1.0, min(self.args.phase_seconds, want / self.rate))
        r = run_wrk(url, self.bodies[PLAIN_MODEL], self.args.conns, seconds, self.headers, self.args.load_cpu,
                    self.raw_log)
        n = int(r.get("requests", 0))
        if r.get("error") or r.get("errors"):
            self.problems.append(f"wrk: {r.get('error') or r.get('errors')} errors")
            self.errors += int(r.get("errors", 0)) or 1
        if n and r.get("duration_s"):
            self.rate = n / float(r["duration_s"])
        self.sent += n
        self.plain += n
        streams = min(2000, round(n * self.args.stream_share))
        if streams:
            s = run_streams(url, self.bodies[STREAM_MODEL], streams, self.args.stream_conns, self.headers,
                            self.args.load_cpu, self.raw_log)
            m = int(s.get("requests", 0)) + int(s.get("warmup_requests", 0))
            if s.get("error") or s.get("errors"):
                self.problems.append(f"streams: {s.get('error') or s.get('errors')} errors")
                self.errors += int(s.get("errors", 0)) or 1
            self.sent += m
            self.streams += m
        if not n:
            raise RuntimeError(f"wrk served nothing: {r.get('error') or r}")
        self.sample("")

    def drive_to(self, target: int, max_phases: int = 500) -> bool:
        """Phases until ``sent >= target``; False when the time or phase bound stopped it first."""
        for _ in range(max_phases):
            if self.sent >= target:
                return True
            if time.monotonic() > self.deadline:
                return False
            self.phase(target - self.sent)
        return self.sent >= target


def prepare_policies(directory: Path, mock_port: int, config: str) -> Path:
    policies = directory / "policies"
    policies.mkdir()
    text = (BENCH / "policies" / "models.yaml").read_text().replace("127.0.0.1:18080", f"127.0.0.1:{mock_port}")
    (policies / "models.yaml").write_text(text)
    if config == "redis":
        (policies / "teams.yaml").write_text(TEAMS_BENCH)
    elif config == "embedded-budgets":
        (policies / "teams.yaml").write_text(TEAMS_DEFAULT)
    return policies


def measure_config(config: str, mock_port: int, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"gw-memory-{config}-"))
    redis_proc: subprocess.Popen[bytes] | None = None
    gateway: subprocess.Popen[bytes] | None = None
    result: dict[str, Any] = {"config": config}
    try:
        policies = prepare_policies(tmp, mock_port, config)
        bodies = body_files(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        headers = ["Authorization: Bearer sk-bench"]
        if config == "redis":
            redis_port = free_port()
            redis_proc = start_redis(redis_port, tmp, cpu=args.load_cpu)
            env["GATEWAY_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            log(f"{config}: redis-server pid {redis_proc.pid} on 127.0.0.1:{redis_port}")
            headers = [f"Authorization: Bearer {bench_key(redis_port)}"]
        port = free_port()
        cmd = ["taskset", "-c", args.gateway_cpu, sys.executable, "-m", "gateway", "serve", "--config", str(policies),
               "--port", str(port), "--workers", "1"]
        result["gateway_cmd"] = shlex.join(cmd)
        base = f"http://127.0.0.1:{port}"
        gw_log = run_dir / f"gateway-{config}.log"
        gateway = start(cmd, gw_log, env=env, cwd=ROOT)
        log(f"{config}: gateway pid {gateway.pid} on {base}")
        err = wait_ready(base + "/health/ready", gateway, 90) or smoke(base + "/v1", headers)
        if err:
            result["error"] = err
            result["log_tail"] = gw_log.read_text(errors="replace")[-3000:]
            log(f"{config}: gateway failed: {err}\n{result['log_tail']}")
            return result
        driver = Driver(base, gateway.pid, headers, bodies, args, run_dir / f"raw-{config}.log")
        driver.sent = 2   # the smoke test's two requests
        driver.redis_pid = redis_proc.pid if redis_proc is not None else None
        driver.drive_to(args.warmup_requests)
        points = {"start": driver.sample("start")}
        log(f"{config}: start after {driver.sent} requests: {points['start']}")
        for label, target in (("checkpoint", args.checkpoint), ("end", args.requests)):
            if not driver.drive_to(target):
                result["error"] = f"stopped by --max-seconds {args.max_seconds:g} at {driver.sent} requests"
                break
            points[label] = driver.sample(label)
            log(f"{config}: {label} after {driver.sent} requests: {points[label]}")
        result.update(points=points, samples=driver.samples, problems=driver.problems[:20], errors=driver.errors,
                      requests=driver.sent, plain=driver.plain, streams=driver.streams,
                      gateway_descendants=descendants(gateway.pid))
        if "end" in points and "checkpoint" in points:
            mid, end = points["checkpoint"].get("VmRSS"), points["end"].get("VmRSS")
            if mid and end:
                result["growth_pct"] = round((end - mid) * 100 / mid, 2)
                result["meets_target"] = end <= TARGET_MB and result["growth_pct"] < TARGET_GROWTH_PCT
        return result
    finally:
        if gateway is not None:
            stop_process(gateway, f"gateway ({config})")
            result["gateway_exit_status"] = gateway.returncode
        if redis_proc is not None:
            stop_process(redis_proc, "redis-server")
        shutil.rmtree(tmp, ignore_errors=True)


def report(res: dict[str, Any]) -> str:
    meta = res["meta"]
    lines = [f"## Gateway memory, {meta['started']}", "",
             f"One worker on cpu {meta['gateway_cpu']}; wrk ({meta['conns']} connections, `{PLAIN_MODEL}`) in "
             f"phases of up to {meta['phase_seconds']:g} s, plus about {meta['stream_share'] * 100:g}% streams "
             f"(`{STREAM_MODEL}`). RSS in MiB from /proc/<pid>/status; target <= {TARGET_MB:g} MiB at "
             f"{meta['requests']:,} requests and < {TARGET_GROWTH_PCT:g}% growth from {meta['checkpoint']:,}.",
             "",
             "| config | requests (start / mid / end) | RSS start | RSS mid | RSS end | HWM end | "
             "growth mid→end | streams | errors | target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["configs"]:
        p = r.get("points", {})
        s, m, e = p.get("start", {}), p.get("checkpoint", {}), p.get("end", {})

        def v(d: dict[str, Any], k: str) -> str:
            return f"{d[k]:.1f}" if isinstance(d.get(k), (int, float)) else "-"

        reqs = " / ".join(f"{d['sent']:,}" if d else "-" for d in (s, m, e))
        growth = f"{r['growth_pct']:+.2f}%" if "growth_pct" in r else "-"
        verdict = "-" if "meets_target" not in r else ("pass" if r["meets_target"] else "FAIL")
        lines.append(f"| {r['config']} | {reqs} | {v(s, 'VmRSS')} | {v(m, 'VmRSS')} | {v(e, 'VmRSS')} | "
                     f"{v(e, 'VmHWM')} | {growth} | {r.get('streams', '-')} | {r.get('errors', '-')} | {verdict} |")
    notes = [f"- {r['config']}: {r['error']}" for r in res["configs"] if r.get("error")]
    for r in res["configs"]:
        e = r.get("points", {}).get("end", {})
        if e.get("redis_VmRSS") is not None:
            s = r["points"]["start"]
            notes.append(f"- {r['config']}: redis-server RSS {s.get('redis_VmRSS')} MiB at the start, "
                         f"{e['redis_VmRSS']} MiB at the end (not the gateway's; shown for the state it keeps)")
        if e.get("served_metrics") is not None:
            notes.append(f"- {r['config']}: gateway_requests_total at the end {e['served_metrics']:,} "
                         f"(load generators counted {e['sent']:,})")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="embedded,redis", help=f"comma list of {','.join(CONFIGS)}")
    p.add_argument("--requests", type=int, default=100_000, help="requests at the last sample (default 100000)")
    p.add_argument("--checkpoint", type=int, default=None, help="requests at the middle sample (default half)")
    p.add_argument("--warmup-requests", type=int, default=2_000, help="requests before the start sample")
    p.add_argument("--phase-seconds", type=float, default=5.0, help="longest wrk run (default 5)")
    p.add_argument("--conns", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--stream-share", type=float, default=0.02,
                   help="streams per plain request after each wrk run (default 0.02; 0: none)")
    p.add_argument("--stream-conns", type=int, default=32)
    p.add_argument("--max-seconds", type=float, default=900.0, help="time bound per configuration (default 900)")
    p.add_argument("--gateway-cpu", default="1")
    p.add_argument("--load-cpu", default="0", help="cpu of the mock, redis-server and the load generators")
    p.add_argument("--out", default="/tmp/gateway-bench/memory")
    p.add_argument("--label", default="")
    args = p.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not configs or any(c not in CONFIGS for c in configs):
        p.error(f"--configs: choose from {', '.join(CONFIGS)}")
    args.checkpoint = args.checkpoint or args.requests // 2
    if not 0 < args.warmup_requests < args.checkpoint < args.requests <= 10_000_000:
        p.error("need 0 < --warmup-requests < --checkpoint < --requests <= 10,000,000")
    if not (0 <= args.stream_share <= 0.5 and 1 <= args.phase_seconds <= 60 and 0 < args.max_seconds <= 7200):
        p.error("--stream-share in [0, 0.5], --phase-seconds in [1, 60], --max-seconds in (0, 7200]")
    for tool in ("wrk", "taskset") + (("redis-server",) if "redis" in configs else ()):
        if shutil.which(tool) is None:
            sys.exit(f"memory.py: {tool} not found on PATH")
    started = dt.datetime.now()
    run_dir = Path(args.out) / (started.strftime("%Y%m%d-%H%M%S") + (f"-{args.label}" if args.label else ""))
    run_dir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"meta": {
        "started": started.isoformat(timespec="seconds"), "requests": args.requests, "checkpoint": args.checkpoint,
        "warmup_requests": args.warmup_requests, "phase_seconds": args.phase_seconds, "conns": args.conns,
        "stream_share": args.stream_share, "gateway_cpu": args.gateway_cpu, "load_cpu": args.load_cpu,
        "cores": os.cpu_count(), "python": sys.version.split()[0], "configs": configs}, "configs": []}

    mock_port = free_port()
    try:
        mock = start_mock_upstream(mock_port, run_dir / "mock.log", cpu=args.load_cpu, timeout=20)
    except RuntimeError as exc:
        sys.exit(f"memory.py: {exc}")
    try:
        log(f"mock pid {mock.pid} on 127.0.0.1:{mock_port}")
        for config in configs:
            try:
                res["configs"].append(measure_config(config, mock_port, args, run_dir))
            except (RuntimeError, OSError) as exc:
                res["configs"].append({"config": config, "error": repr(exc)})
                log(f"{config}: {exc!r}")
    finally:
        stop_process(mock, "mock")
        if mock.returncode not in (0, -signal.SIGTERM, None):
            res["meta"]["mock_exit_status"] = mock.returncode

    table = report(res)
    res["table_md"] = table
    (run_dir / "results.json").write_text(json.dumps(res, indent=2))
    (run_dir / "table.md").write_text(table)
    Path(args.out, "latest.json").write_text(json.dumps(res, indent=2))
    print(table)
    log(f"saved {run_dir}/results.json, table.md, gateway-*.log, raw-*.log")
    return 0 if all(r.get("meets_target") for r in res["configs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
