#!/usr/bin/env python3
"""Mock OpenAI-compatible upstream for benchmarks and tests (loopback use).

Raw asyncio Protocol + httptools (+ uvloop when installed); no web framework, so
one core serves tens of thousands of small requests per second.

    python bench/mock_upstream.py --port 18080 [--latency-ms 0] [--chunks 20]
                                  [--chunk-delay-ms 0] [--completion-tokens 16]

API endpoints (any path prefix, e.g. /v1):
    POST .../chat/completions   chat.completion / SSE chat.completion.chunk
    POST .../completions        legacy text_completion (SSE too)
    POST .../embeddings         deterministic small vectors (float or base64)
    POST .../messages           Anthropic Messages: message / SSE message_start ...
                                message_stop (no data: [DONE])
    POST .../responses          OpenAI Responses: response / SSE response.created ...
                                response.completed (no data: [DONE])
    GET  .../models[/<id>]      model list / one model
Control endpoints (exact paths, never logged nor counted in "total"):
    GET  /health                200 {"status":"ok"}
    GET  /_stats                counters (per endpoint, total, streams, statuses)
    GET  /_requests             the last 200 API requests: method, path,
                                headers (lower-case names), parsed JSON body
    POST /_reset                clear counters and the request log

Behaviour knobs, per request; the most specific source wins:
    request header  >  token in the model name  >  process default (CLI flag)

    header                       model token   meaning
    x-mock-latency-ms: N         latN          delay before the response / first chunk
    x-mock-chunks: N             chunksN       content chunks in a stream
    x-mock-chunk-delay-ms: N     delayN        delay between stream chunks
    x-mock-status: NNN           statusNNN     answer NNN with an OpenAI error body
    x-mock-usage: none           nousage       no usage (JSON) / no usage chunk (SSE)
    x-mock-cut-after: N          cutN          stream: N content chunks, then abort
    x-mock-cached-tokens: N      cachedN       prompt_tokens_details.cached_tokens
    x-mock-reasoning-tokens: N   reasoningN    completion_tokens_details.reasoning_tokens
    x-mock-completion-tokens: N  tokensN       completion tokens (non-streaming)
    x-mock-context-window: N     ctxN          chat: a prompt over N tokens gets 400
                                               context_length_exceeded
    x-mock-prefix-cache: N       apcN          automatic prefix caching in blocks of N
                                               words (chat; see "Prefix caching" below)
    x-mock-fault: NAME           NAME          a broken upstream (chat and completions; see
                                               "Faults" below)

Faults (model token or x-mock-fault; the fault-matrix tests drive them):
    reset       the connection is reset (RST) once the request is read
    badjson     200 application/json whose body is not JSON (cut inside an object)
    plainjson   a stream request answered with the plain JSON body (as if "stream" were ignored)
    hang        the request is read and nothing is ever sent (not even headers)
    drip        200 with content-length, then the body one byte every 0.3 s (stream: SSE frames, same pace)
    garbage     200 text/event-stream whose events are not chunks: bad JSON, lists, unknown fields, binary
                bytes, an over-long line, then [DONE]; a usage chunk only where the request asked for one

Model tokens are the parts of the model name split on anything that is not a
letter or digit, e.g. "mock-lat0-chunks20-delay5" or "mock-cached40-reasoning7".

Token accounting (deterministic, no tokenizer):
    chat prompt_tokens   = 3 + sum over messages of (3 + words in the message's
                           text content); a text part counts its words, any
                           other content part (image, audio, ...) counts 85
    legacy prompt_tokens = words in the prompt string(s) (token arrays: their
                           length), at least 1
    embeddings           = the same rule as legacy, over all inputs
    completion_tokens    = non-streaming: tokensN words per choice (capped by
                           max_tokens / max_completion_tokens, finish_reason
                           "length" when capped) + reasoning tokens;
                           streaming: the number of content chunks sent
                           (chunksN, same cap) + reasoning tokens;
                           a tool call answer: tokensN + reasoning tokens
    cached_tokens        = cachedN, never more than prompt_tokens
Words are whitespace-separated (str.split()).

Prefix caching (apcN, like vLLM's automatic prefix caching or OpenAI's): the
words of a chat request's messages (text content, in order) are cut into
blocks of N; each full block is identified by a hash chained over the model
name and every block before it. cached_tokens is N times the number of leading
blocks already seen (by any earlier request, since start or /_reset), then
every full block of this request is remembered (no eviction; up to 1M blocks,
then the memory starts over). A partial last block is never cached. Such
answers are never reused from the mock's own answer memo.

Tools: when the request has "tools", tool_choice is not "none" and the last
message is not a tool result, the answer is a call to the first tool (or the
one named by tool_choice) with arguments {"q": "mock"}; streams send it in two
delta chunks (name, then arguments) followed by finish_reason "tool_calls".

Anthropic Messages (/messages): input_tokens follow the chat rule with the
system prompt counted as one more message (input_tokens is the uncached part,
cachedN goes to cache_read_input_tokens); output_tokens as completion_tokens
above, capped by max_tokens (stop_reason "max_tokens", else "end_turn"); usage is
always sent, as Anthropic does (nousage does not apply); statusNNN answers in
Anthropic's envelope {"type":"error","error":{"type","message"}}. Streams:
message_start (input usage), content_block_start, one content_block_delta per
word, content_block_stop, message_delta (stop_reason, output_tokens),
message_stop. With "tools" (tool_choice not {"type":"none"}, the last message
not a tool_result) the answer is a tool_use block of the first (or the forced)
tool with input {"q": "mock"}, streamed as one input_json_delta.

OpenAI Responses (/responses): input_tokens follow the chat rule over the input
items (a string input is one message) plus instructions as one more message;
cachedN and reasoningN fill input_tokens_details / output_tokens_details;
max_output_tokens caps the answer (status "incomplete", incomplete_details
{"reason": "max_output_tokens"}); nousage sends "usage": null. Streams:
response.created, response.in_progress, response.output_item.added,
response.content_part.added, one response.output_text.delta per word, the
.done events, then response.completed (response.incomplete when capped) with
the whole response and usage; every event has sequence_number. With a
function tool (tool_choice not "none", the last input item not a
function_call_output) the answer is a function_call item with arguments
{"q": "mock"}, streamed as one response.function_call_arguments.delta.
Both follow latN, chunksN, delayN and cutN (N deltas, then abort) like chat;
ctxN and apcN are chat only.

Streams are chunked transfer encoding: a role chunk, then one chunk per word
(the last carries finish_reason "stop"), then a usage chunk with "choices": []
only if the request asked for stream_options.include_usage, then data: [DONE].
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import functools
import gc
import hashlib
import re
import signal
import socket
import struct
import sys
import time
import zlib
from http import HTTPStatus
from typing import Any

import httptools
import orjson

try:
    import uvloop
except ImportError:  # pragma: no cover - the mock still works on plain asyncio
    uvloop = None

LOG_SIZE = 200
VOCAB = ("Mock", "answer", "from", "the", "benchmark", "upstream", "with", "plain", "words", "and",
         "steady", "timing", "for", "every", "request", "it", "serves", "over", "loopback", "today")
DEFAULT_EMBED_DIM = 8
MAX_EMBED_DIM = 4096
NON_TEXT_PART_TOKENS = 85

_TOKEN_RE = re.compile(r"^(lat|chunks|delay|status|cut|cached|reasoning|tokens|ctx|apc)(\d+)$")
_SPLIT_RE = re.compile(r"[^a-z0-9]+")
_HEADER_KNOBS = {
    b"x-mock-latency-ms": "latency_ms",
    b"x-mock-chunks": "chunks",
    b"x-mock-chunk-delay-ms": "chunk_delay_ms",
    b"x-mock-status": "status",
    b"x-mock-usage": "usage",
    b"x-mock-cut-after": "cut",
    b"x-mock-cached-tokens": "cached",
    b"x-mock-reasoning-tokens": "reasoning",
    b"x-mock-completion-tokens": "tokens",
    b"x-mock-context-window": "context",
    b"x-mock-prefix-cache": "apc",
    b"x-mock-fault": "fault",
}
_MODEL_KNOBS = {"lat": "latency_ms", "chunks": "chunks", "delay": "chunk_delay_ms", "status": "status",
                "cut": "cut", "cached": "cached", "reasoning": "reasoning", "tokens": "tokens", "ctx": "context",
                "apc": "apc"}
_FLOAT_KNOBS = ("latency_ms", "chunk_delay_ms")
FAULTS = ("reset", "badjson", "plainjson", "hang", "drip", "garbage")
DRIP_S = 0.3

ENDPOINTS = ("chat.completions", "completions", "embeddings", "messages", "responses", "models", "other")


class MockError(Exception):
    def __init__(self, status: int, message: str, etype: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.etype, self.code, self.param = status, message, etype, code, param


# ---------------------------------------------------------------------------
# process state


class State:
    def __init__(self, defaults: dict[str, Any]) -> None:
        self.defaults = defaults
        self.model_cache: dict[str, dict[str, Any]] = {}
        # (method, endpoint, raw body, knob headers) -> prepared answer; valid for the second it was built in
        self.answers: dict[tuple[bytes, str, bytes, Any], tuple[Any, ...]] = {}
        # raw entries; bodies are parsed only when /_requests asks
        self.log: collections.deque[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]] = \
            collections.deque(maxlen=LOG_SIZE)
        self.seq = 0
        self.prefix_blocks: set[bytes] = set()   # chained hashes of the prompt blocks seen (apcN)
        self.reset()

    def reset(self) -> None:
        self.faults: dict[str, int] = {}
        self.endpoints = dict.fromkeys(ENDPOINTS, 0)
        self.control = 0
        self.total = 0
        self.streams = 0
        self.streams_completed = 0
        self.streams_cut = 0
        self.client_disconnects = 0
        self.statuses: dict[int, int] = {}
        self.started = time.time()
        self.log.clear()
        self.prefix_blocks.clear()

    def prefix_cached(self, model: str, messages: Any, block: int) -> int:
        """Words of this prompt's leading full blocks seen before; remembers every full block."""
        words: list[str] = []
        for m in messages if isinstance(messages, list) else ():
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                words.extend(c.split())
            elif isinstance(c, list):
                for part in c:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        words.extend(part["text"].split())
        if len(self.prefix_blocks) > 1_000_000:
            self.prefix_blocks.clear()
        chain = hashlib.blake2b(model.encode(), digest_size=16).digest()
        cached, leading = 0, True
        for start in range(0, len(words) - block + 1, block):
            chain = hashlib.blake2b(chain + " ".join(words[start:start + block]).encode(), digest_size=16).digest()
            if leading and chain in self.prefix_blocks:
                cached += block
            else:
                leading = False
                self.prefix_blocks.add(chain)
        return cached

    def stats(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "endpoints": dict(self.endpoints),
            "streams": self.streams,
            "streams_completed": self.streams_completed,
            "faults": dict(self.faults),
            "streams_cut": self.streams_cut,
            "client_disconnects": self.client_disconnects,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "control_requests": self.control,
            "since": self.started,
        }

    def requests(self) -> list[dict[str, Any]]:
        out = []
        for method, path, headers, body in self.log:
            hd: dict[str, str] = {}
            for k, v in headers:
                name, value = k.decode("latin-1"), v.decode("latin-1")
                hd[name] = f"{hd[name]}, {value}" if name in hd else value
            entry: dict[str, Any] = {"method": method.decode(), "path": path.decode("latin-1"), "headers": hd,
                                     "body": None}
            if body:
                try:
                    entry["body"] = orjson.loads(body)
                except orjson.JSONDecodeError:
                    entry["body_text"] = body.decode("utf-8", "replace")
            out.append(entry)
        return out

    def model_knobs(self, model: str) -> dict[str, Any]:
        knobs = self.model_cache.get(model)
        if knobs is None:
            knobs = {}
            for part in _SPLIT_RE.split(model.lower()):
                if part == "nousage":
                    knobs["usage"] = False
                    continue
                if part in FAULTS:
                    knobs["fault"] = part
                    continue
                m = _TOKEN_RE.match(part)
                if m:
                    knobs[_MODEL_KNOBS[m.group(1)]] = int(m.group(2))
            if len(self.model_cache) > 10000:
                self.model_cache.clear()
            self.model_cache[model] = knobs
        return knobs

    def knobs(self, model: str, headers: dict[str, bytes] | None) -> dict[str, Any]:
        k = dict(self.defaults)
        mk = self.model_knobs(model)
        if mk:
            k.update(mk)
        if headers:
            for name, raw in headers.items():
                key = _HEADER_KNOBS[name]
                text = raw.decode("latin-1").strip()
                if key == "usage":
                    k["usage"] = text.lower() not in ("none", "0", "false", "off", "no")
                    continue
                if key == "fault":
                    if text not in FAULTS:
                        raise MockError(400, f"mock: unknown fault {text!r}", code="mock_bad_header")
                    k["fault"] = text
                    continue
                try:
                    val = float(text) if key in _FLOAT_KNOBS else int(text)
                except ValueError:
                    raise MockError(400, f"mock: bad value for {name.decode()}: {text!r}",
                                    code="mock_bad_header") from None
                if val < 0:
                    raise MockError(400, f"mock: negative value for {name.decode()}", code="mock_bad_header")
                k[key] = val
        return k

    def next_id(self) -> int:
        self.seq += 1
        return self.seq


