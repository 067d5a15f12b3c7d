"""Provider prompt caching: where to put Anthropic ``cache_control`` breakpoints, and OpenAI's key.

Anthropic caches the prompt prefix up to each ``cache_control`` breakpoint (tools, then the system
prompt, then the messages, in that order), at most four per request, and only once the prefix
reaches the model's minimum cacheable length (:data:`MIN_CACHEABLE`, tokens estimated with the
gateway's tokenizer). :func:`plan_breakpoints` picks, in priority order: the end of the whole
conversation (``conversation: true``: the next turn reads this one's prefix back), the end of the
system prompt, the end of the tool definitions, then early messages that are themselves at least
the minimum long, oldest first -- only positions whose prefix reaches the minimum, at most four.
A request that already carries ``cache_control`` anywhere is left exactly as the client sent it.
:func:`mark` writes the chosen breakpoints into a copy of the body in litellm's OpenAI-shaped
form (a ``cache_control`` on the message, the last content part, the last tool call or the last
tool), with ``{"type": "ephemeral"}`` or ``{"type": "ephemeral", "ttl": "1h"}`` per policy.
:func:`protected_messages` tells compression how many leading messages those breakpoints rely on.

A Messages API body sent natively (to Anthropic or a compatible server) gets the same plan in its
own shape (:func:`apply_messages`): ``cache_control`` on the last tool, on the last block of
``system`` (a string becomes one text block), on the last block of a message (never a thinking
block, never an empty text), by the same priorities and minimum, at most four; a body that carries
``cache_control`` anywhere (top level, tools, system, any block) is sent exactly as the client
sent it. :func:`native_protected` tells compression which leading chat messages (of the body's
chat translation) the client's own or the planned breakpoints rely on.

OpenAI-compatible deployments get ``prompt_cache_key`` (unless the client set one): per team, or
per prefix (a hash of the team, the tools and the system messages), which steers requests sharing
a prefix to the same cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.policy import Deployment, PromptCacheSettings
from gateway.tokens import REPLY_PRIMING, count_chat, count_text

MAX_BREAKPOINTS = 4
DEFAULT_MIN_CACHEABLE = 1024
# Substrings of the upstream model name, checked in order; the first match wins.
MIN_CACHEABLE: tuple[tuple[str, int], ...] = (
    ("opus-4-6", 4096), ("opus-4-5", 4096), ("haiku-4-5", 4096),
    ("sonnet-4-6", 2048), ("haiku", 2048),          # Claude 3 Haiku and 3.5 Haiku
)
SYSTEM_ROLES = ("system", "developer")


@dataclass(frozen=True, slots=True)
class Breakpoints:
    tools: bool                     # after the last tool definition
    messages: tuple[int, ...]       # indexes into the body's messages, ascending
    protected: int                  # leading messages compression must leave alone


def min_cacheable(upstream_model: str) -> int:
    name = upstream_model.lower()
    for fragment, tokens in MIN_CACHEABLE:
        if fragment in name:
            return tokens
    return DEFAULT_MIN_CACHEABLE


def uses_cache_control(deployment: Deployment) -> bool:
    """Anthropic's models, directly or through another cloud (Bedrock, Vertex) via litellm."""
    return not deployment.openai_compatible and (deployment.provider == "anthropic"
                                                 or "claude" in deployment.upstream_model.lower())


def _has_cache_control(body: dict[str, Any]) -> bool:
    for tool in body.get("tools") or ():
        if isinstance(tool, dict) and ("cache_control" in tool or "cache_control" in (tool.get("function") or {})):
            return True
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        if "cache_control" in message:
            return True
        content = message.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and "cache_control" in p for p in content):
            return True
        if any(isinstance(c, dict) and "cache_control" in c for c in message.get("tool_calls") or ()):
            return True
    return False


def _tokens(message: Any, model: str) -> int:
    return count_chat([message], model) - REPLY_PRIMING


