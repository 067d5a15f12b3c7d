"""Between streams and stored answers: assemble a streamed answer, replay a stored one as SSE.

:class:`StreamAssembler` folds OpenAI stream chunks (chat or legacy completions) into the
non-stream answer they spell: per choice its role, content, refusal, tool calls (merged by their
``index``: id, type, name and argument fragments), logprobs and finish reason; plus the usage
chunk. :func:`replay_events` does the reverse for a cache hit: per choice one chunk with the role
and the whole content (and logprobs), one with the tool calls, one with the finish reason; then,
only if the client asked for it, a usage chunk (``choices: []``, ``cost_usd`` 0); then ``[DONE]``.
The ``openai`` SDK accumulates these into the same message it would have read from the JSON.
"""

from __future__ import annotations

from typing import Any

import orjson


class StreamAssembler:
    def __init__(self, endpoint: str) -> None:
        self.chat = endpoint == "chat"
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        if not self.head:
            self.head = {k: chunk[k] for k in ("id", "created", "model", "system_fingerprint") if k in chunk}
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict):
                self._add_choice(choice)

    def _add_choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        acc = self.choices.setdefault(index if isinstance(index, int) else 0,
                                      {"content": [], "refusal": [], "tools": {}, "logprobs": None,
                                       "finish_reason": None, "role": "assistant"})
        if choice.get("finish_reason") is not None:
            acc["finish_reason"] = choice["finish_reason"]
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            merged = acc["logprobs"] or {}
            for key, value in logprobs.items():
                if isinstance(value, list):
                    merged[key] = [*(merged.get(key) or []), *value]
                else:
                    merged[key] = value
            acc["logprobs"] = merged
        if not self.chat:
            if isinstance(choice.get("text"), str):
                acc["content"].append(choice["text"])
            return
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        if isinstance(delta.get("role"), str):
            acc["role"] = delta["role"]
        if isinstance(delta.get("content"), str):
            acc["content"].append(delta["content"])
        if isinstance(delta.get("refusal"), str):
            acc["refusal"].append(delta["refusal"])
        for call in delta.get("tool_calls") or ():
            if not isinstance(call, dict):
                continue
            i = call.get("index", 0)
            slot = acc["tools"].setdefault(i, {"id": None, "type": "function", "name": [], "arguments": []})
            if call.get("id"):
                slot["id"] = call["id"]
            if call.get("type"):
                slot["type"] = call["type"]
            fn = call.get("function")
            if isinstance(fn, dict):
                if isinstance(fn.get("name"), str):
                    slot["name"].append(fn["name"])
                if isinstance(fn.get("arguments"), str):
                    slot["arguments"].append(fn["arguments"])

    def complete(self) -> bool:
        """Every choice ended with a finish reason (a cut or failed stream is never stored)."""
        return bool(self.choices) and all(c["finish_reason"] is not None for c in self.choices.values())

    def answer(self, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        """The assembled non-stream answer (``usage``: the reported one unless given)."""
        choices = []
        for index in sorted(self.choices):
            acc = self.choices[index]
            if self.chat:
                message: dict[str, Any] = {"role": acc["role"],
                                           "content": "".join(acc["content"]) if acc["content"] else None}
                if acc["tools"]:
                    message["tool_calls"] = [
                        {"id": t["id"], "type": t["type"],
                         "function": {"name": "".join(t["name"]), "arguments": "".join(t["arguments"])}}
                        for _, t in sorted(acc["tools"].items())]
                message["refusal"] = "".join(acc["refusal"]) if acc["refusal"] else None
                choices.append({"index": index, "message": message, "logprobs": acc["logprobs"],
                                "finish_reason": acc["finish_reason"]})
            else:
                choices.append({"index": index, "text": "".join(acc["content"]), "logprobs": acc["logprobs"],
                                "finish_reason": acc["finish_reason"]})
        body: dict[str, Any] = {"id": self.head.get("id", ""),
                                "object": "chat.completion" if self.chat else "text_completion",
                                "created": self.head.get("created", 0), "model": self.head.get("model", ""),
                                "choices": choices}
        if "system_fingerprint" in self.head:
            body["system_fingerprint"] = self.head["system_fingerprint"]
        final_usage = usage if usage is not None else self.usage
        if final_usage is not None:
            body["usage"] = final_usage
        return body


def _frame(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def replay_events(body: dict[str, Any], endpoint: str, wants_usage: bool) -> list[bytes]:
    """A stored answer as the SSE events of a stream (usage chunk only when asked for)."""
    chat = endpoint == "chat"
    head: dict[str, Any] = {"id": body.get("id", ""), "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": body.get("created", 0), "model": body.get("model", "")}
    if "system_fingerprint" in body:
        head["system_fingerprint"] = body["system_fingerprint"]
    events: list[bytes] = []
    for choice in body.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", 0)
        if not chat:
            events.append(_frame({**head, "choices": [{"index": index, "text": choice.get("text") or "",
                                                       "logprobs": choice.get("logprobs"),
                                                       "finish_reason": choice.get("finish_reason")}]}))
            continue
        raw = choice.get("message")
        message: dict[str, Any] = raw if isinstance(raw, dict) else {}
        delta: dict[str, Any] = {"role": message.get("role") or "assistant"}
        calls = message.get("tool_calls")
        delta["content"] = message.get("content") if message.get("content") is not None else ("" if not calls
                                                                                               else None)
        if message.get("refusal") is not None:
            delta["refusal"] = message["refusal"]
        events.append(_frame({**head, "choices": [{"index": index, "delta": delta, "logprobs": choice.get("logprobs"),
                                                   "finish_reason": None}]}))
        if isinstance(calls, list) and calls:
            deltas = [{"index": i, "id": c.get("id"), "type": c.get("type", "function"),
                       "function": dict(c.get("function") or {})} for i, c in enumerate(calls) if isinstance(c, dict)]
            events.append(_frame({**head, "choices": [{"index": index, "delta": {"tool_calls": deltas},
                                                       "logprobs": None, "finish_reason": None}]}))
        events.append(_frame({**head, "choices": [{"index": index, "delta": {}, "logprobs": None,
                                                   "finish_reason": choice.get("finish_reason")}]}))
    if wants_usage:
        usage = body.get("usage")
        events.append(_frame({**head, "choices": [],
                              "usage": {**(usage if isinstance(usage, dict) else {}), "cost_usd": 0.0}}))
    events.append(b"data: [DONE]\n\n")
    return events