# ---------------------------------------------------------------------------
# token counting and payloads


def _words(text: str) -> int:
    return len(text.split())


def chat_prompt_tokens(messages: Any) -> int:
    n = 3
    if not isinstance(messages, list):
        return n
    for m in messages:
        n += 3
        if not isinstance(m, dict):
            continue
        c = m.get("content")
        if isinstance(c, str):
            n += _words(c)
        elif isinstance(c, list):
            for part in c:
                if isinstance(part, dict):
                    t = part.get("text")
                    n += _words(t) if isinstance(t, str) else NON_TEXT_PART_TOKENS
                elif isinstance(part, str):
                    n += _words(part)
    return n


def text_prompt_tokens(prompt: Any) -> int:
    if isinstance(prompt, str):
        n = _words(prompt)
    elif isinstance(prompt, list):
        n = 0
        for p in prompt:
            if isinstance(p, str):
                n += _words(p)
            elif isinstance(p, int):
                n += 1
            elif isinstance(p, list):
                n += len(p)
    else:
        n = 0
    return max(n, 1)


@functools.lru_cache(maxsize=256)
def answer_words(count: int) -> tuple[str, ...]:
    """count words: 'Mock', ' answer', ' from', ... (each streamed word is one chunk)."""
    return tuple(VOCAB[i % len(VOCAB)] if i == 0 else " " + VOCAB[i % len(VOCAB)] for i in range(count))


