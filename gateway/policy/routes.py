"""The ``routes`` and ``health`` sections: ordered routing rules and deployment health settings.

A route is a rule: what it matches (team, key, requested model or alias, request
headers and tags, estimated prompt size, required capabilities, detected content)
and where matching requests go (candidate models or deployments, a strategy to
order them, which failures fall back, an attempt limit and a deadline). The first
rule that matches decides; with none, a request goes to its model's own deployments.
``health`` says when a failing deployment is cooled down and how self-hosted ones are
checked. Everything is validated here, strictly, once per load; the request path only
reads the frozen result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from gateway.policy.caching import parse_override
from gateway.policy.models import CAPABILITIES, Deployment, ModelSpec
from gateway.policy.reader import Fields
from gateway.policy.yamlsource import Located, LocatedList, PolicyError

STRATEGIES = frozenset({"fallback", "weighted", "cheapest", "latency"})
FAILURE_KINDS = frozenset({"rate_limit", "server_error", "timeout", "connection", "auth", "context_length"})
DEFAULT_RETRY_ON = frozenset({"rate_limit", "server_error", "timeout", "connection", "auth", "context_length"})
DETECTORS = frozenset({"personal_data", "email", "phone", "card_number", "secrets"})
DEFAULT_ROUTE = "default"
OVERRIDE_KINDS = ("cache", "prompt_cache", "compression")   # per-route settings of the saving stages


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """Conditions of a rule; every one given must hold (an absent one matches anything)."""

    teams: frozenset[str] | None = None
    keys: frozenset[str] | None = None
    models: frozenset[str] | None = None              # requested names; a model's aliases added at load
    headers: tuple[tuple[str, str], ...] = ()         # lower-cased name, exact value
    tags: frozenset[str] | None = None                # any of these in x-gateway-tags
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None
    capabilities: frozenset[str] | None = None        # the request needs all of these
    contains: frozenset[str] | None = None            # any of these detectors fires

    @property
    def needs_tokens(self) -> bool:
        return self.min_prompt_tokens is not None or self.max_prompt_tokens is not None


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    match: RouteMatch
    candidates: tuple[Deployment, ...]                # flattened, in the order written
    strategy: str = "fallback"
    retry_on: frozenset[str] = DEFAULT_RETRY_ON
    max_attempts: int | None = None                   # None: every candidate may be tried
    deadline_s: float | None = None                   # overall, across attempts
    baseline: ModelSpec | None = None                 # the model savings are measured against
    expected_output_tokens: int = 256                 # for "cheapest" when max_tokens is absent
    overrides: tuple[tuple[str, dict[str, Any]], ...] = ()   # (cache | prompt_cache | compression, settings)
    strict_translation: bool = False                  # a feature translation would drop: a 400 instead
    file: str = ""
    line: int = 0


@dataclass(frozen=True, slots=True)
class HealthSpec:
    failures: int = 3                # this many retryable failures ...
    min_failure_ratio: float = 0.5   # ... that are at least this share of its calls ...
    window_s: float = 30.0           # ... within this window cool a deployment down ...
    cooldown_s: float = 30.0         # ... for this long, on every replica
    check_interval_s: float = 10.0   # active checks of self-hosted deployments (0: off)
    check_timeout_s: float = 2.0
    latency_alpha: float = 0.2       # weight of a new sample in the latency moving average
    sync_interval_s: float = 1.0     # how often replicas exchange health and latency state


def parse_health(section: Any) -> HealthSpec:
    if not isinstance(section, Located):
        raise PolicyError(getattr(section, "file", "<policies>"), getattr(section, "line", 1),
                          "health", "must be a mapping")
    f = Fields(section, "health", (section.file, section.line))
    spec = HealthSpec(
        failures=f.take_int("failures", 3, minimum=1),
        min_failure_ratio=float(f.take_number("min_failure_ratio", 0.5, minimum=0.0, maximum=1.0)),
        window_s=float(f.take_number("window_s", 30.0, minimum=0.1)),
        cooldown_s=float(f.take_number("cooldown_s", 30.0, minimum=0.0)),
        check_interval_s=float(f.take_number("check_interval_s", 10.0, minimum=0.0)),
        check_timeout_s=float(f.take_number("check_timeout_s", 2.0, minimum=0.05)),
        latency_alpha=float(f.take_number("latency_alpha", 0.2, minimum=0.01, maximum=1.0)),
        sync_interval_s=float(f.take_number("sync_interval_s", 1.0, minimum=0.05)),
    )
    f.finish()
    return spec


def parse_routes(section: Any, models: dict[str, ModelSpec]) -> tuple[Route, ...]:
    if not isinstance(section, LocatedList):
        raise PolicyError(getattr(section, "file", "<policies>"), getattr(section, "line", 1),
                          "routes", "must be a list of rules")
    by_id = {d.id: d for spec in models.values() for d in spec.deployments}
    routes: list[Route] = []
    names: set[str] = set()
    for i, item in enumerate(section):
        route = _parse_route(item, f"routes[{i}]", section.position(i), models, by_id)
        if route.name in names or route.name == DEFAULT_ROUTE:
            why = "reserved" if route.name == DEFAULT_ROUTE else "used twice"
            raise PolicyError(route.file, route.line, f"routes[{i}].name", f"route name {route.name!r} is {why}")
        names.add(route.name)
        routes.append(_with_all_model_names(route, models))
    return tuple(routes)


def _parse_route(data: Any, path: str, where: tuple[str, int], models: dict[str, ModelSpec],
                 by_id: dict[str, Deployment]) -> Route:
    f = Fields(data, path, where)
    name = f.take_str("name")
    match_data = f.take_mapping("match")
    raw_candidates = f.take_str_list("candidates")
    strategy = f.take_str("strategy", "fallback")
    if strategy not in STRATEGIES:
        raise f.error("strategy", f"must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    retry_on = f.take_str_list("retry_on", sorted(DEFAULT_RETRY_ON), allowed=FAILURE_KINDS)
    max_attempts = f.take_int("max_attempts", None, minimum=1)
    deadline_s = f.take_number("deadline_s", None, minimum=0.01)
    baseline_name = f.take_str("baseline", None)
    expected_output = f.take_int("expected_output_tokens", 256, minimum=1)
    strict = bool(f.take_bool("strict_translation", False))
    overrides = []
    for kind in OVERRIDE_KINDS:
        section = f.take_mapping(kind)
        if section is not None:
            overrides.append((kind, parse_override(kind, section, f"{path}.{kind}", f.data.position(kind),
                                                   frozenset(models))))
    f.finish()

    if not raw_candidates:
        raise f.error("candidates", "at least one candidate (a model name or deployment id) is required")
    candidates: list[Deployment] = []
    for cand in raw_candidates:
        if cand in models:
            found = models[cand].deployments
        elif cand in by_id:
            found = (by_id[cand],)
        else:
            raise f.error("candidates", f"{cand!r} is neither a model nor a deployment id")
        candidates.extend(d for d in found if d not in candidates)
    baseline = None
    if baseline_name is not None:
        if baseline_name not in models:
            raise f.error("baseline", f"unknown model {baseline_name!r}")
        baseline = models[baseline_name]
    match = _parse_match(match_data, f"{path}.match", f.data.position("match")) if match_data is not None \
        else RouteMatch()
    return Route(name=name, match=match, candidates=tuple(candidates), strategy=strategy,
                 retry_on=frozenset(retry_on), max_attempts=max_attempts,
                 deadline_s=float(deadline_s) if deadline_s is not None else None,
                 baseline=baseline, expected_output_tokens=expected_output, overrides=tuple(overrides),
                 strict_translation=strict, file=data.file, line=data.line)


def _set(values: list[str] | None) -> frozenset[str] | None:
    return frozenset(values) if values is not None else None


def _parse_match(data: Located, path: str, where: tuple[str, int]) -> RouteMatch:
    f = Fields(data, path, where)
    teams = f.take_str_list("teams", None)
    keys = f.take_str_list("keys", None)
    model_names = f.take_str_list("models", None)
    headers = f.take_str_map("headers", {})
    tags = f.take_str_list("tags", None)
    min_tokens = f.take_int("min_prompt_tokens", None, minimum=0)
    max_tokens = f.take_int("max_prompt_tokens", None, minimum=0)
    caps = f.take_str_list("capabilities", None, allowed=CAPABILITIES)
    contains = f.take_str_list("contains", None, allowed=DETECTORS)
    f.finish()
    if min_tokens is not None and max_tokens is not None and min_tokens > max_tokens:
        raise f.error("max_prompt_tokens", f"is below min_prompt_tokens ({max_tokens} < {min_tokens})")
    return RouteMatch(teams=_set(teams), keys=_set(keys), models=_set(model_names),
                      headers=tuple((k.lower(), v) for k, v in headers.items()), tags=_set(tags),
                      min_prompt_tokens=min_tokens, max_prompt_tokens=max_tokens,
                      capabilities=_set(caps), contains=_set(contains))


def _with_all_model_names(route: Route, models: dict[str, ModelSpec]) -> Route:
    """``route`` with ``match.models`` widened to every name of each model it names.

    Aliases are other names for the same model, so a rule written on a model (by its name
    or by any alias) matches a request for any of its names. Done once per load: the
    request path still compares one string against one set.
    """
    names = route.match.models
    if names is None:
        return route
    wide = set(names)
    for name in names:
        spec = models.get(name)
        if spec is not None:
            wide.update((spec.name, *spec.aliases))
    if len(wide) == len(names):
        return route
    return replace(route, match=replace(route.match, models=frozenset(wide)))
