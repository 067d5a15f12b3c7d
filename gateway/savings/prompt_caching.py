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
from gateway.tokens import REPLY_PRIMING, count_chat

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
