"""Context compression: shrinking a chat request that is too long, without breaking it.

A request is compressed when its estimated prompt exceeds the policy's threshold: ``trigger_tokens``,
or ``trigger_fraction`` (default 0.8) of the chosen deployment's context window, whichever is
lower. The strategies named in ``strategies`` run in that order until the prompt is at or below
the target (``target_tokens``, default the threshold):

- ``clear_tool_outputs``: replace tool results with a one-line placeholder, oldest first, keeping
  the last ``keep_tool_outputs`` (the ``tool`` message and its ``tool_call_id`` stay, so every call
  keeps its result); it may reach into the first and last turns (an agent loop is one long turn),
  never into the head or past a mid-conversation system message;
- ``summarize``: replace the compressible turns with one summary written by ``summary_model``,
  called through the gateway's own routing and paid for by the same team (the caller passes that
  call in as ``summarise``), as a user message (the summary) and a short assistant reply, so roles
  keep alternating;
- ``drop_middle``: drop compressible turns, oldest first (a summary last).

Messages are grouped into turns: a turn starts at a user message and holds everything up to the
next one (assistant replies, tool calls and their results), so dropping or summarising whole turns
never separates a tool call from its result. Never touched, by any strategy (the head): the leading
system prompt, the messages a provider prompt-cache breakpoint relies on (``protected``) and anything
before the first user message after those; nor every turn from a mid-conversation system message on.
``summarize`` and ``drop_middle`` also keep the first ``keep_first_turns`` and the last
``keep_last_turns`` turns whole. Token counts are the gateway's estimates
(:func:`gateway.tokens.count_prompt`) for the deployment's model.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.policy import CompressionSettings
from gateway.tokens import REPLY_PRIMING, count_chat, count_prompt

SYSTEM_ROLES = ("system", "developer")
TOOL_ROLES = ("tool", "function")
SUMMARY_HEADER = "[Summary of the earlier conversation, written by the gateway to save context]\n"
SUMMARY_ACK = "Understood; continuing from that summary."
SUMMARY_INSTRUCTIONS = (
    "You condense conversations. Summarise the conversation below so that an assistant can continue it: "
    "keep every fact, decision, name, number, open question and tool result that may matter later; drop "
    "pleasantries and repetition. Answer with the summary only.")

Summariser = Callable[[str], Awaitable[tuple[str, int] | None]]   # transcript -> (summary, its cost in nano-USD)


@dataclass
class Report:
    """What compression did to one request."""

    before: int                     # estimated prompt tokens before
    after: int                      # and after
    saved: dict[str, int] = field(default_factory=dict)   # strategy -> tokens it removed (net)
    summary_nano: int = 0           # what the summary call cost

    @property
    def header(self) -> str:
        return f"{self.before}->{self.after}"

    @property
    def removed(self) -> int:
        return max(0, self.before - self.after)


@dataclass
class _Turn:
    messages: list[dict[str, Any]]
    tokens: list[int]
    summary: bool = False

    @property
    def size(self) -> int:
        return sum(self.tokens)

    @property
    def barrier(self) -> bool:
        return any(m.get("role") in SYSTEM_ROLES for m in self.messages)


def threshold(settings: CompressionSettings, context_window: int | None) -> int | None:
    limits = [settings.trigger_tokens] if settings.trigger_tokens else []
    if context_window:
        limits.append(int(context_window * settings.trigger_fraction))
    return min(limits) if limits else None


def target(settings: CompressionSettings, limit: int) -> int:
    return min(settings.target_tokens, limit) if settings.target_tokens else limit


def summary_request(settings: CompressionSettings, transcript: str) -> dict[str, Any]:
    return {"model": settings.summary_model, "temperature": 0, "max_tokens": settings.summary_max_tokens,
            "messages": [{"role": "system", "content": SUMMARY_INSTRUCTIONS},
                         {"role": "user", "content": transcript}]}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                parts.append(part["text"] if isinstance(part.get("text"), str) else f"[{part.get('type', 'part')}]")
        return "\n".join(parts)
    return ""


def transcript(messages: list[dict[str, Any]]) -> str:
    lines = []
    for m in messages:
        role = m.get("role", "?")
        text = _text(m.get("content"))
        if role in TOOL_ROLES:
            lines.append(f"tool result ({m.get('tool_call_id') or m.get('name') or '?'}): {text}")
            continue
        if text:
            lines.append(f"{role}: {text}")
        for call in m.get("tool_calls") or ():
            fn = call.get("function") or {} if isinstance(call, dict) else {}
            lines.append(f"{role} called {fn.get('name')}({fn.get('arguments')}) [id {call.get('id')}]")
    return "\n\n".join(lines)


class _Work:
    """The request split into an untouchable head and turns, with a running token estimate."""

    def __init__(self, body: dict[str, Any], model: str, protected: int, before: int) -> None:
        messages: list[dict[str, Any]] = body["messages"]
        self.model = model
        own = [self.count(m) for m in messages]
        self.base = before - sum(own)            # reply priming and tool definitions
        head = 0
        while head < len(messages) and messages[head].get("role") in SYSTEM_ROLES:
            head += 1
        head = max(head, min(protected, len(messages)))
        while head < len(messages) and messages[head].get("role") != "user":
            head += 1
        self.head = messages[:head]
        self.head_tokens = sum(own[:head])
        self.turns: list[_Turn] = []
        for message, tokens in zip(messages[head:], own[head:], strict=True):
            if message.get("role") == "user" or not self.turns:
                self.turns.append(_Turn([], []))
            self.turns[-1].messages.append(message)
            self.turns[-1].tokens.append(tokens)

    def count(self, message: dict[str, Any]) -> int:
        return count_chat([message], self.model) - REPLY_PRIMING

    @property
    def total(self) -> int:
        return self.base + self.head_tokens + sum(t.size for t in self.turns)

    def region(self, settings: CompressionSettings) -> range:
        """Indexes of the turns compression may summarise or drop."""
        start, end = settings.keep_first_turns, len(self.turns) - settings.keep_last_turns
        for i in range(start, max(start, end)):
            if self.turns[i].barrier:
                end = i
                break
        return range(start, max(start, end))

    def messages(self) -> list[dict[str, Any]]:
        return [*self.head, *(m for t in self.turns for m in t.messages)]


def _clear_tool_outputs(work: _Work, settings: CompressionSettings, goal: int) -> int:
    """Clear tool results, oldest first, keeping the last ``keep_tool_outputs``: in every turn before a
    mid-conversation system message, whatever ``keep_first_turns`` and ``keep_last_turns`` say (an agent
    loop is one long turn, and its old tool outputs are what this strategy is for)."""
    barrier = next((i for i, t in enumerate(work.turns) if t.barrier), len(work.turns))
    spots = [(turn, i) for turn in work.turns[:barrier]
             for i, m in enumerate(turn.messages) if m.get("role") in TOOL_ROLES]
    saved = 0
    for turn, i in spots[:max(0, len(spots) - settings.keep_tool_outputs)]:
        if work.total <= goal:
            break
        old = turn.tokens[i]
        cleared = {**turn.messages[i], "content": f"[tool output removed by the gateway to save context: "
                                                 f"{old} tokens]"}
        new = work.count(cleared)
        if new < old:
            turn.messages[i], turn.tokens[i] = cleared, new
            saved += old - new
    return saved


async def _summarize(work: _Work, settings: CompressionSettings, summarise: Summariser | None,
                     report: Report) -> int:
    region = work.region(settings)
    if summarise is None or not region:
        return 0
    turns = [work.turns[i] for i in region]
    old = sum(t.size for t in turns)
    result = await summarise(transcript([m for t in turns for m in t.messages]))
    if result is None:
        return 0
    text, cost = result
    report.summary_nano += cost
    if not text.strip():
        return 0
    pair = [{"role": "user", "content": SUMMARY_HEADER + text.strip()}, {"role": "assistant", "content": SUMMARY_ACK}]
    tokens = [work.count(m) for m in pair]
    if sum(tokens) >= old:
        return 0
    work.turns[region.start:region.stop] = [_Turn(pair, tokens, summary=True)]
    return old - sum(tokens)


def _drop_middle(work: _Work, settings: CompressionSettings, goal: int) -> int:
    saved = 0
    while work.total > goal:
        region = work.region(settings)
        order = [i for i in region if not work.turns[i].summary] + [i for i in region if work.turns[i].summary]
        if not order:
            break
        saved += work.turns.pop(order[0]).size
    return saved


async def compress(body: dict[str, Any], settings: CompressionSettings, model: str, before: int, goal: int,
                   protected: int = 0, summarise: Summariser | None = None) -> tuple[dict[str, Any], Report] | None:
    """The compressed body and a report, or None when no strategy could remove anything.

    ``before``: the body's estimated prompt tokens; ``goal``: the target; ``protected``: leading
    messages a prompt-cache breakpoint relies on."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None
    work = _Work(body, model, protected, before)
    report = Report(before, before)
    for strategy in settings.strategies:
        if work.total <= goal:
            break
        if strategy == "clear_tool_outputs":
            saved = _clear_tool_outputs(work, settings, goal)
        elif strategy == "summarize":
            saved = await _summarize(work, settings, summarise, report)
        else:
            saved = _drop_middle(work, settings, goal)
        if saved > 0:
            report.saved[strategy] = saved
    if not report.saved:
        return None if not report.summary_nano else (body, report)
    out = {**body, "messages": work.messages()}
    report.after = count_prompt(out, "chat", model)
    return out, report
