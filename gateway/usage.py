"""Token usage: the normalised :class:`Usage` and the readers of every upstream's usage object.

This module owns what a request consumed, in one shape whatever the upstream
reported: :func:`usage_from_openai` reads any usage mapping that reaches the
gateway (OpenAI chat/completions/embeddings with their prompt and completion
details, litellm's OpenAI-shaped usage for Anthropic, Gemini, Bedrock and the
rest, DeepSeek's ``prompt_cache_hit_tokens``/``prompt_cache_miss_tokens``,
xAI-style reasoning reported outside ``completion_tokens``, Perplexity's
top-level ``reasoning_tokens`` and ``citation_tokens``, OpenRouter's extras, and
the two native shapes below); :func:`usage_from_anthropic` and
:func:`usage_from_responses` read Anthropic Messages and OpenAI Responses usage
objects; :func:`upstream_cost_nano` reads the cost an upstream reports for
itself (OpenRouter's or litellm's ``usage.cost``, xAI's ``cost_in_usd_ticks``),
for comparison with the gateway's own price. Junk counts (strings, bools, NaN,
fractions, negatives) count as absent; nothing here raises on upstream input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from gateway.money import usd_to_nano

UPSTREAM_COST_KEY = "_upstream_cost"   # where the litellm provider parks litellm's own usage.cost
# Service tiers an upstream reports (OpenAI's body-level ``service_tier``, Anthropic's in usage) that have
# prices of their own in litellm's map, by the suffix of those prices; any other value is the standard tier.
SERVICE_TIERS = {"flex": "flex", "priority": "priority", "fast": "priority", "balanced": "balanced",
                 "ultrafast": "ultrafast"}


@dataclass(slots=True)
class Usage:   # a value: never changed once made (not frozen only because a frozen one costs ~3x to make)
    input_tokens: int = 0            # ALL prompt tokens: uncached + cache reads + cache writes (both tiers)
    output_tokens: int = 0           # ALL completion tokens: text, reasoning, audio and image
    cached_input_tokens: int = 0     # cache reads
    cache_write_tokens: int = 0      # cache writes, 5-minute / provider-default tier
    cache_write_1h_tokens: int = 0   # cache writes, Anthropic 1-hour tier
    reasoning_tokens: int = 0        # part of output_tokens, priced at the reasoning price where there is one
    estimated: bool = False          # True when the gateway counted instead of the upstream
    audio_input_tokens: int = 0      # part of input_tokens that is audio (cached audio included)
    cached_audio_tokens: int = 0     # part of cached_input_tokens that is audio
    image_input_tokens: int = 0      # part of input_tokens that is image (cached image included)
    cached_image_tokens: int = 0     # part of cached_input_tokens that is image
    video_input_tokens: int = 0      # part of input_tokens that is video
    audio_output_tokens: int = 0     # part of output_tokens that is audio
    image_output_tokens: int = 0     # part of output_tokens that is image
    citation_tokens: int = 0         # Perplexity's search-result tokens, billed beside (not inside) input_tokens
    service_tier: str | None = None  # a priced non-standard tier the upstream served at: flex, priority, ...

    @property
    def uncached_input_tokens(self) -> int:
        cached = self.cached_input_tokens + self.cache_write_tokens + self.cache_write_1h_tokens
        return max(0, self.input_tokens - cached)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def uncached(self, input_tokens: int | None = None) -> Usage:
        """The same request with no prompt caching: every prompt token (or ``input_tokens`` of them,
        e.g. before compression) sent fresh; audio, image, reasoning and the rest kept."""
        return replace(self, input_tokens=self.input_tokens if input_tokens is None else input_tokens,
                       cached_input_tokens=0, cache_write_tokens=0, cache_write_1h_tokens=0,
                       cached_audio_tokens=0, cached_image_tokens=0)


def token_count(value: Any) -> int | None:
    """A token count, or None when it is absent or junk (bools, strings, NaN, fractions)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return max(0, int(value))
    return None


def _get(mapping: Any, *path: str) -> int | None:
    for key in path:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return token_count(mapping)


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def usage_from_openai(usage: Mapping[str, Any] | None, *, service_tier: Any = None) -> Usage | None:
    """Any upstream usage mapping normalised (see the module docstring for the shapes understood).

    OpenAI chat usage and litellm's (``prompt_tokens``/``completion_tokens``) go
    through the chat reader; a mapping with ``input_tokens`` is an OpenAI
    Responses usage when it has ``input_tokens_details``/``output_tokens_details``,
    otherwise a raw Anthropic Messages usage. ``service_tier``: the response
    body's own (OpenAI reports it beside ``usage``, not inside).
    """
    if not isinstance(usage, dict) or not usage:
        return None
    u = usage
    found: Usage | None
    if "service_tier" not in u:
        found = _plain_openai(u)
        if found is not None:
            return found if service_tier is None else served_at(found, service_tier)
    if "prompt_tokens" in u or "completion_tokens" in u or "prompt_cache_hit_tokens" in u:
        found = _chat(u)
    elif "input_tokens" in u or "output_tokens" in u:
        if isinstance(u.get("input_tokens_details"), Mapping) or isinstance(u.get("output_tokens_details"), Mapping):
            found = usage_from_responses(u)
        else:
            found = usage_from_anthropic(u)
    else:
        return None
    return found if found is None or service_tier is None else served_at(found, service_tier)


