"""Replay the Mooncake synthetic trace through the gateway against a prefix-caching mock upstream.

Prompts are built from the trace's 512-token blocks (block ``h`` is 512 words ``<h>x<i>``, hex; a
partial last block its first words), so equal ``hash_ids`` give equal text and the mock, which
counts a word as a token and caches prompt prefixes in 512-token blocks like vLLM's automatic
prefix caching or OpenAI's, reports as ``cached_tokens`` exactly the prefix it has seen before.
What the trace implies is computed here independently (:func:`expected_cached`) and every request
is checked against it; the report gives the cached share of prompt tokens and the dollars prompt
caching saved at $2/Mtok input, $0.50/Mtok cached input, $8/Mtok output. The same helpers serve
``tests/test_trace_replay.py``, which replays a 300-request window on every test run.

    python bench/mooncake_replay.py                    # the whole trace, in order, cold cache
    python bench/mooncake_replay.py --start 3600 --count 300

Starts its own mock and gateway (embedded state, no Redis) on free loopback ports and stops them
by PID; requests are sequential, bounded by the trace's length and ``--timeout-s``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from harness import free_port, gateway_env, start_gateway, start_mock_upstream, stop_process  # bench/harness.py

ROOT = Path(__file__).resolve().parent.parent
TRACE_NAME = "mooncake-synthetic-trace.jsonl"
BLOCK = 512
IN, CACHED, OUT = 2000, 500, 8000          # nano-USD per token: $2, $0.50 and $8 per million
FRAMING = 6                                # the mock's chat framing: 3 per request + 3 per message


def trace_path() -> Path:
    """The shared trace: $GATEWAY_SHARED_DATA, else ../shared/data next to the checkout, else /work/shared/data."""
    for base in (os.environ.get("GATEWAY_SHARED_DATA"), ROOT.parent / "shared" / "data", "/work/shared/data"):
        if base and (Path(base) / TRACE_NAME).exists():
            return Path(base) / TRACE_NAME
    return ROOT.parent / "shared" / "data" / TRACE_NAME


def load_rows(start: int = 0, count: int | None = None, path: Path | None = None) -> list[dict[str, Any]]:
    with open(path or trace_path()) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return rows[start:] if count is None else rows[start:start + count]


def expected_cached(rows: list[dict[str, Any]]) -> list[int]:
    """Per request, the tokens of its leading full blocks whose whole prefix an earlier request had."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for row in rows:
        ids, full = row["hash_ids"], row["input_length"] // BLOCK
        cached, leading = 0, True
        for j in range(min(full, len(ids))):
            prefix = tuple(ids[:j + 1])
            if leading and prefix in seen:
                cached += BLOCK
            else:
                leading = False
                seen.add(prefix)
        out.append(cached)
    return out


def prompt(row: dict[str, Any]) -> str:
    words: list[str] = []
    left = row["input_length"]
    for h in row["hash_ids"]:
        n = min(BLOCK, left)
        words.extend(f"{h:x}x{i:x}" for i in range(n))
        left -= n
    assert left == 0 and len(words) == row["input_length"]
    return " ".join(words)


def policy(mock_base: str) -> str:
    """A model ``trace`` on the prefix-caching mock, priced as this module's constants say."""
    return textwrap.dedent(f"""\
        models:
          trace:
            deployments:
              - provider: openai
                model: mock-apc512-tokens4096
                api_base: {mock_base}/v1
                price: {{input_per_mtok: 2.0, cache_read_per_mtok: 0.5, output_per_mtok: 8.0}}
        """)


def replay(base_url: str, rows: list[dict[str, Any]], timeout_s: float) -> dict[str, Any]:
    """Send every row in order; check each request's cached tokens and cost; return the totals."""
    import httpx

    expect = expected_cached(rows)
    totals = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "output_tokens": 0, "cost_nano": 0,
              "mismatches": 0}
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=base_url, headers={"Authorization": "Bearer sk-trace"}, timeout=120) as client:
        for i, (row, cached_expected) in enumerate(zip(rows, expect, strict=True)):
            if time.monotonic() > deadline:
                raise SystemExit(f"stopped after {i} requests: --timeout-s {timeout_s:g} passed")
            reply = client.post("/v1/chat/completions", json={
                "model": "trace", "max_tokens": max(1, row["output_length"]),
                "messages": [{"role": "user", "content": prompt(row)}]})
            reply.raise_for_status()
            usage = reply.json()["usage"]
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            cost = round(usage["cost_usd"] * 1e9)
            own = (usage["prompt_tokens"] - cached) * IN + cached * CACHED + usage["completion_tokens"] * OUT
            if cached != cached_expected or cost != own or usage["prompt_tokens"] != row["input_length"] + FRAMING:
                totals["mismatches"] += 1
            totals["requests"] += 1
            totals["prompt_tokens"] += usage["prompt_tokens"]
            totals["cached_tokens"] += cached
            totals["output_tokens"] += usage["completion_tokens"]
            totals["cost_nano"] += cost
    totals["expected_cached_tokens"] = sum(expect)
    totals["uncached_cost_nano"] = totals["prompt_tokens"] * IN + totals["output_tokens"] * OUT
    totals["saved_nano"] = totals["uncached_cost_nano"] - totals["cost_nano"]
    return totals


def report(t: dict[str, Any], first: int) -> str:
    last = first + t["requests"] - 1
    return (f"mooncake replay, requests {first}-{last}: {t['prompt_tokens']} prompt tokens, "
            f"{t['cached_tokens']} cached ({t['cached_tokens'] / t['prompt_tokens']:.1%}; the trace implies "
            f"{t['expected_cached_tokens']}); cost ${t['cost_nano'] / 1e9:.6f} instead of "
            f"${t['uncached_cost_nano'] / 1e9:.6f}: prompt caching saved ${t['saved_nano'] / 1e9:.6f} "
            f"({t['saved_nano'] / t['uncached_cost_nano']:.1%}); {t['mismatches']} requests differing from the trace")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--count", type=int, default=None, help="default: to the end of the trace")
    ap.add_argument("--trace", type=Path, default=None)
    ap.add_argument("--timeout-s", type=float, default=900.0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gateway-bench/mooncake.json"))
    args = ap.parse_args(argv)
    rows = load_rows(args.start, args.count, args.trace)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mock_port, gw_port = free_port(), free_port()
            procs.append(start_mock_upstream(mock_port, timeout=60.0))
            Path(tmp, "models.yaml").write_text(policy(f"http://127.0.0.1:{mock_port}"))
            procs.append(start_gateway(tmp, gw_port, Path(tmp, "gateway.log"), gateway_env(), timeout=60.0))
            started = time.monotonic()
            totals = replay(f"http://127.0.0.1:{gw_port}", rows, args.timeout_s)
            totals["seconds"] = round(time.monotonic() - started, 1)
        except RuntimeError as exc:   # the mock or the gateway did not start
            raise SystemExit(str(exc)) from None
        finally:
            for proc in reversed(procs):
                stop_process(proc, str(proc.args))
    print(report(totals, args.start))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"start": args.start, **totals}, indent=2))
    return 0 if totals["mismatches"] == 0 and totals["cached_tokens"] == totals["expected_cached_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
