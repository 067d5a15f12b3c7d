"""The traffic ``gateway demo`` drives: a few virtual users per team, each sending a mix of requests.

Every team has its own mix (:data:`TEAM_MIX`): plain and streaming chat on models of
different prices and speeds, repeated temperature-0 questions (what a response cache
answers), long multi-turn conversations that grow towards the model's context window
(what context compression shortens), embeddings, a model whose first deployment fails
(fallbacks) and the self-hosted model. Each request goes over HTTP with the team's key;
its outcome (ok, refused by a budget, rate limited, failed) and the cost the gateway
reported are tallied per team. A progress line on stderr shows how far the run is.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx
import orjson

from gateway.pricing import usd_to_nano
from gateway.tokens import count_prompt

USERS_PER_TEAM = 2
WORDS = ("budget", "latency", "gateway", "invoice", "customer", "refund", "policy", "cluster", "token",
         "quarter", "forecast", "contract", "release", "incident", "summary", "report", "region", "model",
         "pricing", "capacity", "review", "schedule", "support", "ticket", "draft", "account", "metric")
HANDBOOK = " ".join(  # the support bot's long, fixed system prompt: a knowledge-base excerpt
    f"Section {i}: " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) + "." for i in range(30))
FAQ = ("How do I reset my password?", "What is the refund policy for annual plans?",
       "How do I export my invoices as CSV?", "Which regions host my data?",
       "How do I add a teammate to my workspace?", "What are the API rate limits?")


@dataclass(frozen=True, slots=True)
class Step:
    """One kind of request in a team's mix, chosen by ``weight``; ``stream``: the share sent streaming."""

    kind: str            # "chat" | "faq" | "conversation" | "embed"
    model: str
    weight: float
    stream: float = 0.0


TEAM_MIX: dict[str, tuple[Step, ...]] = {
    "research": (Step("chat", "frontier", 2, stream=0.5), Step("chat", "reasoner", 1, stream=0.5),
                 Step("conversation", "workhorse", 4, stream=0.3), Step("chat", "local-llama", 2, stream=0.5)),
    "support": (Step("faq", "frontier", 6), Step("chat", "frontier", 3, stream=0.5)),
    "marketing": (Step("chat", "frontier", 3, stream=0.6), Step("chat", "workhorse", 2, stream=0.3)),
    "platform": (Step("embed", "embed", 3), Step("chat", "resilient", 4, stream=0.3),
                 Step("chat", "local-llama", 2, stream=0.3)),
}


@dataclass(slots=True)
class Tally:
    requests: int = 0
    ok: int = 0
    budget: int = 0
    rate_limited: int = 0
    failed: int = 0
    streamed: int = 0
    cost_nano: int = 0

    def add(self, other: Tally) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(slots=True)
class Result:
    outcome: str           # "ok" | "budget" | "rate_limited" | "failed"
    cost_nano: int = 0
    text: str = ""


@dataclass
class Run:
    """The shared state of one run: per-team tallies, the clock and the stop signal."""

    duration_s: float
    stop: asyncio.Event
    tallies: dict[str, Tally] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def over(self) -> bool:
        return self.stop.is_set() or self.elapsed() >= self.duration_s

    def total(self) -> Tally:
        total = Tally()
        for tally in self.tallies.values():
            total.add(tally)
        return total


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


async def send(client: httpx.AsyncClient, key: str, endpoint: str, body: dict[str, Any], stream: bool) -> Result:
    headers = {"authorization": f"Bearer {key}"}
    path = "/v1/embeddings" if endpoint == "embeddings" else "/v1/chat/completions"
    try:
        if not stream:
            resp = await client.post(path, content=orjson.dumps(body), headers=headers)
            if resp.status_code != 200:
                return Result(_refusal(resp.status_code, resp.content))
            data = orjson.loads(resp.content)
            text = "" if endpoint == "embeddings" else (data["choices"][0]["message"].get("content") or "")
            return Result("ok", usd_to_nano(resp.headers.get("x-gateway-cost-usd", "0")), text)
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", path, content=orjson.dumps(body), headers=headers) as resp:
            if resp.status_code != 200:
                return Result(_refusal(resp.status_code, await resp.aread()))
            return await _read_stream(resp)
    except (httpx.HTTPError, orjson.JSONDecodeError, KeyError, IndexError):
        return Result("failed")


async def _read_stream(resp: httpx.Response) -> Result:
    parts: list[str] = []
    cost, outcome = 0, "ok"
    async for line in resp.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = orjson.loads(line[6:])
        if "error" in event:
            outcome = "failed"
            continue
        usage = event.get("usage")
        if isinstance(usage, dict) and "cost_usd" in usage:
            cost = round(usage["cost_usd"] * 1e9)   # cost_usd is nano-USD / 1e9, correctly rounded
        for choice in event.get("choices") or ():
            parts.append((choice.get("delta") or {}).get("content") or "")
    return Result(outcome, cost, "".join(parts))


