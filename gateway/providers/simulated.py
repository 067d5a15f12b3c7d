"""The built-in simulated model: deterministic answers with no network and no key.

It serves the shipped ``demo`` model, tests and benchmarks. Latency, time to
first token, pace, answer length and failures come from the deployment's
``simulated:`` section. Answers are made of words that are one token each in
OpenAI's encodings, so the usage it reports matches what the gateway would
count. Tool calls, JSON mode, ``n``, embeddings and legacy completions are
answered in OpenAI's shapes. With ``prompt_cache: true`` it models automatic
prompt caching as OpenAI documents it: a chat prompt of 1024 tokens or more whose
leading messages it has seen before reports that prefix (in 128-token steps) as
``cached_tokens``.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import orjson

from gateway.errors import UpstreamError
from gateway.policy import Deployment, SimulatedSpec
from gateway.providers.base import Call, error_for_status
from gateway.tokens import count_prompt

PROMPT_CACHE_MIN_TOKENS = 1024
PROMPT_CACHE_STEP = 128
PROMPT_CACHE_ENTRIES = 50_000   # message prefixes remembered per process, oldest forgotten first
WORDS = (" the", " gateway", " routes", " every", " request", " to", " a", " model", " and",
         " counts", " its", " cost", " in", " real", " time", " for", " each", " team")


def _answer_tokens(n: int) -> list[str]:
    return [WORDS[i % len(WORDS)] for i in range(n)]


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
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        n = spec.output_tokens
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            n = min(n, limit)
        return n

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
        n_choices = _choices(body)
        length = self._length(body, spec)
        text = "".join(_answer_tokens(length)).lstrip()
        if call.endpoint == "completions":
            choices: list[dict[str, Any]] = [
                {"index": i, "text": text, "logprobs": None, "finish_reason": "length"
                 if length < spec.output_tokens else "stop"} for i in range(n_choices)]
            obj, cid = "text_completion", "cmpl-sim"
        else:
            message = _message(body, text)
            finish = "tool_calls" if message.get("tool_calls") else _finish(body, length, spec)
            choices = [{"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                       for i in range(n_choices)]
            obj, cid = "chat.completion", "chatcmpl-sim"
        completion_tokens = length * n_choices
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
        spec = self._spec(call.deployment)
        self._maybe_fail(call.deployment, spec)
        body = call.body
        model = call.deployment.upstream_model
        prompt_tokens = count_prompt(body, call.endpoint, model)
        length = self._length(body, spec)
        created = int(time.time())
        cid = f"chatcmpl-sim-{created}-{self._calls.get(call.deployment.id, 0)}"
        chat = call.endpoint == "chat"
        gap = 1.0 / spec.tokens_per_second if spec.tokens_per_second > 0 else 0.0
        if spec.ttft_ms:
            await asyncio.sleep(spec.ttft_ms / 1000)

        def chunk(delta: dict[str, Any], finish: str | None, index: int = 0) -> dict[str, Any]:
            if chat:
                choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None,
                                          "finish_reason": finish}
                return {"id": cid, "object": "chat.completion.chunk", "created": created,
                        "model": model, "choices": [choice]}
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": index, "text": delta.get("content", ""),
                                 "logprobs": None, "finish_reason": finish}]}

        tool = _tool_call(body) if chat else None
        if tool is not None:
            yield chunk({"role": "assistant", "content": None, "tool_calls": [
                {"index": 0, "id": tool["id"], "type": "function",
                 "function": {"name": tool["function"]["name"], "arguments": ""}}]}, None)
            yield chunk({"tool_calls": [{"index": 0, "function": {
                "arguments": tool["function"]["arguments"]}}]}, "tool_calls")
        else:
            if chat:
                yield chunk({"role": "assistant", "content": ""}, None)
            words = _answer_tokens(length)
            words[0] = words[0].lstrip()
            for i, word in enumerate(words):
                if spec.fail_after_tokens and i >= spec.fail_after_tokens:
                    raise UpstreamError(f"deployment {call.deployment.id}: simulated stream cut")
                if gap and i:
                    await asyncio.sleep(gap)
                last = i == len(words) - 1
                yield chunk({"content": word}, _finish(body, length, spec) if last else None)
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": length,
                                     "total_tokens": prompt_tokens + length}
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


def _finish(body: dict[str, Any], length: int, spec: SimulatedSpec) -> str:
    return "length" if length < spec.output_tokens else "stop"


def _tool_call(body: dict[str, Any]) -> dict[str, Any] | None:
    """Call the first (or the forced) tool when the conversation awaits one."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    messages = body.get("messages")
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "tool":
        return None
    name = None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
    if name is None and isinstance(tools[0], dict) and isinstance(tools[0].get("function"), dict):
        name = tools[0]["function"].get("name")
    if not isinstance(name, str):
        return None
    return {"id": "call_sim_0", "type": "function",
            "function": {"name": name, "arguments": '{"query": "simulated"}'}}


def _message(body: dict[str, Any], text: str) -> dict[str, Any]:
    tool = _tool_call(body)
    if tool is not None:
        return {"role": "assistant", "content": None, "tool_calls": [tool], "refusal": None}
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        text = orjson.dumps({"answer": text}).decode()
    return {"role": "assistant", "content": text, "refusal": None}


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