def served_at(usage: Usage, service_tier: Any) -> Usage:
    """``usage`` as served at ``service_tier`` (a reported value; the standard tier unless it is one the
    price map prices apart)."""
    tier = SERVICE_TIERS.get(service_tier) if isinstance(service_tier, str) else None
    return usage if tier == usage.service_tier else replace(usage, service_tier=tier)


def _chat(u: Mapping[str, Any]) -> Usage | None:
    prompt, output = _get(u, "prompt_tokens"), _get(u, "completion_tokens")
    hit, miss = _get(u, "prompt_cache_hit_tokens"), _get(u, "prompt_cache_miss_tokens")   # DeepSeek
    if prompt is None and hit is not None and miss is not None:
        prompt = hit + miss
    if prompt is None and output is None:
        return None
    pd, cd = u.get("prompt_tokens_details"), u.get("completion_tokens_details")
    cached = _first(_get(pd, "cached_tokens"), _get(u, "cache_read_input_tokens"), hit) or 0
    writes = _first(_get(u, "cache_creation_input_tokens"), _get(pd, "cache_creation_tokens"),
                    _get(pd, "cache_write_tokens"))
    tiers = pd.get("cache_creation_token_details") if isinstance(pd, Mapping) else None
    tiers = tiers if isinstance(tiers, Mapping) else u.get("cache_creation")
    w5m, w1h = _write_tiers(writes, tiers)
    prompt = max(prompt or 0, cached + w5m + w1h)    # prompt_tokens already counts cache reads and writes
    output = output or 0
    reasoning = _first(_get(cd, "reasoning_tokens"), _get(u, "reasoning_tokens")) or 0
    total = _get(u, "total_tokens")
    if reasoning and (reasoning > output or total == prompt + output + reasoning):
        output += reasoning          # xAI-style: reasoning reported beside completion_tokens, not inside
    cached_details = pd.get("cached_tokens_details") if isinstance(pd, Mapping) else None
    return _build(
        prompt, output, cached, w5m, w1h, reasoning,
        audio_in=_get(pd, "audio_tokens"), cached_audio=_get(cached_details, "audio_tokens"),
        image_in=_get(pd, "image_tokens"), cached_image=_get(cached_details, "image_tokens"),
        video_in=_get(pd, "video_tokens"), audio_out=_get(cd, "audio_tokens"), image_out=_get(cd, "image_tokens"),
        citation=_get(u, "citation_tokens"), tier=u.get("service_tier"))


def usage_from_anthropic(u: Mapping[str, Any] | None) -> Usage | None:
    """An Anthropic Messages usage object: its ``input_tokens`` are the uncached ones only, so cache
    reads (``cache_read_input_tokens``) and writes (``cache_creation_input_tokens``, split by
    ``cache_creation.ephemeral_5m_input_tokens``/``ephemeral_1h_input_tokens``) are added back."""
    if not isinstance(u, Mapping):
        return None
    uncached, output = _get(u, "input_tokens"), _get(u, "output_tokens")
    if uncached is None and output is None:
        return None
    cached = _get(u, "cache_read_input_tokens") or 0
    w5m, w1h = _write_tiers(_get(u, "cache_creation_input_tokens"), u.get("cache_creation"))
    return _build((uncached or 0) + cached + w5m + w1h, output or 0, cached, w5m, w1h, 0,
                  tier=u.get("service_tier"))


def usage_from_responses(u: Mapping[str, Any] | None) -> Usage | None:
    """An OpenAI Responses usage object: ``input_tokens`` already include the cached
    ``input_tokens_details.cached_tokens``; ``output_tokens`` include
    ``output_tokens_details.reasoning_tokens``."""
    if not isinstance(u, Mapping):
        return None
    prompt, output = _get(u, "input_tokens"), _get(u, "output_tokens")
    if prompt is None and output is None:
        return None
    cached = _get(u, "input_tokens_details", "cached_tokens") or 0
    reasoning = _get(u, "output_tokens_details", "reasoning_tokens") or 0
    return _build(max(prompt or 0, cached), output or 0, cached, 0, 0, reasoning, tier=u.get("service_tier"))


def _write_tiers(writes: int | None, tiers: Any) -> tuple[int, int]:
    """(5-minute, 1-hour) cache writes from a total and an optional ``ephemeral_*`` breakdown."""
    w1h = _get(tiers, "ephemeral_1h_input_tokens") or 0
    total = _first(writes, (_get(tiers, "ephemeral_5m_input_tokens") or 0) + w1h) or 0
    w1h = min(w1h, total)
    return total - w1h, w1h


