"""The ``cache``, ``prompt_cache`` and ``compression`` sections: what is cached, marked and compressed.

Each section holds global keys plus an optional ``teams:`` mapping of per-team overrides (the
same keys, minus the few process-wide ones). Settings are frozen dataclasses; a team's effective
settings are computed once, when policies load. A route can carry an override too: whoever parses
``routes:`` calls :func:`parse_override` on the route's ``cache:`` / ``prompt_cache:`` /
``compression:`` mapping and registers it with :meth:`Layered.with_route`; the request path asks
:meth:`Layered.for_request` (global < team < route, the most specific wins).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from gateway.policy.reader import Fields
from gateway.policy.yamlsource import Located, PolicyError

CACHE_MODES = ("off", "deterministic", "always")
PROMPT_CACHE_TTLS = ("5m", "1h")
OPENAI_CACHE_KEYS = ("off", "team", "prefix")
STRATEGIES = ("clear_tool_outputs", "summarize", "drop_middle")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The response cache (exact match) for one team or route."""

    mode: str = "deterministic"        # off | deterministic (temperature 0 or a seed) | always
    ttl_s: float = 3600.0
    max_entry_bytes: int = 1 << 20     # answers bigger than this (serialised) are not stored


@dataclass(frozen=True, slots=True)
class PromptCacheSettings:
    """Provider prompt caching: Anthropic ``cache_control`` breakpoints, OpenAI ``prompt_cache_key``."""

    enabled: bool = False
    ttl: str = "5m"                    # Anthropic tier: 5m or 1h
    min_tokens: int | None = None      # None: the model's own minimum cacheable length
    conversation: bool = True          # also mark the last message, so the next turn reads the history
    openai_cache_key: str = "team"     # off | team | prefix (a hash of the team, tools and system prompt)


@dataclass(frozen=True, slots=True)
class CompressionSettings:
    enabled: bool = False
    trigger_tokens: int | None = None  # compress above this many prompt tokens ...
    trigger_fraction: float = 0.8      # ... or above this share of the chosen deployment's context window
    target_tokens: int | None = None   # compress down to this (default: the trigger)
    strategies: tuple[str, ...] = ("clear_tool_outputs", "drop_middle")
    keep_tool_outputs: int = 2         # clear_tool_outputs keeps the last N tool results
    keep_first_turns: int = 1          # turns after the system prompt that are never compressed
    keep_last_turns: int = 2           # the most recent turns, never compressed
    summary_model: str | None = None   # the model ``summarize`` calls, through the gateway's routing
    summary_max_tokens: int = 512


S = TypeVar("S", CacheSettings, PromptCacheSettings, CompressionSettings)


@dataclass(frozen=True)
class Layered(Generic[S]):
    """Global settings, per-team settings (already merged) and per-route overrides."""

    base: S
    teams: dict[str, S] = field(default_factory=dict)
    routes: dict[str, dict[str, Any]] = field(default_factory=dict)
    _memo: dict[tuple[str, str], S] = field(default_factory=dict, compare=False, repr=False)

    def for_request(self, team: str, route: str | None = None) -> S:
        settings = self.teams.get(team, self.base)
        if route is None or route not in self.routes:
            return settings
        found = self._memo.get((team, route))
        if found is None:
            found = self._memo[(team, route)] = replace(settings, **self.routes[route])
        return found

    def with_route(self, route: str, override: dict[str, Any]) -> Layered[S]:
        return Layered(self.base, self.teams, {**self.routes, route: dict(override)})


@dataclass(frozen=True)
class ResponseCachePolicy:
    layers: Layered[CacheSettings] = field(default_factory=lambda: Layered(CacheSettings()))
    memory_max_entries: int = 10_000          # the embedded (in-memory) backend's bounds
    memory_max_bytes: int = 64 << 20

    def for_request(self, team: str, route: str | None = None) -> CacheSettings:
        return self.layers.for_request(team, route)


def _take_choice(f: Fields, key: str, choices: tuple[str, ...]) -> str:
    """One of ``choices``; a bare ``off`` (which YAML reads as false) counts as ``"off"``."""
    if f.data.get(key) is False and "off" in choices:
        f.take_bool(key)
        return "off"
    value = f.take_str(key)
    if value not in choices:
        raise f.error(key, f"must be one of {list(choices)}, got {value!r}")
    return str(value)


def _take_cache(f: Fields) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if f.has("mode"):
        out["mode"] = _take_choice(f, "mode", CACHE_MODES)
    if f.has("ttl_s"):
        out["ttl_s"] = float(f.take_number("ttl_s", minimum=0.001))
    if f.has("max_entry_bytes"):
        out["max_entry_bytes"] = f.take_int("max_entry_bytes", minimum=1)
    return out


