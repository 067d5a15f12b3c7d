"""The built-in simulated model: deterministic answers with no network and no key.

It serves the shipped ``demo`` model, tests and benchmarks. Latency, time to
first token, pace, answer length and failures come from the deployment's
``simulated:`` section. Answers are made of words that are one token each in
OpenAI's encodings, so the usage it reports matches what the gateway would
count. It honours ``stop`` (the answer ends before the first stop sequence),
``max_tokens``, ``n`` (every choice, also when streamed), ``response_format``
(``json_object``, and ``json_schema`` with a value that validates against the
schema, so the SDK's ``parse`` works) and tools (the forced or first tool is
called with arguments built from its parameters' JSON schema, see
:mod:`gateway.providers.schema_values`); embeddings and legacy completions are
answered in OpenAI's shapes. With ``prompt_cache: true`` it models automatic
prompt caching as OpenAI documents it: a chat prompt of 1024 tokens or more whose
leading messages it has seen before reports that prefix (in 128-token steps) as
``cached_tokens``.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import UpstreamError
from gateway.policy import Deployment, SimulatedSpec
from gateway.providers.base import Call, error_for_status
from gateway.providers.schema_values import value_for
from gateway.tokens import count_completion_text, count_prompt

PROMPT_CACHE_MIN_TOKENS = 1024
PROMPT_CACHE_STEP = 128
PROMPT_CACHE_ENTRIES = 50_000   # message prefixes remembered per process, oldest forgotten first
WORDS = (" the", " gateway", " routes", " every", " request", " to", " a", " model", " and",
         " counts", " its", " cost", " in", " real", " time", " for", " each", " team")


def _answer_tokens(n: int, offset: int = 0) -> list[str]:
    """``n`` one-token words; each choice of an ``n`` > 1 request starts at its own word."""
    return [WORDS[(i + offset) % len(WORDS)] for i in range(n)]


class SimulatedProvider:
    def __init__(self) -> None:
        self._calls: dict[str, int] = {}
        self._prefixes: OrderedDict[bytes, None] = OrderedDict()

    def _cached_tokens(self, call: Call, spec: SimulatedSpec, prompt_tokens: int) -> int:
        """Tokens of the longest message prefix this deployment has seen before (0 below the minimum)."""
        messages = call.body.get("messages")
        if not spec.prompt_cache or call.endpoint != "chat" or prompt_tokens < PROMPT_CACHE_MIN_TOKENS \
                or not isinstance(messages, list):
            return 0
        digest = hashlib.sha256(call.deployment.id.encode())
        known = 0
        for i, message in enumerate(messages):
            digest.update(orjson.dumps(message))
            key = digest.digest()
            if key in self._prefixes:
                known = i + 1
                self._prefixes.move_to_end(key)
            else:
                self._prefixes[key] = None
        while len(self._prefixes) > PROMPT_CACHE_ENTRIES:
            self._prefixes.popitem(last=False)
        if not known:
            return 0
        tokens = count_prompt({**call.body, "messages": messages[:known]}, "chat", call.deployment.upstream_model)
        cached = min(tokens, prompt_tokens - 1) // PROMPT_CACHE_STEP * PROMPT_CACHE_STEP
        return cached if cached >= PROMPT_CACHE_MIN_TOKENS else 0

    def _spec(self, deployment: Deployment) -> SimulatedSpec:
        return deployment.simulated or SimulatedSpec()

    def _maybe_fail(self, deployment: Deployment, spec: SimulatedSpec) -> None:
        i = self._calls.get(deployment.id, 0)
        self._calls[deployment.id] = i + 1
        rate = spec.failure_rate
        if rate > 0 and int((i + 1) * rate) > int(i * rate):
            raise error_for_status(spec.failure_status, "simulated failure", deployment)

    def _length(self, body: dict[str, Any], spec: SimulatedSpec) -> int:
        limit = _limit(body)
        n = spec.output_tokens
        if limit is not None:
            n = min(n, limit)
        return n

    def _answers(self, call: Call, spec: SimulatedSpec) -> list[Answer]:
        body, model = call.body, call.deployment.upstream_model
        chat = call.endpoint == "chat"
        length = self._length(body, spec)
        plain_finish = "length" if length < spec.output_tokens else "stop"
        stops = _stops(body)
        tool = _tool(body) if chat else None
        raw_fmt = body.get("response_format") if chat else None
        fmt: dict[str, Any] = raw_fmt if isinstance(raw_fmt, dict) else {}
        kind = fmt.get("type")
        out = []
        for index in range(_choices(body)):
            if tool is not None:
                name, params = tool
                arguments = orjson.dumps(value_for(params, salt=0)).decode()
                name_tokens = count_completion_text(name, model)     # the call's name counts as output too
                limit = _limit(body)
                pieces, finish = _within(_pieces(arguments), None if limit is None else max(0, limit - name_tokens),
                                         model, "tool_calls")
                out.append(Answer(index, "".join(pieces), pieces, finish,
                                  name_tokens + count_completion_text("".join(pieces), model), tool_name=name))
                continue
            if kind == "json_schema" or kind == "json_object":
                schema = _json_schema(fmt) if kind == "json_schema" else None
                words = "".join(_answer_tokens(length, index)).lstrip()
                value = value_for(schema) if schema is not None else {"answer": words}
                pieces, finish = _within(_pieces(orjson.dumps(value).decode()), _limit(body), model, "stop")
                counted = True
            else:
                pieces = _answer_tokens(length, index)
                pieces[0:1] = [pieces[0].lstrip()] if pieces else []
                finish, counted = plain_finish, False
            text = "".join(pieces)
            cut = _stop_at(text, stops)
            if cut is not None:
                pieces, text, finish, counted = _cut(pieces, cut), text[:cut], "stop", True
            tokens = count_completion_text(text, model) if counted else len(pieces)
            out.append(Answer(index, text, pieces, finish, tokens))
        return out

    async def complete(self, call: Call) -> dict[str, Any]:
        spec = self._spec(call.deployment)
        self._maybe_fail(call.deployment, spec)
        if spec.latency_ms:
            await asyncio.sleep(spec.latency_ms / 1000)
        body = call.body
        model = call.deployment.upstream_model
        prompt_tokens = count_prompt(body, call.endpoint, model)
        created = int(time.time())
        if call.endpoint == "embeddings":
            return _embeddings(body, model, prompt_tokens)
        answers = self._answers(call, spec)
        if call.endpoint == "completions":
            choices: list[dict[str, Any]] = [
                {"index": a.index, "text": a.text, "logprobs": None, "finish_reason": a.finish} for a in answers]
            obj, cid = "text_completion", "cmpl-sim"
        else:
            choices = [{"index": a.index, "message": a.message(), "logprobs": None, "finish_reason": a.finish}
                       for a in answers]
            obj, cid = "chat.completion", "chatcmpl-sim"
        completion_tokens = sum(a.tokens for a in answers)
        cached = self._cached_tokens(call, spec, prompt_tokens)
        return {
            "id": f"{cid}-{created}-{self._calls.get(call.deployment.id, 0)}",
            "object": obj, "created": created, "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": cached},
                      "completion_tokens_details": {"reasoning_tokens": 0}},
            "system_fingerprint": "fp_simulated",
        }

    async def stream(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        """Every choice streamed, interleaved piece by piece (as OpenAI does for ``n`` > 1); then one
        chunk per choice with its finish reason; then the usage chunk when asked for."""
        spec = self._spec(call.deployment)
        self._maybe_fail(call.deployment, spec)
        body = call.body
        model = call.deployment.upstream_model
        prompt_tokens = count_prompt(body, call.endpoint, model)
        answers = self._answers(call, spec)
        created = int(time.time())
        cid = f"chatcmpl-sim-{created}-{self._calls.get(call.deployment.id, 0)}"
        chat = call.endpoint == "chat"
        gap = 1.0 / spec.tokens_per_second if spec.tokens_per_second > 0 else 0.0
        if spec.ttft_ms:
            await asyncio.sleep(spec.ttft_ms / 1000)

        def chunk(delta: dict[str, Any], finish: str | None, index: int) -> dict[str, Any]:
            if chat:
                choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None,
                                          "finish_reason": finish}
                return {"id": cid, "object": "chat.completion.chunk", "created": created,
                        "model": model, "choices": [choice]}
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": index, "text": delta.get("content", ""),
                                 "logprobs": None, "finish_reason": finish}]}

        if chat:
            for a in answers:
                if a.tool_name is not None:
                    yield chunk({"role": "assistant", "content": None, "tool_calls": [
                        {"index": 0, "id": a.tool_id, "type": "function",
                         "function": {"name": a.tool_name, "arguments": ""}}]}, None, a.index)
                else:
                    yield chunk({"role": "assistant", "content": ""}, None, a.index)
        for i in range(max((len(a.pieces) for a in answers), default=0)):
            if spec.fail_after_tokens and i >= spec.fail_after_tokens:
                raise UpstreamError(f"deployment {call.deployment.id}: simulated stream cut")
            if gap and i:
                await asyncio.sleep(gap)
            for a in answers:
                if i < len(a.pieces):
                    delta: dict[str, Any] = {"content": a.pieces[i]} if a.tool_name is None else \
                        {"tool_calls": [{"index": 0, "function": {"arguments": a.pieces[i]}}]}
                    yield chunk(delta, None, a.index)
        for a in answers:
            yield chunk({}, a.finish, a.index)
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            completion_tokens = sum(a.tokens for a in answers)
            usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                     "total_tokens": prompt_tokens + completion_tokens}
            cached = self._cached_tokens(call, spec, prompt_tokens)
            if cached:
                usage["prompt_tokens_details"] = {"cached_tokens": cached}
            yield {"id": cid, "object": "chat.completion.chunk" if chat else "text_completion",
                   "created": created, "model": model, "choices": [], "usage": usage}

    async def aclose(self) -> None:
        self._calls.clear()
        self._prefixes.clear()


def _choices(body: dict[str, Any]) -> int:
    n = body.get("n", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 128 else 1


def _limit(body: dict[str, Any]) -> int | None:
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


@dataclass(frozen=True, slots=True)
class Answer:
    """One choice: its text (or a tool call's arguments), the pieces it streams in, finish reason, tokens."""

    index: int
    text: str
    pieces: list[str]
    finish: str
    tokens: int
    tool_name: str | None = None

    @property
    def tool_id(self) -> str:
        return f"call_sim_{self.index}"

    def message(self) -> dict[str, Any]:
        if self.tool_name is not None:
            return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                {"id": self.tool_id, "type": "function",
                 "function": {"name": self.tool_name, "arguments": self.text}}]}
        return {"role": "assistant", "content": self.text, "refusal": None}