def _refusal(status: int, raw: bytes) -> str:
    try:
        code = orjson.loads(raw)["error"]["code"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        code = None
    if code == "budget_exceeded":
        return "budget"
    if code == "rate_limit_exceeded" and status == 429:
        return "rate_limited"
    return "failed"


class User:
    """One virtual user of a team: picks a step, builds its request, sends it, tallies the result."""

    def __init__(self, team: str, key: str, seed: int, windows: Mapping[str, int]) -> None:
        self.team, self.key, self.windows = team, key, windows
        self.rng = random.Random(seed)
        self.mix = TEAM_MIX[team]
        self.conversation: list[dict[str, str]] = []

    async def run(self, client: httpx.AsyncClient, run: Run) -> None:
        tally = run.tallies.setdefault(self.team, Tally())
        while not run.over():
            step = self.rng.choices(self.mix, weights=[s.weight for s in self.mix])[0]
            stream = self.rng.random() < step.stream
            endpoint, body = self.request(step)
            result = await send(client, self.key, endpoint, body, stream)
            tally.requests += 1
            tally.streamed += stream
            tally.cost_nano += result.cost_nano
            setattr(tally, result.outcome, getattr(tally, result.outcome) + 1)
            if step.kind == "conversation":
                self.answered(result)
            refused = result.outcome in ("rate_limited", "budget")   # a person would wait a moment
            pause = self.rng.uniform(0.3, 0.8) if refused else self.rng.uniform(0.02, 0.2)
            if not run.over():
                await asyncio.sleep(pause)

    def request(self, step: Step) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        if step.kind == "embed":
            return "embeddings", {"model": step.model, "input": [_sentence(rng, rng.randint(8, 40))
                                                                 for _ in range(rng.randint(1, 4))]}
        if step.kind == "faq":   # the same few questions, deterministic: a response cache answers these
            return "chat", {"model": step.model, "temperature": 0, "max_tokens": 200,
                            "messages": [{"role": "system", "content": "Answer from this handbook. " + HANDBOOK},
                                         {"role": "user", "content": rng.choice(FAQ)}]}
        if step.kind == "conversation":
            return "chat", self.next_turn(step.model)
        body: dict[str, Any] = {"model": step.model, "temperature": 0.7,
                                "messages": [{"role": "user", "content": _sentence(rng, rng.randint(15, 80))}]}
        limit = rng.choice((None, 128, 256, 512))
        if limit is not None:
            body["max_tokens"] = limit
        return "chat", body

    def next_turn(self, model: str) -> dict[str, Any]:
        """A long conversation: each turn pastes a document chunk; it restarts near the context window."""
        if not self.conversation:
            self.conversation = [{"role": "system", "content": "You are a careful analyst. Cite the documents."}]
        self.conversation.append({"role": "user", "content": "Here is the next part of the report: "
                                  + " ".join(_sentence(self.rng, 25) for _ in range(12))})
        body = {"model": model, "temperature": 0.3, "max_tokens": 300, "messages": list(self.conversation)}
        window = self.windows.get(model)
        if window and count_prompt(body, "chat", model) > 0.9 * window - 300:
            self.conversation = []
            return self.next_turn(model)
        return body

    def answered(self, result: Result) -> None:
        if result.outcome == "ok":
            self.conversation.append({"role": "assistant", "content": result.text or "(no answer)"})
        elif self.conversation:
            self.conversation.pop()   # not answered: the user asks something else next


async def drive(url: str, keys: Mapping[str, str], run: Run, windows: Mapping[str, int],
                progress: TextIO | None = None) -> None:
    """Run every team's users against ``url`` until the run is over, then let in-flight requests finish."""
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0), limits=limits) as client:
        users = [User(team, key, seed=1000 * n + i, windows=windows)
                 for n, (team, key) in enumerate(sorted(keys.items())) for i in range(USERS_PER_TEAM)]
        tasks = [asyncio.ensure_future(u.run(client, run)) for u in users]
        shown = asyncio.ensure_future(show_progress(run, progress or sys.stderr))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            shown.cancel()
            await asyncio.gather(shown, return_exceptions=True)
            print_progress(run, progress or sys.stderr, final=True)


async def show_progress(run: Run, out: TextIO) -> None:
    tty = out.isatty()
    step = 0.25 if tty else max(run.duration_s / 10, 1.0)
    while True:
        await asyncio.sleep(step)
        print_progress(run, out)


def print_progress(run: Run, out: TextIO, final: bool = False) -> None:
    done = min(1.0, run.elapsed() / run.duration_s) if run.duration_s > 0 else 1.0
    width = 30
    bar = "#" * round(done * width) + "-" * (width - round(done * width))
    t = run.total()
    line = (f"demo [{bar}] {min(run.elapsed(), run.duration_s):4.0f}s/{run.duration_s:.0f}s  "
            f"{t.requests} requests  ${t.cost_nano / 1e9:.4f}  {t.budget} over budget  "
            f"{t.rate_limited} rate limited  {t.failed} failed")
    if out.isatty():
        out.write("\r" + line + ("\n" if final else ""))
    else:
        out.write(line + "\n")
    out.flush()