def usage_block(prompt: int, completion: int, cached: int, reasoning: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": min(cached, prompt), "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }


def error_body(status: int) -> tuple[bytes, list[tuple[str, str]]]:
    extra: list[tuple[str, str]] = []
    etype, code = "server_error", None
    if status == 400:
        etype, code = "invalid_request_error", "context_length_exceeded"
    elif status == 429:
        extra.append(("retry-after", "1"))
    body = orjson.dumps({"error": {"message": "mock failure", "type": etype, "code": code, "param": None}})
    return body, extra


def tool_call_wanted(body: dict[str, Any]) -> dict[str, Any] | None:
    """The tool the mock answers with, or None for a plain text answer."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    choice = body.get("tool_choice")
    if choice == "none":
        return None
    msgs = body.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") in ("tool", "function"):
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        for t in tools:
            if isinstance(t, dict) and (t.get("function") or {}).get("name") == name:
                return t
    first = tools[0]
    return first if isinstance(first, dict) else None


def tool_name(tool: dict[str, Any]) -> str:
    fn = tool.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) else "tool"


TOOL_ARGS = '{"q": "mock"}'
# placeholder for the per-request sequence number in a prepared JSON answer
RID = "@@rid@@"
RID_MARK = RID.encode()


def cap_tokens(body: dict[str, Any], wanted: int) -> tuple[int, bool]:
    """(tokens, capped): honour max_tokens / max_completion_tokens."""
    cap = body.get("max_completion_tokens")
    if not isinstance(cap, int) or isinstance(cap, bool):
        cap = body.get("max_tokens")
    if isinstance(cap, int) and not isinstance(cap, bool) and 0 <= cap < wanted:
        return cap, True
    return wanted, False


def embedding_vector(text: str, index: int, dim: int) -> list[float]:
    seed = zlib.crc32(text.encode("utf-8")) ^ (index * 0x9E3779B1 & 0xFFFFFFFF)
    out = []
    x = seed or 1
    for _ in range(dim):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out.append(round(x / 0x7FFFFFFF * 2.0 - 1.0, 6))
    return out


# ---------------------------------------------------------------------------
# HTTP framing

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
             b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n")
_DONE = b"data: [DONE]\n\n"
_DONE_FRAME = b"%x\r\n%s\r\n" % (len(_DONE), _DONE)
_LAST_CHUNK = b"0\r\n\r\n"


def http_response(status: int, body: bytes, keep_alive: bool,
                  extra: list[tuple[str, str]] | None = None,
                  content_type: bytes = b"application/json") -> bytes:
    head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n" % (
        status, _REASONS.get(status, "Status").encode(), content_type, len(body))
    if extra:
        head += "".join(f"{k}: {v}\r\n" for k, v in extra).encode("latin-1")
    if not keep_alive:
        head += b"connection: close\r\n"
    return head + b"\r\n" + body


def sse_frame(obj: Any) -> bytes:
    data = b"data: " + orjson.dumps(obj) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def json_error(status: int, message: str, etype: str = "invalid_request_error",
               code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": etype, "code": code, "param": param}})


# ---------------------------------------------------------------------------
# Anthropic Messages and OpenAI Responses payloads


ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         529: "overloaded_error"}


def anthropic_error_body(status: int) -> tuple[bytes, list[tuple[str, str]]]:
    """statusNNN on /messages: Anthropic's error envelope (429 adds retry-after: 1)."""
    extra = [("retry-after", "1")] if status == 429 else []
    etype = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return orjson.dumps({"type": "error", "error": {"type": etype, "message": "mock failure"}}), extra


def _system_tokens(system: Any) -> int:
    """An instructions / system prompt counted as one more message (3 + its words); 0 when absent."""
    if isinstance(system, str) and system:
        return 3 + _words(system)
    if isinstance(system, list) and system:
        return 3 + sum(_words(b["text"]) for b in system if isinstance(b, dict) and isinstance(b.get("text"), str))
    return 0


def messages_prompt_tokens(body: dict[str, Any]) -> int:
    """The chat rule over ``messages`` plus the ``system`` prompt as one more message."""
    return chat_prompt_tokens(body.get("messages")) + _system_tokens(body.get("system"))


def responses_prompt_tokens(body: dict[str, Any]) -> int:
    """The chat rule over the input items (a string input is one message) plus ``instructions``."""
    inp = body.get("input")
    items = [{"role": "user", "content": inp}] if isinstance(inp, str) else inp
    return chat_prompt_tokens(items) + _system_tokens(body.get("instructions"))


def cap_field(body: dict[str, Any], field: str, wanted: int) -> tuple[int, bool]:
    """(tokens, capped) by one output-cap field (max_tokens for Messages, max_output_tokens for Responses)."""
    cap = body.get(field)
    if isinstance(cap, int) and not isinstance(cap, bool) and 0 <= cap < wanted:
        return cap, True
    return wanted, False


def messages_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The Anthropic tool the mock calls, or None (no tools, tool_choice none, or a tool_result to answer)."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "none":
        return None
    msgs = body.get("messages")
    last = msgs[-1] if isinstance(msgs, list) and msgs else None
    if isinstance(last, dict) and isinstance(last.get("content"), list) and any(
            isinstance(b, dict) and b.get("type") == "tool_result" for b in last["content"]):
        return None
    named = [t for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]
    if isinstance(choice, dict) and choice.get("type") == "tool":
        named = [t for t in named if t["name"] == choice.get("name")] or named
    return named[0] if named else None