_PIECE = re.compile(r"\s*[A-Za-z0-9_]+|\s*[^A-Za-z0-9_\s]|\s+")


def _pieces(text: str) -> list[str]:
    """Text in small stream pieces (a word or one punctuation mark each, with the spaces before it)."""
    return _PIECE.findall(text)


def _within(pieces: list[str], limit: int | None, model: str, finish: str) -> tuple[list[str], str]:
    """The longest prefix of ``pieces`` within ``limit`` tokens, and the finish reason that follows."""
    if limit is None or count_completion_text("".join(pieces), model) <= limit:
        return pieces, finish
    low, high = 0, len(pieces)          # the longest prefix that fits lies in [low, high)
    while high - low > 1:
        mid = (low + high) // 2
        if count_completion_text("".join(pieces[:mid]), model) <= limit:
            low = mid
        else:
            high = mid
    return pieces[:low], "length"


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list):
        return [s for s in stop if isinstance(s, str) and s]
    return []


def _stop_at(text: str, stops: list[str]) -> int | None:
    """Where the text ends under the stop sequences (the first one found is not part of the answer)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _cut(pieces: list[str], end: int) -> list[str]:
    """The pieces that spell the first ``end`` characters of their text (the last one shortened)."""
    out, used = [], 0
    for piece in pieces:
        if used + len(piece) >= end:
            if end > used:
                out.append(piece[:end - used])
            break
        out.append(piece)
        used += len(piece)
    return out


def _tool(body: dict[str, Any]) -> tuple[str, Any] | None:
    """(name, parameters schema) of the tool to call: the forced one, else the first, when the
    conversation awaits a call (tools offered, ``tool_choice`` not ``none``, no tool result last)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    messages = body.get("messages")
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "tool":
        return None
    functions = [t["function"] for t in tools
                 if isinstance(t, dict) and isinstance(t.get("function"), dict)
                 and isinstance(t["function"].get("name"), str)]
    if not functions:
        return None
    chosen = functions[0]
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        forced = choice["function"].get("name")
        chosen = next((f for f in functions if f["name"] == forced), chosen)
    return chosen["name"], chosen.get("parameters") or {"type": "object", "properties": {}}


def _json_schema(fmt: dict[str, Any]) -> Any:
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return schema if isinstance(schema, dict) else {"type": "object", "properties": {}}


def _embeddings(body: dict[str, Any], model: str, prompt_tokens: int) -> dict[str, Any]:
    raw = body.get("input")
    items = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
    dims = body.get("dimensions")
    size = dims if isinstance(dims, int) and not isinstance(dims, bool) and 0 < dims <= 4096 else 256
    data = []
    for i, item in enumerate(items):
        seed = hashlib.sha256(orjson.dumps(item)).digest()
        values: list[float] = []
        while len(values) < size:
            seed = hashlib.sha256(seed).digest()
            values.extend(v / 2**31 - 1.0 for v in struct.unpack("<8I", seed))
        data.append({"object": "embedding", "index": i, "embedding": values[:size]})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