def _take_prompt_cache(f: Fields) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if f.has("enabled"):
        out["enabled"] = f.take_bool("enabled")
    if f.has("ttl"):
        out["ttl"] = _take_choice(f, "ttl", PROMPT_CACHE_TTLS)
    if f.has("min_tokens"):
        out["min_tokens"] = f.take_int("min_tokens", minimum=1)
    if f.has("conversation"):
        out["conversation"] = f.take_bool("conversation")
    if f.has("openai_cache_key"):
        out["openai_cache_key"] = _take_choice(f, "openai_cache_key", OPENAI_CACHE_KEYS)
    return out


def _take_compression(f: Fields, models: frozenset[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if f.has("enabled"):
        out["enabled"] = f.take_bool("enabled")
    for key in ("trigger_tokens", "target_tokens"):
        if f.has(key):
            out[key] = f.take_int(key, minimum=1)
    if f.has("trigger_fraction"):
        fraction = f.take_number("trigger_fraction", minimum=0.01, maximum=1.0)
        out["trigger_fraction"] = float(fraction)
    if f.has("strategies"):
        chosen = f.take_str_list("strategies", allowed=frozenset(STRATEGIES))
        if not chosen or len(set(chosen)) != len(chosen):
            raise f.error("strategies", "must name at least one strategy, each once")
        out["strategies"] = tuple(chosen)
    for key in ("keep_tool_outputs", "keep_first_turns", "keep_last_turns"):
        if f.has(key):
            out[key] = f.take_int(key, minimum=0)
    if f.has("summary_model"):
        model = f.take_str("summary_model")
        if model not in models:
            raise f.error("summary_model", f"unknown model {model!r}")
        out["summary_model"] = model
    if f.has("summary_max_tokens"):
        out["summary_max_tokens"] = f.take_int("summary_max_tokens", minimum=16)
    return out


def _check_compression(s: CompressionSettings, f: Fields, given: dict[str, Any]) -> CompressionSettings:
    if "strategies" not in given and s.summary_model is not None and "summarize" not in s.strategies:
        s = replace(s, strategies=("clear_tool_outputs", "summarize", "drop_middle"))
    if "summarize" in s.strategies and s.summary_model is None:
        raise f.error("strategies", "summarize needs a summary_model (here or in the global compression section)")
    if s.trigger_tokens is not None and s.target_tokens is not None and s.target_tokens > s.trigger_tokens:
        raise f.error("target_tokens", f"must not exceed trigger_tokens ({s.trigger_tokens})")
    return s


def parse_override(kind: str, data: Any, path: str, where: tuple[str, int],
                   models: frozenset[str]) -> dict[str, Any]:
    """The keys a route (or team) sets for section ``kind``; for routes parsed elsewhere.

    ``where`` is the (file, line) at which ``data`` is written, for the error when it is no mapping.
    """
    f = Fields(data, path, where)
    if kind == "cache":
        out = _take_cache(f)
    elif kind == "prompt_cache":
        out = _take_prompt_cache(f)
    elif kind == "compression":
        out = _take_compression(f, models)
    else:
        raise ValueError(f"unknown settings kind {kind!r}")
    f.finish()
    return out


def _section(kind: str, section: Any, base: S, models: frozenset[str]) -> tuple[Layered[S], Fields]:
    if not isinstance(section, Located):
        raise PolicyError(getattr(section, "file", "<policies>"), getattr(section, "line", 1), kind,
                          "must be a mapping")
    f = Fields(section, kind, (section.file, section.line))
    given = {"cache": _take_cache, "prompt_cache": _take_prompt_cache}[kind](f) if kind != "compression" \
        else _take_compression(f, models)
    glob = replace(base, **given)
    if isinstance(glob, CompressionSettings):
        glob = _check_compression(glob, f, given)
    teams: dict[str, S] = {}
    team_section = f.take_mapping("teams")
    positions = {team: team_section.position(team) for team in team_section} if team_section else {}
    for team, body in (team_section or {}).items():
        if body is None:
            teams[team] = glob
            continue
        where = positions[team]
        over = parse_override(kind, body, f"{kind}.teams.{team}", where, models)
        settings = replace(glob, **over)
        if isinstance(settings, CompressionSettings):
            settings = _check_compression(settings, Fields(body, f"{kind}.teams.{team}", where), {**given, **over})
        teams[team] = settings
    return Layered(glob, teams), f


def parse_cache(section: Any) -> ResponseCachePolicy:
    layers, f = _section("cache", section, CacheSettings(), frozenset())
    entries = f.take_int("memory_max_entries", 10_000, minimum=1)
    size = f.take_int("memory_max_bytes", 64 << 20, minimum=1024)
    f.finish()
    return ResponseCachePolicy(layers, entries, size)


def parse_prompt_cache(section: Any) -> Layered[PromptCacheSettings]:
    layers, f = _section("prompt_cache", section, PromptCacheSettings(), frozenset())
    f.finish()
    return layers


def parse_compression(section: Any, models: frozenset[str]) -> Layered[CompressionSettings]:
    layers, f = _section("compression", section, CompressionSettings(), models)
    f.finish()
    return layers