def _build(prompt: int, output: int, cached: int, w5m: int, w1h: int, reasoning: int, *,
           audio_in: int | None = None, cached_audio: int | None = None, image_in: int | None = None,
           cached_image: int | None = None, video_in: int | None = None, audio_out: int | None = None,
           image_out: int | None = None, citation: int | None = None, tier: Any = None) -> Usage:
    """A Usage whose parts never exceed their wholes, whatever the upstream reported."""
    audio_in, image_in = min(audio_in or 0, prompt), min(image_in or 0, prompt)
    cached_audio = min(cached_audio or 0, cached, audio_in)
    cached_image = min(cached_image or 0, cached - cached_audio, image_in)
    reasoning = min(reasoning, output)
    audio_out = min(audio_out or 0, output - reasoning)
    image_out = min(image_out or 0, output - reasoning - audio_out)
    return Usage(input_tokens=prompt, output_tokens=output, cached_input_tokens=cached, cache_write_tokens=w5m,
                 cache_write_1h_tokens=w1h, reasoning_tokens=reasoning, audio_input_tokens=audio_in,
                 cached_audio_tokens=cached_audio, image_input_tokens=image_in, cached_image_tokens=cached_image,
                 video_input_tokens=min(video_in or 0, prompt), audio_output_tokens=audio_out,
                 image_output_tokens=image_out, citation_tokens=citation or 0,
                 service_tier=SERVICE_TIERS.get(tier) if isinstance(tier, str) else None)


_PLAIN_KEYS = frozenset({"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
                         "completion_tokens_details"})
_PLAIN_PROMPT_DETAILS = frozenset({"cached_tokens", "audio_tokens"})
_PLAIN_COMPLETION_DETAILS = frozenset({"reasoning_tokens", "audio_tokens", "accepted_prediction_tokens",
                                       "rejected_prediction_tokens"})


def _plain_openai(u: dict[str, Any]) -> Usage | None:
    """The common case on the hot path: OpenAI's own chat usage with no audio; anything else is None
    (and goes through the full reader)."""
    prompt, output = u.get("prompt_tokens"), u.get("completion_tokens", 0)
    if type(prompt) is not int or type(output) is not int or prompt < 0 or output < 0 \
            or not _PLAIN_KEYS.issuperset(u):
        return None
    total = u.get("total_tokens", prompt + output)
    if total != prompt + output:
        return None
    details = u.get("prompt_tokens_details")
    cached = 0
    if details is not None:
        if type(details) is not dict or not _PLAIN_PROMPT_DETAILS.issuperset(details) or details.get("audio_tokens"):
            return None
        cached = details.get("cached_tokens") or 0
        if type(cached) is not int or not 0 <= cached <= prompt:
            return None
    reasoning = 0
    out_details = u.get("completion_tokens_details")
    if out_details is not None:
        if type(out_details) is not dict or not _PLAIN_COMPLETION_DETAILS.issuperset(out_details) \
                or out_details.get("audio_tokens"):
            return None
        reasoning = out_details.get("reasoning_tokens") or 0
        if type(reasoning) is not int or not 0 <= reasoning <= output:
            return None
    return Usage(prompt, output, cached, 0, 0, reasoning)


_COST_KEYS = frozenset({"is_byok", UPSTREAM_COST_KEY, "cost", "cost_in_usd_ticks"})   # where a cost may be


def upstream_cost_nano(usage: Mapping[str, Any] | None) -> int | None:
    """The cost the upstream reported for itself, in nano-USD, or None when it reported none.

    Read from (first found): the private ``_upstream_cost`` the litellm provider
    moves litellm's ``usage.cost`` to; ``usage.cost`` (OpenRouter's credits in USD,
    litellm's float, or Perplexity's ``{"total_cost": ...}``; for an OpenRouter
    BYOK request, ``cost_details.upstream_inference_cost``, what the provider
    itself billed); xAI's ``cost_in_usd_ticks`` (1e-10 USD each).
    """
    if not isinstance(usage, Mapping) or usage.keys().isdisjoint(_COST_KEYS):
        return None
    if usage.get("is_byok") is True:
        byok = _usd_nano(_dig(usage, "cost_details", "upstream_inference_cost"))
        if byok is not None:
            return byok
    for key in (UPSTREAM_COST_KEY, "cost"):
        value = usage.get(key)
        found = _usd_nano(value.get("total_cost") if isinstance(value, Mapping) else value)
        if found is not None:
            return found
    ticks = usage.get("cost_in_usd_ticks")
    if isinstance(ticks, int) and not isinstance(ticks, bool) and ticks >= 0:
        return (ticks + 5) // 10          # 10 ticks per nano-USD, half-up
    return None


def _dig(mapping: Mapping[str, Any], *path: str) -> Any:
    value: Any = mapping
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _usd_nano(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        nano = usd_to_nano(value)
    except ValueError:
        return None
    return nano if nano >= 0 else None