def responses_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The Responses function tool the mock calls, or None (none offered, tool_choice none, or the
    last input item a function_call_output)."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return None
    choice = body.get("tool_choice")
    if choice == "none":
        return None
    inp = body.get("input")
    if isinstance(inp, list) and inp and isinstance(inp[-1], dict) and inp[-1].get("type") == "function_call_output":
        return None
    fns = [t for t in tools if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("name"), str)]
    if isinstance(choice, dict) and choice.get("type") == "function":
        fns = [t for t in fns if t["name"] == choice.get("name")] or fns
    return fns[0] if fns else None


def messages_usage(prompt: int, output: int, cached: int) -> dict[str, Any]:
    cached = min(cached, prompt)
    return {"input_tokens": prompt - cached, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
            "output_tokens": output}


def responses_usage(prompt: int, output: int, cached: int, reasoning: int) -> dict[str, Any]:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": min(cached, prompt)},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + output}


def messages_payload(body: dict[str, Any], model: str, k: dict[str, Any], rid: str = RID) -> dict[str, Any]:
    """A non-streaming Anthropic Message (usage always present, as Anthropic sends it)."""
    tool = messages_tool(body)
    if tool is not None:
        content: list[dict[str, Any]] = [{"type": "tool_use", "id": f"toolu_mock{rid}", "name": tool["name"],
                                          "input": orjson.loads(TOOL_ARGS)}]
        output, stop = k["tokens"], "tool_use"
    else:
        count, capped = cap_field(body, "max_tokens", k["tokens"])
        content = [{"type": "text", "text": "".join(answer_words(count))}]
        output, stop = count, "max_tokens" if capped else "end_turn"
    return {"id": f"msg_mock{rid}", "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop, "stop_sequence": None,
            "usage": messages_usage(messages_prompt_tokens(body), output + k["reasoning"], k["cached"])}


def responses_envelope(body: dict[str, Any], model: str, rid: str, now: int) -> dict[str, Any]:
    """The fields of a Response other than status, output and usage."""
    return {"id": f"resp_mock{rid}", "object": "response", "created_at": now, "status": "in_progress",
            "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": model, "output": [],
            "parallel_tool_calls": True, "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None}, "store": body.get("store", True) is not False,
            "temperature": body.get("temperature", 1.0), "text": {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools", []),
            "top_p": body.get("top_p", 1.0), "truncation": "disabled", "usage": None, "user": body.get("user"),
            "metadata": body.get("metadata") or {}}


def _message_item(rid: str, text: str) -> dict[str, Any]:
    return {"id": f"msg_mock{rid}", "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(rid: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"id": f"fc_mock{rid}", "type": "function_call", "status": status, "call_id": f"call_mock{rid}",
            "name": name, "arguments": arguments}


def responses_payload(body: dict[str, Any], model: str, k: dict[str, Any], now: int,
                      rid: str = RID) -> dict[str, Any]:
    """A non-streaming Response: one message (or function call) item; status incomplete when
    max_output_tokens cut the answer."""
    out = responses_envelope(body, model, rid, now)
    tool = responses_tool(body)
    reasoning = k["reasoning"]
    if tool is not None:
        out["output"], output = [_call_item(rid, tool["name"], TOOL_ARGS)], k["tokens"]
        out["status"] = "completed"
    else:
        count, capped = cap_field(body, "max_output_tokens", k["tokens"])
        out["output"], output = [_message_item(rid, "".join(answer_words(count)))], count
        out["status"] = "incomplete" if capped else "completed"
        if capped:
            out["incomplete_details"] = {"reason": "max_output_tokens"}
    if k["usage"]:
        out["usage"] = responses_usage(responses_prompt_tokens(body), output + reasoning, k["cached"], reasoning)
    return out


def sse_event(kind: str, obj: Any) -> bytes:
    """One chunk holding one named server-sent event (``event: kind`` then ``data: {json}``)."""
    data = b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


# (opening frames, one frame per paced delta, closing frames): a stream that is not chat completions
EventPlan = tuple[list[bytes], list[bytes], list[bytes]]


def stream_events(endpoint: str, body: dict[str, Any], model: str, k: dict[str, Any], seq: int) -> EventPlan:
    return messages_events(body, model, k, str(seq)) if endpoint == "messages" \
        else responses_events(body, model, k, str(seq))


def messages_events(body: dict[str, Any], model: str, k: dict[str, Any], rid: str) -> EventPlan:
    """message_start (input usage), content_block_start, one content_block_delta per word (or the
    tool call's input JSON), content_block_stop, message_delta (stop_reason, output usage), message_stop."""
    prompt = messages_prompt_tokens(body)
    start = {"type": "message_start", "message": {
        "id": f"msg_mock{rid}", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": messages_usage(prompt, 1, k["cached"])}}
    tool = messages_tool(body)
    if tool is not None:
        block: dict[str, Any] = {"type": "tool_use", "id": f"toolu_mock{rid}", "name": tool["name"], "input": {}}
        deltas = [{"type": "input_json_delta", "partial_json": TOOL_ARGS}]
        output, stop = k["tokens"], "tool_use"
    else:
        count, capped = cap_field(body, "max_tokens", k["chunks"])
        block = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": w} for w in answer_words(count)]
        output, stop = count, "max_tokens" if capped else "end_turn"
    usage = messages_usage(prompt, output + k["reasoning"], k["cached"])
    return ([sse_event("message_start", start),
             sse_event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})],
            [sse_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d})
             for d in deltas],
            [sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
             sse_event("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": stop, "stop_sequence": None},
                                         "usage": {"output_tokens": usage["output_tokens"]}}),
             sse_event("message_stop", {"type": "message_stop"})])


