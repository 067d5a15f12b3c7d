#!/usr/bin/env python3
"""CPU time per Responses request with the conversation store on (``store: true``) and off.

The app runs in process on the embedded state (no sockets, no other process): requests go
through its ASGI interface to the simulated model (no latency), so the process's CPU time
(``time.process_time``) is the gateway's own work. Each round sends ``--requests`` requests
with ``store: true`` and as many with ``store: false``, alternating the order between rounds;
the table gives the median over rounds of CPU microseconds per request, and the difference
(what storing costs); the event loop turns once between requests, as a server's does (the
memory store builds kept responses on that turn). The input is a conversation of ``--items`` message items (a realistic
Codex or Agents SDK turn carries many), so the stored record is not trivially small.

A second table splits what storing one response costs between the reply (the codec's
``put_later``: a closure and a dict entry) and the memory store's build and serialisation on
the event loop's next turn (``flush``), over ``--requests`` records of ``--items`` items.

    python bench/responses_store_cpu.py                       # 5 rounds of 1000 + 1000 requests
    python bench/responses_store_cpu.py --rounds 7 --requests 2000 --items 40 --stream
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.api.app import create_app  # noqa: E402
from gateway.api.responses.conversation import stored_record  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from gateway.state.responses_store import MemoryResponsesStore  # noqa: E402

MAX_ENTRIES = 10_000
POLICY = """\
models:
  local:
    deployments:
      - provider: simulated
        name: local-sim
        price: {input_per_mtok: 1, output_per_mtok: 2}
        simulated: {latency_ms: 0, ttft_ms: 0, tokens_per_second: 0, output_tokens: 24}
"""


def conversation(items: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(items):
        role = "user" if i % 2 == 0 else "assistant"
        kind = "input_text" if role == "user" else "output_text"
        out.append({"type": "message", "role": role,
                    "content": [{"type": kind, "text": f"message {i}: " + "lorem ipsum dolor sit amet " * 8}]})
    return out


async def post(app: Any, body: bytes) -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/responses",
             "headers": [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-bench")]}
    await app(scope, receive, send)
    return int(next(m["status"] for m in sent if m["type"] == "http.response.start"))


async def run(rounds: int, requests: int, items: int, stream: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "models.yaml").write_text(textwrap.dedent(POLICY))
        app = create_app(Settings(config_dir=tmp, master_key="sk-bench", responses_max_entries=MAX_ENTRIES))
        app.state.state.start()
        try:
            bodies = {store: orjson.dumps({"model": "local", "input": conversation(items), "store": store,
                                           "stream": stream}) for store in (True, False)}
            for store in (True, False):      # warm-up: imports, caches, the first allocations
                for _ in range(200):
                    assert await post(app, bodies[store]) == 200
            per: dict[bool, list[float]] = {True: [], False: []}
            for r in range(rounds):
                for store in ((True, False) if r % 2 == 0 else (False, True)):
                    start = time.process_time()
                    for _ in range(requests):
                        await post(app, bodies[store])
                        await asyncio.sleep(0)     # the loop turns between requests, as in a server
                    per[store].append((time.process_time() - start) / requests * 1e6)
        finally:
            await app.state.state.aclose()
            await app.state.client.aclose()
    on, off = statistics.median(per[True]), statistics.median(per[False])
    print(f"| requests | store: true (us CPU/request) | store: false | difference |\n|---|---|---|---|\n"
          f"| {rounds} x {requests} {'streamed' if stream else 'JSON'}, {items} input items "
          f"| {on:.1f} | {off:.1f} | {on - off:.1f} |")
    print("rounds, true:", " ".join(f"{v:.1f}" for v in per[True]), "false:", " ".join(f"{v:.1f}" for v in per[False]))


async def split(requests: int, items: int) -> None:
    """CPU of keeping one response: on the reply (``put_later``) and after it (``flush``)."""
    store = MemoryResponsesStore()
    body = {"model": "local", "input": conversation(items), "store": True}
    answer = {"object": "response", "status": "completed", "usage": {"input_tokens": 10, "output_tokens": 24},
              "output": [{"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                          "content": [{"type": "output_text", "text": "lorem " * 24, "annotations": []}]}]}
    on = off = 0.0
    for i in range(requests):
        response = {**answer, "id": f"resp_{i}"}
        start = time.process_time()
        await store.put_later(response["id"], lambda r=response: stored_record(   # type: ignore[misc]
            body, None, r, team="bench", deployment_id="local-sim", upstream_state=False))
        middle = time.process_time()
        store.flush()
        on, off = on + middle - start, off + time.process_time() - middle
    print(f"\n| keeping one response ({items} input items) | on the reply (us CPU) | after it |\n|---|---|---|\n"
          f"| {requests} records | {on / requests * 1e6:.1f} | {off / requests * 1e6:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    asyncio.run(run(args.rounds, args.requests, args.items, args.stream))
    asyncio.run(split(args.requests, args.items))


if __name__ == "__main__":
    main()