def plan_breakpoints(body: dict[str, Any], model: str, settings: PromptCacheSettings) -> Breakpoints | None:
    """Where breakpoints go for this chat body on ``model`` (None: none, or the client placed its own)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or _has_cache_control(body):
        return None
    minimum = settings.min_tokens or min_cacheable(model)
    tools = body.get("tools") if isinstance(body.get("tools"), list) else None
    tools_tokens = count_chat([], model, tools) - REPLY_PRIMING if tools else 0
    # Anthropic's order: tools, every system message (litellm lifts them all), then the rest.
    system = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") in SYSTEM_ROLES]
    system_set = set(system)
    rest = [i for i in range(len(messages)) if i not in system_set]
    own = {i: _tokens(messages[i], model) for i in range(len(messages))}
    system_end = tools_tokens + sum(own[i] for i in system)
    prefix, total = {}, system_end
    for i in rest:
        total += own[i]
        prefix[i] = total
    chosen: list[int] = []
    take_tools = False
    if settings.conversation and rest and prefix[rest[-1]] >= minimum:
        chosen.append(rest[-1])
    if system and system_end >= minimum:
        chosen.append(system[-1])
    if tools and tools_tokens >= minimum and len(chosen) < MAX_BREAKPOINTS:
        take_tools = True
    early = [i for i in rest[:-1] if own[i] >= minimum]
    for i in early:
        if len(chosen) + take_tools >= MAX_BREAKPOINTS:
            break
        chosen.append(i)
    if not chosen and not take_tools:
        return None
    stable = [i for i in chosen if i not in system_set and i != rest[-1]]
    protected = max(stable) + 1 if stable else 0
    return Breakpoints(take_tools, tuple(sorted(chosen)), protected)


def _control(settings: PromptCacheSettings) -> dict[str, str]:
    return {"type": "ephemeral", "ttl": "1h"} if settings.ttl == "1h" else {"type": "ephemeral"}


def _mark_message(message: dict[str, Any], control: dict[str, str]) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, list) and content and isinstance(content[-1], dict):
        return {**message, "content": [*content[:-1], {**content[-1], "cache_control": control}]}
    calls = message.get("tool_calls")
    if message.get("role") == "assistant" and not content and isinstance(calls, list) and calls \
            and isinstance(calls[-1], dict):
        return {**message, "tool_calls": [*calls[:-1], {**calls[-1], "cache_control": control}]}
    return {**message, "cache_control": control}


def mark(body: dict[str, Any], plan: Breakpoints, settings: PromptCacheSettings) -> dict[str, Any]:
    """A copy of ``body`` with the planned breakpoints (the original is not modified)."""
    control = _control(settings)
    out = dict(body)
    if plan.tools:
        tools = list(body["tools"])
        tools[-1] = {**tools[-1], "cache_control": control}
        out["tools"] = tools
    if plan.messages:
        messages = list(body["messages"])
        for i in plan.messages:
            messages[i] = _mark_message(messages[i], control)
        out["messages"] = messages
    return out


def prompt_cache_key(body: dict[str, Any], team: str, mode: str) -> str | None:
    if mode == "team":
        material: Any = [team]
    elif mode == "prefix":
        system = [m for m in body.get("messages") or () if isinstance(m, dict) and m.get("role") in SYSTEM_ROLES]
        material = [team, body.get("tools"), system]
    else:
        return None
    digest = hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
    return f"gw-{digest}"


def apply(body: dict[str, Any], deployment: Deployment, settings: PromptCacheSettings, team: str) -> dict[str, Any]:
    """The body to send to ``deployment`` with prompt caching asked for (``body`` itself if nothing changes)."""
    if not settings.enabled:
        return body
    if deployment.openai_compatible:
        if "prompt_cache_key" in body:
            return body
        key = prompt_cache_key(body, team, settings.openai_cache_key)
        return body if key is None else {**body, "prompt_cache_key": key}
    if not uses_cache_control(deployment):
        return body
    plan = plan_breakpoints(body, deployment.upstream_model, settings)
    return body if plan is None else mark(body, plan, settings)


def protected_messages(body: dict[str, Any], deployment: Deployment, settings: PromptCacheSettings) -> int:
    """How many leading messages the prompt-cache breakpoints rely on (compression keeps them)."""
    if not settings.enabled or not uses_cache_control(deployment):
        return 0
    plan = plan_breakpoints(body, deployment.upstream_model, settings)
    return plan.protected if plan is not None else 0


# ---------------------------------------------------------------------------- native Messages bodies
UNMARKABLE_BLOCKS = ("thinking", "redacted_thinking")


@dataclass(frozen=True, slots=True)
class NativeBreakpoints:
    tools: bool                     # after the last tool definition
    system: bool                    # on the last block of ``system``
    messages: tuple[int, ...]       # indexes into the body's messages, ascending


def _block_has_cache_control(block: Any) -> bool:
    if not isinstance(block, dict):
        return False
    if "cache_control" in block:
        return True
    inner = block.get("content")   # a tool_result's own blocks
    return isinstance(inner, list) and any(isinstance(b, dict) and "cache_control" in b for b in inner)


def message_has_cache_control(message: Any) -> bool:
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(_block_has_cache_control(b) for b in content)


def native_has_cache_control(body: dict[str, Any]) -> bool:
    """Whether the client placed any breakpoint itself (then the body is left as sent)."""
    if "cache_control" in body:
        return True
    system = body.get("system")
    if isinstance(system, list) and any(_block_has_cache_control(b) for b in system):
        return True
    if any(isinstance(t, dict) and "cache_control" in t for t in body.get("tools") or ()):
        return True
    return any(message_has_cache_control(m) for m in body.get("messages") or ())


def _markable(content: Any) -> int | None:
    """Where a breakpoint goes in a content value: -1 for a non-empty string, the index of the last block
    that can carry one, or None."""
    if isinstance(content, str):
        return -1 if content else None
    if not isinstance(content, list):
        return None
    for i in range(len(content) - 1, -1, -1):
        block = content[i]
        if not isinstance(block, dict) or block.get("type") in UNMARKABLE_BLOCKS:
            continue
        if block.get("type") == "text" and not block.get("text"):
            continue
        return i
    return None


def _with_control(content: Any, control: dict[str, str]) -> Any:
    at = _markable(content)
    if at == -1:
        return [{"type": "text", "text": content, "cache_control": control}]
    assert at is not None and isinstance(content, list)
    return [*content[:at], {**content[at], "cache_control": control}, *content[at + 1:]]


def plan_native(body: dict[str, Any], model: str, settings: PromptCacheSettings) -> NativeBreakpoints | None:
    """Where breakpoints go in a native Messages body on ``model`` (None: none, or the client placed its own);
    the priorities and minimum of :func:`plan_breakpoints`."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or native_has_cache_control(body):
        return None
    minimum = settings.min_tokens or min_cacheable(model)
    tools = body.get("tools") if isinstance(body.get("tools"), list) and body.get("tools") else None
    tools_tokens = count_text(orjson.dumps(tools).decode(), model) if tools else 0
    system = body.get("system")
    system_end = tools_tokens + (_tokens({"role": "system", "content": system}, model) if system else 0)
    total, prefix, own = system_end, [], []
    for message in messages:
        own.append(_tokens(message, model))
        total += own[-1]
        prefix.append(total)
    last = len(messages) - 1
    markable = [isinstance(m, dict) and _markable(m.get("content")) is not None for m in messages]
    chosen: list[int] = []
    if settings.conversation and prefix[last] >= minimum and markable[last]:
        chosen.append(last)
    take_system = bool(system) and _markable(system) is not None and system_end >= minimum
    take_tools = tools is not None and tools_tokens >= minimum and len(chosen) + take_system < MAX_BREAKPOINTS
    for i in range(last):
        if len(chosen) + take_system + take_tools >= MAX_BREAKPOINTS:
            break
        if own[i] >= minimum and markable[i]:
            chosen.append(i)
    if not chosen and not take_system and not take_tools:
        return None
    return NativeBreakpoints(take_tools, take_system, tuple(sorted(chosen)))


