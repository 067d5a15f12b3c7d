#!/usr/bin/env python3
"""Benchmark runner: the gateway against a direct call to the same mock upstream.

Loopback only, every phase bounded in time. Sequence:

    1. start bench/mock_upstream.py pinned to cpu 0 (port 18080)
    2. measure "direct": load generator -> mock
    3. start the gateway pinned to cpu 1 (default:
       taskset -c 1 python -m gateway serve --config bench/policies --port 4100),
       wait for GET /health/ready, smoke-test it, measure "gateway", stop it
    4. measure "direct" again (drift check); the reference is the mean of both
    5. print a Markdown table, save everything under --out/<stamp>/

Scenarios (load generators pinned to cpu 0, next to the mock):
    a   non-streaming, mock-lat0, 32 connections, wrk: req/s, p50, p99 and CPU
        ms per request of the measured server (gateway process + descendants;
        the mock itself for direct)
    a1  the same with one connection: per-request added latency (p50 - direct)
    c   streaming, mock-lat0-chunks20-delay5 (20 chunks 5 ms apart), 32
        concurrent streams, stream_client.py: TTFT p50/p99 and total p50,
        also as added over direct
    c1  the same with one stream
    b   (optional, not in the default set) non-streaming, mock-lat50, 256
        connections
    m, m1, ms1 / mt, mt1, mts1   (optional; --scenarios api for all twelve)
        Messages native (anthropic deployment) / translated (chat-only
        deployment): 32 connections and 1 connection like a and a1, 1 stream
        like c1; direct is the mock's own /v1/messages
    r, r1, rs1 / rt, rt1, rts1   the same for Responses (native: an openai
        deployment); direct is the mock's own /v1/responses

    python bench/run.py                         # direct, gateway, direct
    python bench/run.py --skip-gateway          # the mock only
    python bench/run.py --duration 5 --scenarios a,c
    python bench/run.py --budgets               # gateway on a private redis-server, with a team budget
                                                # and RPM/TPM limits on every request
    python bench/run.py --embedded-budgets      # the same budgets on the embedded SQLite state, no Redis
    python bench/run.py --header 'Authorization: Bearer sk-bench' \\
        --gateway-cmd 'taskset -c 1 python -m gateway serve --config bench/policies --port 4100'
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from harness import (  # bench/harness.py: processes, ports and readiness, shared with tests/
    BENCH,
    ROOT,
    descendants,
    free_port,
    http_get,
    port_in_use,
    start,
    start_mock_upstream,
    start_redis,
    stop_process,
    wait_ready,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")

SYSTEM_PROMPT = ("You are a careful assistant for a platform team. Keep replies brief and mention the settings "
                 "that matter.")
USER_PROMPT = ("Our service sits in front of several language model providers. In a few sentences, describe how "
               "it should react when a provider answers 429 with a Retry-After header, and how per-key spending "
               "limits interact with retries and with streamed answers.")

SCENARIOS: dict[str, dict[str, Any]] = {
    "a": {"kind": "wrk", "model": "mock-lat0", "conns": 32, "title": "non-streaming, upstream 0 ms, 32 connections"},
    "a1": {"kind": "wrk", "model": "mock-lat0", "conns": 1, "title": "non-streaming, upstream 0 ms, 1 connection"},
    "b": {"kind": "wrk", "model": "mock-lat50", "conns": 256,
          "title": "non-streaming, upstream 50 ms, 256 connections"},
    "c": {"kind": "stream", "model": "mock-lat0-chunks20-delay5", "conns": 32,
          "title": "streaming 20 chunks x 5 ms, 32 streams"},
    "c1": {"kind": "stream", "model": "mock-lat0-chunks20-delay5", "conns": 1,
           "title": "streaming 20 chunks x 5 ms, 1 stream"},
}
DEFAULT_SCENARIOS = "a,a1,c,c1"

# The Messages and Responses paths (SPEC §9): native (an anthropic deployment for Messages, an openai
# one for Responses) and translated (the chat-only mock models: the gateway turns the request into chat
# completions and the answer back). The direct reference is the mock's own /v1/messages or /v1/responses
# with the same knobs. Per path: 32 connections (like a), 1 connection (like a1), 1 stream (like c1).
API_PATHS = {"chat": "/chat/completions", "messages": "/messages", "responses": "/responses"}
API_GROUPS = {  # prefix: (api, non-streaming model, streaming model, the mock endpoint it reaches, title)
    "m": ("messages", "claude-mock-lat0", "claude-mock-lat0-chunks20-delay5", "messages", "Messages native"),
    "mt": ("messages", "mock-lat0", "mock-lat0-chunks20-delay5", "chat.completions", "Messages translated"),
    "r": ("responses", "mock-resp-lat0", "mock-resp-lat0-chunks20-delay5", "responses", "Responses native"),
    "rt": ("responses", "mock-lat0", "mock-lat0-chunks20-delay5", "chat.completions", "Responses translated"),
}
for _prefix, (_api, _plain, _streamed, _upstream, _title) in API_GROUPS.items():
    SCENARIOS[_prefix] = {"kind": "wrk", "api": _api, "model": _plain, "conns": 32, "upstream": _upstream,
                          "title": f"{_title}, non-streaming, upstream 0 ms, 32 connections"}
    SCENARIOS[_prefix + "1"] = {"kind": "wrk", "api": _api, "model": _plain, "conns": 1, "upstream": _upstream,
                                "title": f"{_title}, non-streaming, upstream 0 ms, 1 connection"}
    SCENARIOS[_prefix + "s1"] = {"kind": "stream", "api": _api, "model": _streamed, "conns": 1,
                                 "upstream": _upstream, "title": f"{_title}, streaming 20 chunks x 5 ms, 1 stream"}
API_SCENARIOS = ",".join(f"{p},{p}1,{p}s1" for p in API_GROUPS)   # --scenarios api


def log(*parts: object) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}]", *parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# processes


def loopback_only(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if not (host.startswith("127.") or host in ("localhost", "::1")):
        sys.exit(f"run.py: refusing non-loopback URL {url}")


def cpu_seconds(pid: int) -> float:
    """utime+stime of pid and its live descendants, plus children it has reaped (cutime+cstime)."""
    total = 0
    for i, p in enumerate([pid, *descendants(pid)]):
        try:
            with open(f"/proc/{p}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        f = stat[stat.rfind(b")") + 2:].split()  # f[0] is field 3 (state)
        total += int(f[11]) + int(f[12])  # utime, stime
        if i == 0:
            total += int(f[13]) + int(f[14])  # cutime, cstime
    return total / CLK_TCK


# ---------------------------------------------------------------------------
# load generators


def body_files(run_dir: Path) -> dict[str, Path]:
    files = {}
    for model in {s["model"] for s in SCENARIOS.values() if s.get("api", "chat") == "chat"}:
        body: dict[str, Any] = {"model": model, "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                                             {"role": "user", "content": USER_PROMPT}],
                                "temperature": 0.2, "max_tokens": 256, "user": "bench-user"}
        if "chunks" in model:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        path = run_dir / f"body-{model}.json"
        path.write_text(json.dumps(body))
        files[model] = path
    for key, body in api_bodies().items():
        path = run_dir / f"body-{key.replace(':', '-')}.json"
        path.write_text(json.dumps(body))
        files[key] = path
    return files


def api_bodies() -> dict[str, dict[str, Any]]:
    """The Messages and Responses request bodies, keyed "api:model": the same prompt, output cap and
    end user as the chat body (system / instructions, max_tokens / max_output_tokens, metadata / user)."""
    out: dict[str, dict[str, Any]] = {}
    for sc in SCENARIOS.values():
        api, model = sc.get("api", "chat"), sc["model"]
        if api == "messages":
            body: dict[str, Any] = {"model": model, "system": SYSTEM_PROMPT,
                                    "messages": [{"role": "user", "content": USER_PROMPT}],
                                    "temperature": 0.2, "max_tokens": 256, "metadata": {"user_id": "bench-user"}}
        elif api == "responses":
            body = {"model": model, "instructions": SYSTEM_PROMPT,
                    "input": [{"role": "user", "content": USER_PROMPT}],
                    "temperature": 0.2, "max_output_tokens": 256, "user": "bench-user"}
        else:
            continue
        if sc["kind"] == "stream":
            body["stream"] = True
        out[f"{api}:{model}"] = body
    return out


def scenario_request(sc: dict[str, Any], base: str, headers: list[str],
                     bodies: dict[str, Path]) -> tuple[str, Path, list[str]]:
    """URL, body file and headers of one scenario (Messages requests carry anthropic-version)."""
    api = sc.get("api", "chat")
    if api == "chat":
        return base + API_PATHS[api], bodies[sc["model"]], headers
    extra = ["anthropic-version: 2023-06-01"] if api == "messages" else []
    return base + API_PATHS[api], bodies[f"{api}:{sc['model']}"], headers + extra


def run_wrk(url: str, body: Path, conns: int, seconds: float, headers: list[str], cpu: str,
            raw_log: Path) -> dict[str, Any]:
    env = dict(os.environ, WRK_BODY_FILE=str(body), WRK_HEADERS="\n".join(headers))
    cmd = ["taskset", "-c", cpu, "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", str(BENCH / "post.lua"), url]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        return {"error": f"wrk did not finish within {seconds + 60:.0f}s"}
    with raw_log.open("a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n{done.stdout}{done.stderr}\n")
    for line in done.stdout.splitlines():
        if line.startswith("WRK_RESULT "):
            r = json.loads(line[len("WRK_RESULT "):])
            r["errors"] = r["err_connect"] + r["err_read"] + r["err_write"] + r["err_status"] + r["err_timeout"]
            return r
    return {"error": f"wrk exited {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}"}


def run_stream(url: str, body: Path, conns: int, seconds: float, warmup: float, headers: list[str], cpu: str,
               raw_log: Path) -> dict[str, Any]:
    cmd = ["taskset", "-c", cpu, sys.executable, str(BENCH / "stream_client.py"), "--url", url, "--body", str(body),
           "-c", str(conns), "-n", "1000000", "-d", str(seconds), "--warmup", str(warmup), "--timeout", "30"]
    for h in headers:
        cmd += ["-H", h]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup + 120)
    except subprocess.TimeoutExpired:
        return {"error": "stream_client did not finish in time"}
    with raw_log.open("a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n{done.stdout}{done.stderr}\n")
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"stream_client exited {done.returncode}: {done.stderr.strip()[-300:]}"}


def measure(name: str, base: str, pid: int, headers: list[str], args: argparse.Namespace,
            bodies: dict[str, Path], run_dir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    raw_log = run_dir / f"raw-{name}.log"
    for key in args.scenarios:
        sc = SCENARIOS[key]
        log(f"{name}: scenario {key} ({sc['title']}), {args.duration:g}s after {args.warmup:g}s warm-up")
        url, body, headers_sc = scenario_request(sc, base, headers, bodies)
        if sc["kind"] == "wrk":
            if args.warmup > 0:
                run_wrk(url, body, sc["conns"], args.warmup, headers_sc, args.load_cpu, raw_log)
            c0 = cpu_seconds(pid)
            r = run_wrk(url, body, sc["conns"], args.duration, headers_sc, args.load_cpu, raw_log)
            cpu = cpu_seconds(pid) - c0
            n = r.get("requests", 0)
        else:
            # stream_client warms up itself; CPU is sampled around the whole run and
            # divided by all streams served (measured + warm-up)
            c0 = cpu_seconds(pid)
            r = run_stream(url, body, sc["conns"], args.duration, args.warmup, headers_sc, args.load_cpu, raw_log)
            cpu = cpu_seconds(pid) - c0
            n = r.get("requests", 0) + r.get("warmup_requests", 0)
        r["server_cpu_s"] = round(cpu, 3)
        r["cpu_ms_per_req"] = round(cpu * 1000 / n, 4) if n else None
        if r.get("error"):
            log(f"  {key}: ERROR {r['error']}")
        elif r.get("errors"):
            log(f"  {key}: {r['errors']} errors {r.get('error_samples', '')}")
        results[key] = r
        log("  " + summary_line(key, r))
    return results


def summary_line(key: str, r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"{key}: error"
    if "rps" in r and "p50_ms" in r:
        return (f"{key}: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, "
                f"cpu {r['cpu_ms_per_req']} ms/req, errors {r['errors']}")
    return (f"{key}: {r.get('requests')} streams, ttft p50 {r.get('ttft_ms', {}).get('p50')} ms, "
            f"p99 {r.get('ttft_ms', {}).get('p99')} ms, total p50 {r.get('total_ms', {}).get('p50')} ms, "
            f"errors {r.get('errors')}")


# ---------------------------------------------------------------------------
# smoke test of a target before loading it


def smoke(base: str, headers: list[str]) -> str | None:
    """None when one plain and one streaming request work through base, else the error."""
    hdrs = {"Content-Type": "application/json"}
    for h in headers:
        k, v = h.split(":", 1)
        hdrs[k.strip()] = v.strip()
    msgs = [{"role": "user", "content": "smoke test"}]
    for body in ({"model": "mock-lat0", "messages": msgs},
                 {"model": "mock-lat0-chunks20-delay5", "messages": msgs, "stream": True,
                  "stream_options": {"include_usage": True}}):
        req = urllib.request.Request(base + "/chat/completions", data=json.dumps(body).encode(), headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                data = resp.read()
        except urllib.error.HTTPError as exc:
            return f"{body['model']} stream={body.get('stream', False)}: HTTP {exc.code}: {exc.read()[:500]!r}"
        except (OSError, urllib.error.URLError) as exc:
            return f"{body['model']} stream={body.get('stream', False)}: {exc}"
        if body.get("stream"):
            if b"data: [DONE]" not in data or b'"content"' not in data:
                return f"stream without content or [DONE]: {data[:500]!r}"
        else:
            try:
                doc = json.loads(data)
                assert doc["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError, AssertionError):
                return f"unexpected response: {data[:500]!r}"
    return None


def smoke_api(base: str, headers: list[str], keys: list[str], mock_origin: str) -> str | None:
    """None when every Messages / Responses scenario in keys answers through base and reaches the mock
    on the endpoint it is meant to measure (native: /messages or /responses; translated: /chat/completions),
    else the error."""
    hdrs = {"Content-Type": "application/json", "anthropic-version": "2023-06-01"}
    for h in headers:
        k, v = h.split(":", 1)
        hdrs[k.strip()] = v.strip()
    bodies = api_bodies()
    for key in keys:
        sc = SCENARIOS[key]
        api = sc.get("api", "chat")
        if api == "chat":
            continue
        body = bodies[f"{api}:{sc['model']}"]
        want = sc["upstream"]
        before = json.loads(http_get(mock_origin + "/_stats")[1])["endpoints"]
        req = urllib.request.Request(base + API_PATHS[api], data=json.dumps(body).encode(), headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                data = resp.read()
        except urllib.error.HTTPError as exc:
            return f"{key} ({sc['model']}): HTTP {exc.code}: {exc.read()[:500]!r}"
        except (OSError, urllib.error.URLError) as exc:
            return f"{key} ({sc['model']}): {exc}"
        after = json.loads(http_get(mock_origin + "/_stats")[1])["endpoints"]
        if after.get(want, 0) != before.get(want, 0) + 1:
            return f"{key} ({sc['model']}) did not reach the mock's {want} endpoint: {before} -> {after}"
        marks = {("messages", True): (b"content_block_delta", b"message_stop"),
                 ("messages", False): (b'"text"', b'"usage"'),
                 ("responses", True): (b"response.output_text.delta", b"response.completed"),
                 ("responses", False): (b'"output_text"', b'"usage"')}[api, bool(body.get("stream"))]
        if not all(m in data for m in marks):
            return f"{key} ({sc['model']}): unexpected answer {data[:500]!r}"
    return None


# ---------------------------------------------------------------------------
# report


def mean_direct(before: dict[str, Any], after: dict[str, Any] | None) -> dict[str, Any]:
    """Scenario-wise mean of the two direct runs for the numbers the report uses."""
    if not after:
        return before
    out: dict[str, Any] = {}
    for key, b in before.items():
        a = after.get(key, {})
        if b.get("error") or a.get("error"):
            out[key] = b if not b.get("error") else a
            continue
        m: dict[str, Any] = {}
        for f in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req"):
            if isinstance(b.get(f), (int, float)) and isinstance(a.get(f), (int, float)):
                m[f] = (b[f] + a[f]) / 2
        for f in ("ttfb_ms", "ttft_ms", "total_ms"):
            if b.get(f) and a.get(f):
                m[f] = {p: (b[f][p] + a[f][p]) / 2 for p in b[f] if p in a[f]}
        out[key] = m
    return out


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def row_values(r: dict[str, Any]) -> dict[str, Any]:
    """Flat numbers of one target (None when missing)."""
    def g(key: str, *path: str) -> Any:
        cur: Any = r.get(key)
        for p in path:
            if not isinstance(cur, dict) or cur.get("error"):
                return None
            cur = cur.get(p)
        return cur
    return {
        "a_rps": g("a", "rps"), "a_p50": g("a", "p50_ms"), "a_p99": g("a", "p99_ms"),
        "a_cpu": g("a", "cpu_ms_per_req"),
        "a1_p50": g("a1", "p50_ms"), "a1_p99": g("a1", "p99_ms"),
        "b_rps": g("b", "rps"), "b_p50": g("b", "p50_ms"), "b_p99": g("b", "p99_ms"),
        "c_ttft_p50": g("c", "ttft_ms", "p50"), "c_ttft_p99": g("c", "ttft_ms", "p99"),
        "c_total_p50": g("c", "total_ms", "p50"), "c_cpu": g("c", "cpu_ms_per_req"),
        "c1_ttft_p50": g("c1", "ttft_ms", "p50"), "c1_ttft_p99": g("c1", "ttft_ms", "p99"),
        "c1_total_p50": g("c1", "total_ms", "p50"),
    }


def diff(x: Any, y: Any) -> Any:
    return None if x is None or y is None else x - y


def ratio(x: Any, y: Any) -> Any:
    return None if x is None or not y else x / y


def report(res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    meta = res["meta"]
    direct = row_values(res["direct_mean"])
    rows = [("direct (before)", row_values(res["targets"]["direct_before"]))]
    gw = res["targets"].get("gateway")
    if gw is not None and not gw.get("error"):
        rows.append(("gateway", row_values(gw)))
    if "direct_after" in res["targets"]:
        rows.append(("direct (after)", row_values(res["targets"]["direct_after"])))
    cols = [("a_rps", "a req/s", 0), ("a_p50", "a p50 ms", 3), ("a_p99", "a p99 ms", 3),
            ("a_cpu", "a CPU ms/req", 4), ("a1_p50", "a1 p50 ms", 3),
            ("c_ttft_p50", "c TTFT p50 ms", 2), ("c_ttft_p99", "c TTFT p99 ms", 2),
            ("c_total_p50", "c total p50 ms", 1),
            ("c1_ttft_p50", "c1 TTFT p50 ms", 2), ("c1_ttft_p99", "c1 TTFT p99 ms", 2),
            ("c1_total_p50", "c1 total p50 ms", 1)]
    if "b" in meta["scenarios"]:
        cols[5:5] = [("b_rps", "b req/s", 0), ("b_p50", "b p50 ms", 2), ("b_p99", "b p99 ms", 2)]
    cols = [c for c in cols if c[0].split("_")[0] in meta["scenarios"]]
    lines = [f"## Gateway benchmark, {meta['started']}",
             "",
             f"{meta['duration_s']:g} s per scenario after {meta['warmup_s']:g} s warm-up; "
             f"mock on cpu {meta['mock_cpu']}, "
             f"load generators on cpu {meta['load_cpu']}, gateway on cpu 1 ({meta['cores']} cores). "
             "CPU ms/req is the measured server's own CPU (the mock for direct rows, the gateway's process "
             "and descendants for the gateway row).",
             "",
             "| target | " + " | ".join(c[1] for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, vals in rows:
        lines.append(f"| {name} | " + " | ".join(fmt(vals[k], d) for k, _, d in cols) + " |")
    derived: dict[str, Any] = {}
    if len(rows) > 1 and rows[1][0] == "gateway":
        g = rows[1][1]
        ratio_row = {k: ratio(g[k], direct[k]) for k, _, _ in cols}
        added_row = {k: diff(g[k], direct[k]) for k, _, _ in cols}
        lines.append("| gateway ÷ direct | " + " | ".join(
            "-" if ratio_row[k] is None else f"{ratio_row[k]:.3g}×" for k, _, _ in cols) + " |")
        lines.append("| gateway − direct | " + " | ".join(
            "-" if (added_row[k] is None or k.endswith("rps") or k.endswith("cpu")) else f"{added_row[k]:+.3f}"
            for k, _, _ in cols) + " |")
        derived = {
            "a_rps_ratio": ratio_row.get("a_rps"),
            "a_p50_added_ms": added_row.get("a_p50"), "a_p99_added_ms": added_row.get("a_p99"),
            "a_cpu_ms_per_req": g["a_cpu"],
            "a1_added_p50_ms": diff(g["a1_p50"], direct["a1_p50"]),
            "c_ttft_p50_added_ms": diff(g["c_ttft_p50"], direct["c_ttft_p50"]),
            "c_ttft_p99_added_ms": diff(g["c_ttft_p99"], direct["c_ttft_p99"]),
            "c_total_p50_added_ms": diff(g["c_total_p50"], direct["c_total_p50"]),
            "c1_ttft_p50_added_ms": diff(g["c1_ttft_p50"], direct["c1_ttft_p50"]),
            "c1_total_p50_added_ms": diff(g["c1_total_p50"], direct["c1_total_p50"]),
        }
        lines += ["",
                  "Headline (direct = mean of the before and after runs):",
                  "",
                  "| target | a req/s | a ÷ direct | a CPU ms/req | a1 added p50 ms | c TTFT p50 ms | "
                  "c TTFT added p50 / p99 ms | c total added p50 ms | c1 TTFT added p50 ms | c1 total added p50 ms |",
                  "|---|---|---|---|---|---|---|---|---|---|",
                  f"| direct to the mock | {fmt(direct['a_rps'])} | 1 | {fmt(direct['a_cpu'], 4)} | 0 | "
                  f"{fmt(direct['c_ttft_p50'])} | 0 / 0 | 0 | 0 | 0 |",
                  f"| gateway | {fmt(g['a_rps'])} | {fmt(derived['a_rps_ratio'], 3)} | {fmt(g['a_cpu'], 4)} | "
                  f"{fmt(derived['a1_added_p50_ms'], 3)} | {fmt(g['c_ttft_p50'])} | "
                  f"{fmt(derived['c_ttft_p50_added_ms'])} / {fmt(derived['c_ttft_p99_added_ms'])} | "
                  f"{fmt(derived['c_total_p50_added_ms'])} | {fmt(derived['c1_ttft_p50_added_ms'])} | "
                  f"{fmt(derived['c1_total_p50_added_ms'])} |"]
    if gw is not None and gw.get("error"):
        lines += ["", f"**gateway not measured**: {gw['error']}"]
    problems = []
    for tname, t in res["targets"].items():
        for key, r in t.items():
            if isinstance(r, dict) and (r.get("error") or r.get("errors")):
                what = r.get("error") or f"{r.get('errors')} errors {json.dumps(r.get('error_samples', {}))}"
                problems.append(f"{tname}/{key}: {what}")
    if problems:
        lines += ["", "Errors during the run:", ""] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n", derived


def api_report(res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The Messages / Responses table (one row per path measured) and its derived numbers."""
    chosen = res["meta"]["scenarios"]
    direct, gw = res["direct_mean"], res["targets"].get("gateway")
    if not any(p in chosen or p + "1" in chosen or p + "s1" in chosen for p in API_GROUPS):
        return "", {}
    gw = gw if gw is not None and not gw.get("error") else {}

    def val(r: dict[str, Any], key: str, *path: str) -> Any:
        cur: Any = r.get(key)
        for step in path:
            if not isinstance(cur, dict) or cur.get("error"):
                return None
            cur = cur.get(step)
        return cur

    lines = ["", "Messages and Responses paths (direct = the mock's own /v1/messages or /v1/responses, mean of "
             "the before and after runs; 32 = 32 connections, 1 = one connection, s1 = one stream of 20 chunks "
             "x 5 ms):", "",
             "| path | 32 req/s direct | 32 req/s gateway | ÷ direct | gateway CPU ms/req | 32 p50 added ms | "
             "1 p50 direct ms | 1 p50 added ms | s1 TTFT p50 direct ms | s1 TTFT p50 added ms | "
             "s1 total p50 added ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    derived: dict[str, Any] = {}
    for p, (_, _, _, _, title) in API_GROUPS.items():
        if not any(k in chosen for k in (p, p + "1", p + "s1")):
            continue
        one, st = p + "1", p + "s1"
        d = {"rps": val(direct, p, "rps"), "p50": val(direct, p, "p50_ms"), "p50_1": val(direct, one, "p50_ms"),
             "ttft": val(direct, st, "ttft_ms", "p50"), "total": val(direct, st, "total_ms", "p50")}
        g = {"rps": val(gw, p, "rps"), "p50": val(gw, p, "p50_ms"), "p50_1": val(gw, one, "p50_ms"),
             "ttft": val(gw, st, "ttft_ms", "p50"), "total": val(gw, st, "total_ms", "p50"),
             "cpu": val(gw, p, "cpu_ms_per_req")}
        row = {f"{p}_rps": g["rps"], f"{p}_rps_ratio": ratio(g["rps"], d["rps"]), f"{p}_cpu_ms_per_req": g["cpu"],
               f"{p}_p50_added_ms": diff(g["p50"], d["p50"]), f"{one}_added_p50_ms": diff(g["p50_1"], d["p50_1"]),
               f"{st}_ttft_p50_added_ms": diff(g["ttft"], d["ttft"]),
               f"{st}_total_p50_added_ms": diff(g["total"], d["total"])}
        derived.update(row)
        lines.append(f"| {title} ({p}, {one}, {st}) | {fmt(d['rps'])} | {fmt(g['rps'])} | "
                     f"{fmt(row[f'{p}_rps_ratio'], 3)} | {fmt(g['cpu'], 4)} | {fmt(row[f'{p}_p50_added_ms'], 3)} | "
                     f"{fmt(d['p50_1'], 3)} | {fmt(row[f'{one}_added_p50_ms'], 3)} | {fmt(d['ttft'], 2)} | "
                     f"{fmt(row[f'{st}_ttft_p50_added_ms'], 3)} | {fmt(row[f'{st}_total_p50_added_ms'], 3)} |")
    return "\n".join(lines) + "\n", derived


# ---------------------------------------------------------------------------


def team_budgets(team: str) -> str:
    """``team``'s monthly and daily budgets and RPM/TPM limits (high enough never to refuse), as teams.yaml."""
    return (f"teams:\n  {team}:\n    budgets: [{{period: monthly, usd: 1000000}}, {{period: daily, usd: 100000}}]\n"
            "    rpm: 100000000\n    tpm: 100000000000\n")


def budgets_policy(models_yaml: Path, config: Path, teams_yaml: str) -> str:
    """A policy directory ``config``: the bench models (from ``models_yaml``) and ``teams_yaml``."""
    config.mkdir()
    (config / "models.yaml").write_text(models_yaml.read_text())
    (config / "teams.yaml").write_text(teams_yaml)
    return str(config)


def bench_key(redis_port: int) -> str:
    """Create the virtual key of the --budgets run in the private Redis (waits for it to answer)."""
    import asyncio

    sys.path.insert(0, str(ROOT))
    from redis.asyncio import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    from gateway.state.keys import RedisKeyStore

    async def create() -> str:
        client = Redis(host="127.0.0.1", port=redis_port)
        for _ in range(100):
            try:
                await client.ping()
                break
            except RedisConnectionError:
                await asyncio.sleep(0.05)
        _, secret = await RedisKeyStore(client).create("bench", "bench", budget_usd="500000",
                                                       budget_period="monthly", rpm=100_000_000, tpm=10**11)
        await client.aclose()
        return secret

    return asyncio.run(create())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per scenario (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each scenario (default 2)")
    p.add_argument("--scenarios", default=DEFAULT_SCENARIOS,
                   help=f"comma list of {','.join(SCENARIOS)}; 'api' stands for {API_SCENARIOS}")
    p.add_argument("--out", default="/tmp/gateway-bench", help="results directory (default /tmp/gateway-bench)")
    p.add_argument("--mock-port", type=int, default=18080, help="mock port (the bench policy expects 18080)")
    p.add_argument("--mock-cpu", default="0")
    p.add_argument("--load-cpu", default="0", help="cpu list for wrk and stream_client (default 0)")
    p.add_argument("--skip-gateway", action="store_true", help="measure the mock only")
    p.add_argument("--gateway-cmd", default=None,
                   help="how to start the gateway (default: taskset -c 1 PYTHON -m gateway serve "
                        "--config bench/policies --port 4100), run from the repository root")
    p.add_argument("--gateway-url", default="http://127.0.0.1:4100", help="gateway origin")
    p.add_argument("--gateway-prefix", default="/v1", help="path prefix of /chat/completions on the gateway")
    p.add_argument("--ready-path", default="/health/ready")
    p.add_argument("--ready-timeout", type=float, default=90.0)
    p.add_argument("--header", action="append", default=[],
                   help="extra request header for the gateway, 'Name: value' (repeatable)")
    p.add_argument("--api-key", default="sk-bench",
                   help="sent to the gateway as 'Authorization: Bearer KEY' unless --header sets Authorization "
                        "(default sk-bench; '' sends none)")
    p.add_argument("--label", default="", help="suffix of the run directory name")
    p.add_argument("--budgets", action="store_true",
                   help="start a private redis-server (cpu of the mock) and give the gateway's default team a "
                        "budget and RPM/TPM limits, so every request reserves and settles in Redis")
    p.add_argument("--user-tag-budgets", action="store_true",
                   help="with --budgets: also a users.default and a tag budget, and send x-gateway-user and "
                        "x-gateway-tags, so every request reserves against a user and a tag budget too")
    p.add_argument("--sqlite", action="store_true",
                   help="the embedded SQLite state that a plain `gateway serve` keeps (a fresh GATEWAY_DATA_DIR in "
                        "the run directory); without it, and without --embedded-budgets, the gateway's embedded "
                        "state is in memory (GATEWAY_DATA_DIR=:memory:), whatever the environment says")
    p.add_argument("--embedded-budgets", action="store_true",
                   help="no Redis: give the gateway's default team the --budgets budgets and RPM/TPM limits on the "
                        "embedded SQLite state (a fresh GATEWAY_DATA_DIR in the run directory)")
    args = p.parse_args(argv)
    args.scenarios = [x for s in args.scenarios.split(",") if s.strip()
                      for x in (API_SCENARIOS.split(",") if s.strip() == "api" else [s.strip()])]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenarios {unknown}; choose from {list(SCENARIOS)}")
    if args.duration <= 0 or args.duration > 600 or args.warmup < 0 or args.warmup > 120:
        p.error("--duration must be in (0, 600] and --warmup in [0, 120]")
    loopback_only(args.gateway_url)
    for h in args.header:
        if ":" not in h:
            p.error(f"bad --header {h!r}")
    if args.api_key and not any(h.split(":", 1)[0].strip().lower() == "authorization" for h in args.header):
        args.header.append(f"Authorization: Bearer {args.api_key}")
    config = "bench/policies"
    started = dt.datetime.now()
    run_dir = Path(args.out) / (started.strftime("%Y%m%d-%H%M%S") + (f"-{args.label}" if args.label else ""))
    run_dir.mkdir(parents=True, exist_ok=True)
    gw_env = dict(os.environ)
    gw_env.setdefault("BENCH_ANTHROPIC_KEY", "sk-bench-anthropic")   # the bench policy's anthropic deployments
    # the core figures are the request path's own: state in memory unless a SQLite run is asked for
    gw_env["GATEWAY_DATA_DIR"] = str(run_dir / "data") if args.sqlite or args.embedded_budgets else ":memory:"
    redis_proc: subprocess.Popen[bytes] | None = None
    if args.budgets and not args.skip_gateway:
        config = budgets_policy(BENCH / "policies" / "models.yaml", run_dir / "policies", team_budgets("bench") + (
            "users:\n  default: {budgets: [{period: daily, usd: 100000}]}\n"
            "tags:\n  bench: {budgets: [{period: monthly, usd: 1000000}]}\n" if args.user_tag_budgets else ""))
        if args.user_tag_budgets:
            args.header += ["x-gateway-user: bench-user", "x-gateway-tags: bench"]
        redis_port = free_port()
        redis_proc = start_redis(redis_port, run_dir, cpu=args.mock_cpu)
        gw_env["GATEWAY_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        log(f"redis-server pid {redis_proc.pid} on 127.0.0.1:{redis_port}")
        secret = bench_key(redis_port)   # a virtual key with its own budget and limits, inside team "bench"
        args.header = [h for h in args.header if h.split(":", 1)[0].strip().lower() != "authorization"]
        args.header.append(f"Authorization: Bearer {secret}")
    if args.embedded_budgets and not args.skip_gateway:
        if args.budgets:
            p.error("--embedded-budgets and --budgets exclude each other")
        config = budgets_policy(BENCH / "policies" / "models.yaml", run_dir / "policies", team_budgets("default"))
    gateway_cmd = args.gateway_cmd or (f"taskset -c 1 {shlex.quote(sys.executable)} -m gateway serve "
                                       f"--config {config} --port 4100")
    gw_port = urlsplit(args.gateway_url).port or 80

    if port_in_use(args.mock_port):
        sys.exit(f"run.py: port {args.mock_port} is already in use; stop whatever listens there first")
    if not args.skip_gateway and port_in_use(gw_port):
        sys.exit(f"run.py: port {gw_port} is already in use (a gateway already running?); stop it first")

    bodies = body_files(run_dir)
    res: dict[str, Any] = {"meta": {
        "started": started.isoformat(timespec="seconds"), "duration_s": args.duration, "warmup_s": args.warmup,
        "scenarios": args.scenarios, "mock_cpu": args.mock_cpu, "load_cpu": args.load_cpu,
        "cores": os.cpu_count(), "python": sys.version.split()[0],
        "gateway_cmd": None if args.skip_gateway else gateway_cmd, "gateway_url": args.gateway_url,
        "budgets": bool(args.budgets), "embedded_budgets": bool(args.embedded_budgets),
        "state": "redis" if args.budgets else gw_env["GATEWAY_DATA_DIR"],
        "gateway_headers": [h.split(":", 1)[0] for h in args.header],
        "scenario_defs": {k: SCENARIOS[k] for k in args.scenarios}}, "targets": {}}

    mock: subprocess.Popen[bytes] | None = None
    gateway: subprocess.Popen[bytes] | None = None
    try:
        try:
            mock = start_mock_upstream(args.mock_port, run_dir / "mock.log", cpu=args.mock_cpu, timeout=20)
        except RuntimeError as exc:
            sys.exit(f"run.py: {exc}")
        direct_base = f"http://127.0.0.1:{args.mock_port}/v1"
        log(f"mock pid {mock.pid} on cpu {args.mock_cpu}, {direct_base}")
        res["targets"]["direct_before"] = measure("direct-before", direct_base, mock.pid, [], args, bodies, run_dir)

        if not args.skip_gateway:
            gw_log_path = run_dir / "gateway.log"
            log(f"starting gateway: {gateway_cmd}")
            gateway = start(shlex.split(gateway_cmd), gw_log_path, env=gw_env, cwd=ROOT)
            err = wait_ready(args.gateway_url + args.ready_path, gateway, args.ready_timeout)
            if err is None:
                err = smoke(args.gateway_url + args.gateway_prefix, args.header) or \
                    smoke_api(args.gateway_url + args.gateway_prefix, args.header, args.scenarios,
                              f"http://127.0.0.1:{args.mock_port}")
                if err:
                    err = f"smoke test failed: {err}"
            if err:
                tail = gw_log_path.read_text(errors="replace")[-3000:]
                log(f"gateway failed: {err}\n--- gateway log (tail) ---\n{tail}")
                res["targets"]["gateway"] = {"error": err, "log_tail": tail}
            else:
                log(f"gateway pid {gateway.pid} ready at {args.gateway_url}")
                mock_c0 = cpu_seconds(mock.pid)
                res["targets"]["gateway"] = measure("gateway", args.gateway_url + args.gateway_prefix, gateway.pid,
                                                    args.header, args, bodies, run_dir)
                res["meta"]["mock_cpu_s_during_gateway"] = round(cpu_seconds(mock.pid) - mock_c0, 3)
            stop_process(gateway, "gateway")
            if gateway.returncode not in (0, -signal.SIGTERM, None):
                res["meta"]["gateway_exit_status"] = gateway.returncode
            gateway = None
            res["targets"]["direct_after"] = measure("direct-after", direct_base, mock.pid, [], args, bodies,
                                                     run_dir)
        res["meta"]["mock_stats"] = json.loads(http_get(f"http://127.0.0.1:{args.mock_port}/_stats")[1])
    finally:
        if gateway is not None:
            stop_process(gateway, "gateway")
        if mock is not None:
            stop_process(mock, "mock")
        if redis_proc is not None:
            stop_process(redis_proc, "redis-server")

    res["direct_mean"] = mean_direct(res["targets"]["direct_before"], res["targets"].get("direct_after"))
    table, derived = report(res)
    if not any(SCENARIOS[k].get("api", "chat") == "chat" for k in args.scenarios):
        table, derived = "\n".join(table.splitlines()[:3]) + "\n", {}   # no chat scenario: its heading only
    api_table, api_derived = api_report(res)
    table, derived = table + api_table, {**derived, **api_derived}
    res["derived"] = derived
    res["table_md"] = table
    (run_dir / "results.json").write_text(json.dumps(res, indent=2))
    (run_dir / "table.md").write_text(table)
    Path(args.out, "latest.json").write_text(json.dumps(res, indent=2))
    print(table)
    log(f"saved {run_dir}/results.json, table.md, raw-*.log, mock.log"
        + ("" if args.skip_gateway else ", gateway.log"))
    gw = res["targets"].get("gateway")
    return 1 if gw is not None and gw.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