def responses_events(body: dict[str, Any], model: str, k: dict[str, Any], rid: str) -> EventPlan:
    """response.created, response.in_progress, output_item.added (+ content_part.added), one delta per
    word (or the call's arguments), the .done events, response.completed (or .incomplete) with usage."""
    now = int(time.time())
    final = responses_payload(body, model, k, now, rid)
    env = {**final, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    item = final["output"][0]
    seq = iter(range(1 << 30))

    def ev(kind: str, **fields: Any) -> bytes:
        return sse_event(kind, {"type": kind, "sequence_number": next(seq), **fields})

    opening = [ev("response.created", response=env), ev("response.in_progress", response=env)]
    where = {"item_id": item["id"], "output_index": 0}
    if item["type"] == "function_call":
        opening.append(ev("response.output_item.added", output_index=0,
                          item=_call_item(rid, item["name"], "", "in_progress")))
        deltas = [ev("response.function_call_arguments.delta", **where, delta=TOOL_ARGS)]
        closing = [ev("response.function_call_arguments.done", **where, arguments=TOOL_ARGS)]
    else:
        part = {"type": "output_text", "text": "", "annotations": []}
        opening += [ev("response.output_item.added", output_index=0,
                       item={**item, "status": "in_progress", "content": []}),
                    ev("response.content_part.added", **where, content_index=0, part=part)]
        count, capped = cap_field(body, "max_output_tokens", k["chunks"])   # streams: chunksN words
        final["status"] = "incomplete" if capped else "completed"
        final["incomplete_details"] = {"reason": "max_output_tokens"} if capped else None
        words = answer_words(count)
        deltas = [ev("response.output_text.delta", **where, content_index=0, delta=w) for w in words]
        text = "".join(words)
        item = {**item, "content": [{**part, "text": text}]}
        final["output"] = [item]
        if final["usage"] is not None:
            reasoning = k["reasoning"]
            final["usage"] = responses_usage(responses_prompt_tokens(body), count + reasoning, k["cached"], reasoning)
        closing = [ev("response.output_text.done", **where, content_index=0, text=text),
                   ev("response.content_part.done", **where, content_index=0, part=item["content"][0])]
    closing += [ev("response.output_item.done", output_index=0, item=item),
                ev("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                   response=final)]
    return opening, deltas, closing


# ---------------------------------------------------------------------------
# the protocol


class Request:
    __slots__ = ("method", "path", "headers", "body", "knob_headers", "keep_alive")

    def __init__(self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                 knob_headers: dict[bytes, bytes] | None, keep_alive: bool) -> None:
        self.method, self.path, self.headers, self.body = method, path, headers, body
        self.knob_headers, self.keep_alive = knob_headers, keep_alive


class MockProtocol(asyncio.Protocol):
    def __init__(self, state: State, loop: asyncio.AbstractEventLoop) -> None:
        self.state = state
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.busy = False
        self.pending: collections.deque[Request] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.write_ok: asyncio.Future[None] | None = None
        self.paused = False
        self.closed = False
        self.pace_slot = 0.0
        self._reset_message()

    # --- connection events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None and not self.task.done():
            self.state.client_disconnects += 1
            self.task.cancel()
        if self.write_ok is not None and not self.write_ok.done():
            self.write_ok.set_result(None)
        self.pending.clear()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.write_ok is not None and not self.write_ok.done():
            self.write_ok.set_result(None)

    async def drain(self) -> None:
        if self.paused and not self.closed:
            self.write_ok = self.loop.create_future()
            await self.write_ok

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fatal(400, "upgrade not supported")
        except httptools.HttpParserError as exc:
            self._fatal(400, f"bad request: {exc}")

    def _fatal(self, status: int, message: str) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(http_response(status, json_error(status, message), False))
            self.transport.close()
        self.closed = True

    # --- parser callbacks
    def _reset_message(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body_parts: list[bytes] = []
        self.knob_headers: dict[bytes, bytes] | None = None

    def on_message_begin(self) -> None:
        self._reset_message()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self.headers.append((name, value))
        if name.startswith(b"x-mock-") and name in _HEADER_KNOBS:
            if self.knob_headers is None:
                self.knob_headers = {}
            self.knob_headers[name] = value
        elif name == b"expect" and value.lower() == b"100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body_parts.append(body)

    def on_message_complete(self) -> None:
        parts = self.body_parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        path = self.url
        q = path.find(b"?")
        if q >= 0:
            path = path[:q]
        req = Request(self.parser.get_method(), path, self.headers, body, self.knob_headers,
                      self.parser.should_keep_alive())
        self._reset_message()
        if self.busy or self.closed:
            if not self.closed:
                self.pending.append(req)
            return
        self.handle(req)

    # --- dispatch
    def _send(self, data: bytes, keep_alive: bool) -> None:
        if self.closed or self.transport is None:
            return
        self.transport.write(data)
        if not keep_alive:
            self.transport.close()
            self.closed = True

    def _done_async(self) -> None:
        """An async response finished: serve what was pipelined meanwhile."""
        self.busy = False
        self.timer = None
        self.task = None
        while self.pending and not self.busy and not self.closed:
            self.handle(self.pending.popleft())

    def handle(self, req: Request) -> None:
        st = self.state
        path, method = req.path, req.method
        # control endpoints
        if path == b"/health":
            st.control += 1
            return self._send(http_response(200, b'{"status":"ok"}', req.keep_alive), req.keep_alive)
        if path[:2] == b"/_":
            st.control += 1
            if path == b"/_stats" and method == b"GET":
                return self._send(http_response(200, orjson.dumps(st.stats()), req.keep_alive), req.keep_alive)
            if path == b"/_requests" and method == b"GET":
                return self._send(http_response(200, orjson.dumps(st.requests()), req.keep_alive), req.keep_alive)
            if path == b"/_reset" and method == b"POST":
                st.reset()
                return self._send(http_response(200, b'{"reset":true}', req.keep_alive), req.keep_alive)
            return self._send(http_response(404, json_error(404, "unknown control endpoint", code="not_found"),
                                            req.keep_alive), req.keep_alive)
        # API endpoints
        st.total += 1
        if path.endswith(b"/chat/completions"):
            endpoint = "chat.completions"
        elif path.endswith(b"/completions"):
            endpoint = "completions"
        elif path.endswith(b"/embeddings"):
            endpoint = "embeddings"
        elif path.endswith(b"/messages"):
            endpoint = "messages"
        elif path.endswith(b"/responses"):
            endpoint = "responses"
        elif path.endswith(b"/models") or b"/models/" in path:
            endpoint = "models"
        else:
            endpoint = "other"
        st.endpoints[endpoint] += 1
        st.log.append((method, path, req.headers, req.body))
        try:
            self._api(req, endpoint)
        except MockError as exc:
            st.statuses[exc.status] = st.statuses.get(exc.status, 0) + 1
            self._send(http_response(exc.status, json_error(exc.status, exc.message, exc.etype, exc.code, exc.param),
                                     req.keep_alive), req.keep_alive)

    def _api(self, req: Request, endpoint: str) -> None:
        st = self.state
        now = int(time.time())
        kh = req.knob_headers
        key = (req.method, endpoint, req.body, None if kh is None else tuple(sorted(kh.items())))
        answer = st.answers.get(key)
        if answer is None or answer[0] != now:
            answer, reusable = self._prepare(req, endpoint, now)
            if reusable and answer[1] != "models" and len(req.body) <= 65536:
                if len(st.answers) > 4096:
                    st.answers.clear()
                st.answers[key] = answer
        kind = answer[1]
        if kind == "json":  # (created, "json", status, pieces, extra, delay)
            _, _, status, pieces, extra, delay = answer
            st.statuses[status] = st.statuses.get(status, 0) + 1
            data = pieces[0] if len(pieces) == 1 else (b"%d" % st.next_id()).join(pieces)
            return self._respond(http_response(status, data, req.keep_alive, extra), req.keep_alive, delay)
        if kind == "stream":  # (created, "stream", endpoint, body, model, knobs)
            _, _, ep, body, model, knobs = answer
            st.statuses[200] = st.statuses.get(200, 0) + 1
            st.streams += 1
            self.busy = True
            if ep == "chat.completions":
                coro = self._stream_chat(req, body, model, knobs)
            elif ep == "completions":
                coro = self._stream_text(req, body, model, knobs)
            else:
                coro = self._stream_events(req, stream_events(ep, body, model, knobs, self.state.next_id()),
                                           knobs)
            self.task = self.loop.create_task(coro)
            return None
        if kind == "fault":  # (created, "fault", name, endpoint, body, model, knobs)
            _, _, fault, ep, body, model, knobs = answer
            st.faults[fault] = st.faults.get(fault, 0) + 1
            self.busy = True
            self.task = self.loop.create_task(self._fault(req, fault, ep, body, model, knobs))
            return None
        return self._models(req)

    def _prepare(self, req: Request, endpoint: str, now: int) -> tuple[tuple[Any, ...], bool]:
        """The answer, and whether it depends only on (endpoint, body, knob headers) so it may be reused."""
        st = self.state
        if endpoint == "other":
            raise MockError(404, f"mock: no endpoint {req.path.decode('latin-1')}", code="not_found")
        if endpoint == "models":
            if req.method != b"GET":
                raise MockError(405, "mock: use GET", code="method_not_allowed")
            return (now, "models"), True
        if req.method != b"POST":
            raise MockError(405, "mock: use POST", code="method_not_allowed")
        if not req.body:
            raise MockError(400, "mock: empty request body", code="invalid_body")
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError:
            raise MockError(400, "mock: body is not JSON", code="invalid_body") from None
        if not isinstance(body, dict):
            raise MockError(400, "mock: body must be a JSON object", code="invalid_body")
        model = body.get("model")
        if not isinstance(model, str):
            model = "mock"
        knobs = st.knobs(model, req.knob_headers)
        delay = knobs["latency_ms"] / 1000.0
        status = knobs["status"]
        if status and status != 200:
            err, extra = anthropic_error_body(status) if endpoint == "messages" else error_body(status)
            return (now, "json", status, (err,), extra, delay), True
        window = knobs.get("context")
        if window and endpoint == "chat.completions" and chat_prompt_tokens(body.get("messages")) > window:
            err = json_error(400, f"mock: this model's maximum context length is {window} tokens",
                             code="context_length_exceeded", param="messages")
            return (now, "json", 400, (err,), None, delay), True
        fault = knobs.get("fault")
        if fault and fault != "plainjson" and endpoint != "embeddings":
            return (now, "fault", fault, endpoint, body, model, knobs), False
        reusable = True
        if knobs.get("apc") and endpoint == "chat.completions":   # depends on what came before: never reused
            knobs = {**knobs, "cached": st.prefix_cached(model, body.get("messages"), knobs["apc"])}
            reusable = False
        if body.get("stream") is True and endpoint != "embeddings" and fault != "plainjson":
            return (now, "stream", endpoint, body, model, knobs), reusable
        if endpoint == "chat.completions":
            payload = self._chat(body, model, knobs, now)
        elif endpoint == "completions":
            payload = self._text(body, model, knobs, now)
        elif endpoint == "messages":
            payload = messages_payload(body, model, knobs)
        elif endpoint == "responses":
            payload = responses_payload(body, model, knobs, now)
        else:
            payload = self._embeddings(body, model)
        return (now, "json", 200, tuple(orjson.dumps(payload).split(RID_MARK)), None, delay), reusable

    def _respond(self, data: bytes, keep_alive: bool, delay: float) -> None:
        if delay <= 0:
            return self._send(data, keep_alive)
        self.busy = True
        self.timer = self.loop.call_later(delay, self._delayed, data, keep_alive)

    def _delayed(self, data: bytes, keep_alive: bool) -> None:
        self._send(data, keep_alive)
        self._done_async()

    # --- payloads
    def _models(self, req: Request) -> None:
        ids = ["mock", "mock-lat0", "mock-lat50", "mock-lat0-chunks20-delay5", "mock-embed"]
        i = req.path.find(b"/models/")
        if i >= 0:
            mid = req.path[i + 8:].decode("latin-1")
            payload: Any = {"id": mid, "object": "model", "created": 0, "owned_by": "mock"}
        else:
            payload = {"object": "list",
                       "data": [{"id": m, "object": "model", "created": 0, "owned_by": "mock"} for m in ids]}
        self.state.statuses[200] = self.state.statuses.get(200, 0) + 1
        self._send(http_response(200, orjson.dumps(payload), req.keep_alive), req.keep_alive)

    def _chat(self, body: dict[str, Any], model: str, k: dict[str, Any], now: int) -> dict[str, Any]:
        prompt = chat_prompt_tokens(body.get("messages"))
        n = body.get("n")
        n = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 128 else 1
        reasoning = k["reasoning"]
        tool = tool_call_wanted(body)
        rid = RID
        choices = []
        if tool is not None:
            completion = k["tokens"] * n + reasoning
            for i in range(n):
                choices.append({"index": i, "message": {
                    "role": "assistant", "content": None, "refusal": None,
                    "tool_calls": [{"id": f"call_mock{rid}_{i}", "type": "function",
                                    "function": {"name": tool_name(tool), "arguments": TOOL_ARGS}}]},
                    "logprobs": None, "finish_reason": "tool_calls"})
        else:
            count, capped = cap_tokens(body, k["tokens"])
            text = "".join(answer_words(count))
            completion = count * n + reasoning
            finish = "length" if capped else "stop"
            for i in range(n):
                choices.append({"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                                "logprobs": None, "finish_reason": finish})
        out: dict[str, Any] = {"id": f"chatcmpl-mock{rid}", "object": "chat.completion",
                               "created": now, "model": model, "choices": choices,
                               "system_fingerprint": "fp_mock"}
        if k["usage"]:
            out["usage"] = usage_block(prompt, completion, k["cached"], reasoning)
        return out

    def _text(self, body: dict[str, Any], model: str, k: dict[str, Any], now: int) -> dict[str, Any]:
        prompt = text_prompt_tokens(body.get("prompt"))
        n = body.get("n")
        n = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 128 else 1
        count, capped = cap_tokens(body, k["tokens"])
        text = "".join(" " + w.lstrip() for w in answer_words(count))
        reasoning = k["reasoning"]
        out: dict[str, Any] = {
            "id": f"cmpl-mock{RID}", "object": "text_completion", "created": now,
            "model": model,
            "choices": [{"text": text, "index": i, "logprobs": None, "finish_reason": "length" if capped else "stop"}
                        for i in range(n)]}
        if k["usage"]:
            out["usage"] = usage_block(prompt, count * n + reasoning, k["cached"], reasoning)
        return out

    def _embeddings(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        inp = body.get("input")
        if isinstance(inp, str):
            items: list[Any] = [inp]
        elif isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp):
            items = [inp]
        elif isinstance(inp, list):
            items = inp
        else:
            raise MockError(400, "mock: input must be a string or a list", param="input", code="invalid_input")
        dim = body.get("dimensions")
        dim = dim if isinstance(dim, int) and not isinstance(dim, bool) and 1 <= dim <= MAX_EMBED_DIM \
            else DEFAULT_EMBED_DIM
        b64 = body.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(items):
            key = item if isinstance(item, str) else orjson.dumps(item).decode()
            vec = embedding_vector(key, i, dim)
            emb: Any = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = text_prompt_tokens(items)
        return {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # --- faults
    async def _fault(self, req: Request, fault: str, endpoint: str, body: dict[str, Any], model: str,
                     k: dict[str, Any]) -> None:
        try:
            await self._fault_inner(req, fault, endpoint, body, model, k)
        finally:
            self.task = None
            if not self.closed and fault != "hang":
                self._done_async()

    async def _fault_inner(self, req: Request, fault: str, endpoint: str, body: dict[str, Any], model: str,
                           k: dict[str, Any]) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        stream = body.get("stream") is True
        if fault == "hang":
            return                                   # busy for ever: the connection dies with its client
        if fault == "reset":
            sock = transport.get_extra_info("socket")
            if sock is not None:                     # linger 0: close() sends RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.closed = True
            transport.abort()
            return
        if fault == "badjson":
            data = b'{"id": "chatcmpl-bad", "object": "chat.completion", "choices": [{"index": 0, "mess'
            return self._send(http_response(200, data, req.keep_alive), req.keep_alive)
        if fault == "drip":
            if stream:
                frames = b"".join(sse_frame({"id": "chatcmpl-drip", "object": "chat.completion.chunk",
                                             "created": 0, "model": model,
                                             "choices": [{"index": 0, "delta": {"content": w},
                                                          "finish_reason": None}]})
                                  for w in answer_words(k["chunks"]))
                transport.write(_SSE_HEAD + b"\r\n")
                payload = frames
            else:
                payload = orjson.dumps(self._chat(body, model, k, int(time.time())) if endpoint == "chat.completions"
                                       else self._text(body, model, k, int(time.time())))
                transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                                % len(payload))
            for i in range(len(payload)):            # never finishes in any sane timeout
                if self.closed:
                    return
                transport.write(b"%x\r\n%s\r\n" % (1, payload[i:i + 1]) if stream else payload[i:i + 1])
                await asyncio.sleep(DRIP_S)
            return
        # garbage: an SSE stream of events that are not chunks
        base = {"id": "chatcmpl-garbage", "object": "chat.completion.chunk", "created": 0, "model": model}
        events = [b"data: {not json at all\n\n", b"data: [1, 2, 3]\n\n", b"data: \"a string\"\n\n",
                  b"event: ping\ndata: {}\n\n", b"data: {\"choices\": \"nope\"}\n\n",
                  b"data: {\"choices\": [{\"delta\": 7}]}\n\n", b"data: \xff\xfe\x00\x01binary\n\n",
                  b"data: " + b"x" * 70_000 + b"\n\n", b": a comment\n\n", b"retry: 10\n\n",
                  sse_frame({**base, "choices": [{"index": 0, "delta": {"content": "garbage"},
                                                  "finish_reason": "stop"}]})]
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage") is True:
            events.append(sse_frame({**base, "choices": [], "usage": usage_block(
                chat_prompt_tokens(body.get("messages")), 1, 0, 0)}))
        data = b"".join(events) + b"data: [DONE]\n\n"
        transport.write(_SSE_HEAD + b"\r\n" + b"%x\r\n%s\r\n" % (len(data), data) + _LAST_CHUNK)

    # --- streams
    async def _pace(self, parts: list[bytes], delay: float) -> None:
        """Write parts now, then wait until delay seconds after the previous chunk's slot.

        Chunks follow an absolute schedule (first write + i * delay), so timer
        overshoot does not accumulate over a stream.
        """
        if self.closed or self.transport is None:
            raise asyncio.CancelledError
        self.transport.write(b"".join(parts) if len(parts) > 1 else parts[0])
        await self.drain()
        if delay > 0:
            now = time.monotonic()
            slot = (self.pace_slot or now) + delay
            self.pace_slot = slot
            if slot > now:
                await asyncio.sleep(slot - now)

    async def _finish_stream(self, req: Request, tail: list[bytes], cut: bool, done: bool = True) -> None:
        st = self.state
        if self.closed or self.transport is None:
            return
        if tail:
            self.transport.write(b"".join(tail))
        if cut:
            # abort() drops unsent bytes: let the kernel take what was written first (bounded wait)
            for _ in range(1000):
                if self.transport.get_write_buffer_size() == 0:
                    break
                await asyncio.sleep(0.001)
            st.streams_cut += 1
            self.closed = True
            self.task = None
            self.transport.abort()
            return
        self.transport.write(_DONE_FRAME + _LAST_CHUNK if done else _LAST_CHUNK)
        st.streams_completed += 1
        if not req.keep_alive:
            self.transport.close()
            self.closed = True

    async def _stream_chat(self, req: Request, body: dict[str, Any], model: str, k: dict[str, Any]) -> None:
        try:
            await self._stream_chat_inner(req, body, model, k)
        finally:
            if not self.closed:
                self._done_async()

    async def _stream_chat_inner(self, req: Request, body: dict[str, Any], model: str, k: dict[str, Any]) -> None:
        self.pace_slot = 0.0
        if k["latency_ms"] > 0:
            await asyncio.sleep(k["latency_ms"] / 1000.0)
        rid = self.state.next_id()
        created = int(time.time())
        base = {"id": f"chatcmpl-mock{rid}", "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": "fp_mock"}

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            return sse_frame({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                   "finish_reason": finish}]})

        opts = body.get("stream_options")
        want_usage = k["usage"] and isinstance(opts, dict) and opts.get("include_usage") is True
        head = _SSE_HEAD + (b"" if req.keep_alive else b"connection: close\r\n") + b"\r\n"
        delay = k["chunk_delay_ms"] / 1000.0
        reasoning = k["reasoning"]
        prompt = chat_prompt_tokens(body.get("messages"))
        tool = tool_call_wanted(body)
        if tool is not None:
            call_id = f"call_mock{rid}_0"
            first = [head, chunk({"role": "assistant", "content": None, "refusal": None}, None),
                     chunk({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                            "function": {"name": tool_name(tool), "arguments": ""}}]}, None)]
            await self._pace(first, delay)
            await self._pace([chunk({"tool_calls": [{"index": 0, "function": {"arguments": TOOL_ARGS}}]}, None)],
                             delay)
            tail = [chunk({}, "tool_calls")]
            completion = k["tokens"] + reasoning
            if want_usage:
                tail.append(sse_frame({**base, "choices": [],
                                       "usage": usage_block(prompt, completion, k["cached"], reasoning)}))
            return await self._finish_stream(req, tail, False)
        count, capped = cap_tokens(body, k["chunks"])
        words = answer_words(count)
        cut = k["cut"]
        cut = cut if isinstance(cut, int) and cut >= 0 else None
        send = len(words) if cut is None else min(cut, len(words))
        role = chunk({"role": "assistant", "content": "", "refusal": None}, None)
        finish = "length" if capped else "stop"
        if send == 0:
            parts = [head, role]
            if cut is not None:
                return await self._finish_stream(req, parts, True)
            parts.append(chunk({}, finish))
            if want_usage:
                parts.append(sse_frame({**base, "choices": [],
                                        "usage": usage_block(prompt, reasoning, k["cached"], reasoning)}))
            return await self._finish_stream(req, parts, False)
        for i in range(send):
            last = i == len(words) - 1
            frame = chunk({"content": words[i]}, finish if last else None)
            parts = [head, role, frame] if i == 0 else [frame]
            if i == send - 1:  # no pause after the last chunk sent
                if self.closed or self.transport is None:
                    return
                tail = parts
                break
            await self._pace(parts, delay)
        if cut is not None:
            return await self._finish_stream(req, tail, True)
        if want_usage:
            tail.append(sse_frame({**base, "choices": [],
                                   "usage": usage_block(prompt, count + reasoning, k["cached"], reasoning)}))
        await self._finish_stream(req, tail, False)

    async def _stream_text(self, req: Request, body: dict[str, Any], model: str, k: dict[str, Any]) -> None:
        self.pace_slot = 0.0
        try:
            if k["latency_ms"] > 0:
                await asyncio.sleep(k["latency_ms"] / 1000.0)
            base = {"id": f"cmpl-mock{self.state.next_id()}", "object": "text_completion",
                    "created": int(time.time()), "model": model}
            head = _SSE_HEAD + (b"" if req.keep_alive else b"connection: close\r\n") + b"\r\n"
            delay = k["chunk_delay_ms"] / 1000.0
            count, capped = cap_tokens(body, k["chunks"])
            words = [" " + w.lstrip() for w in answer_words(count)]
            cut = k["cut"]
            send = len(words) if cut is None else min(cut, len(words))
            finish = "length" if capped else "stop"
            parts: list[bytes] = [head]
            for i in range(send):
                last = i == len(words) - 1
                parts.append(sse_frame({**base, "choices": [{"text": words[i], "index": 0, "logprobs": None,
                                                             "finish_reason": finish if last else None}]}))
                if i < send - 1:
                    await self._pace(parts, delay)
                    parts = []
            if cut is not None:
                return await self._finish_stream(req, parts, True)
            if send == 0:
                parts.append(sse_frame({**base, "choices": [{"text": "", "index": 0, "logprobs": None,
                                                             "finish_reason": finish}]}))
            opts = body.get("stream_options")
            if k["usage"] and isinstance(opts, dict) and opts.get("include_usage") is True:
                reasoning = k["reasoning"]
                parts.append(sse_frame({**base, "choices": [], "usage": usage_block(
                    text_prompt_tokens(body.get("prompt")), count + reasoning, k["cached"], reasoning)}))
            await self._finish_stream(req, parts, False)
        finally:
            if not self.closed:
                self._done_async()


    async def _stream_events(self, req: Request, plan: EventPlan, k: dict[str, Any]) -> None:
        """A Messages or Responses stream: the opening events with the first delta, the other deltas
        chunk_delay_ms apart, then the closing events; no data: [DONE]. cutN: N deltas, then abort."""
        self.pace_slot = 0.0
        try:
            if k["latency_ms"] > 0:
                await asyncio.sleep(k["latency_ms"] / 1000.0)
            opening, deltas, closing = plan
            head = _SSE_HEAD + (b"" if req.keep_alive else b"connection: close\r\n") + b"\r\n"
            delay = k["chunk_delay_ms"] / 1000.0
            cut = k["cut"]
            send = len(deltas) if cut is None else min(cut, len(deltas))
            parts = [head, *opening]
            for i in range(send):
                parts.append(deltas[i])
                if i < send - 1:   # no pause after the last delta sent
                    await self._pace(parts, delay)
                    parts = []
            if cut is not None:
                return await self._finish_stream(req, parts, True)
            await self._finish_stream(req, parts + closing, False, done=False)
        finally:
            if not self.closed:
                self._done_async()


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Mock OpenAI-compatible upstream (loopback benchmarks and tests).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18080)
    p.add_argument("--latency-ms", type=float, default=0.0, help="default delay before a response (ms)")
    p.add_argument("--chunks", type=int, default=20, help="default content chunks per stream")
    p.add_argument("--chunk-delay-ms", type=float, default=0.0, help="default delay between stream chunks (ms)")
    p.add_argument("--completion-tokens", type=int, default=16, help="default completion tokens (non-streaming)")
    p.add_argument("--backlog", type=int, default=4096)
    args = p.parse_args(argv)
    defaults = {"latency_ms": args.latency_ms, "chunks": args.chunks, "chunk_delay_ms": args.chunk_delay_ms,
                "status": 0, "usage": True, "cut": None, "cached": 0, "reasoning": 0, "apc": 0,
                "tokens": args.completion_tokens}
    state = State(defaults)
    if uvloop is not None:
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(loop.create_server(
        lambda: MockProtocol(state, loop), args.host, args.port, reuse_address=True, backlog=args.backlog))
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    print(f"mock upstream listening on http://{args.host}:{args.port} "
          f"({'uvloop' if uvloop is not None else 'asyncio'})", flush=True)
    gc.collect()
    gc.freeze()
    try:
        loop.run_until_complete(stop)
    finally:
        server.close()  # open keep-alive connections die with the process
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