def mark_native(body: dict[str, Any], plan: NativeBreakpoints, settings: PromptCacheSettings) -> dict[str, Any]:
    """A copy of the Messages ``body`` with the planned breakpoints (the original is not modified)."""
    control = _control(settings)
    out = dict(body)
    if plan.tools:
        tools = list(body["tools"])
        tools[-1] = {**tools[-1], "cache_control": control}
        out["tools"] = tools
    if plan.system:
        out["system"] = _with_control(body["system"], control)
    if plan.messages:
        messages = list(body["messages"])
        for i in plan.messages:
            messages[i] = {**messages[i], "content": _with_control(messages[i]["content"], control)}
        out["messages"] = messages
    return out


def apply_messages(body: dict[str, Any], deployment: Deployment, settings: PromptCacheSettings) -> dict[str, Any]:
    """The native Messages body to send to ``deployment`` with prompt caching asked for (``body`` itself
    if nothing changes)."""
    if not settings.enabled:
        return body
    plan = plan_native(body, deployment.upstream_model, settings)
    return body if plan is None else mark_native(body, plan, settings)


def native_protected(native: dict[str, Any], origins: list[tuple[int, ...]], deployment: Deployment,
                     settings: PromptCacheSettings) -> int:
    """How many leading messages of the chat translation (``origins``: the native messages each came from)
    compression must leave alone for the native body's breakpoints: the client's own, else the planned ones
    (the last message and ``system`` excepted: the last turns are kept anyway)."""
    messages = native.get("messages")
    if not isinstance(messages, list) or not messages:
        return 0
    if native_has_cache_control(native):
        marked = [i for i, m in enumerate(messages[:-1]) if message_has_cache_control(m)]
    elif settings.enabled:
        plan = plan_native(native, deployment.upstream_model, settings)
        marked = [i for i in plan.messages if i != len(messages) - 1] if plan is not None else []
    else:
        return 0
    if not marked:
        return 0
    last = max(marked)
    return max((k + 1 for k, came in enumerate(origins) if any(i <= last for i in came)), default=0)
