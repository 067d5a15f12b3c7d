"""Loading the operator's policy files into one immutable :class:`Policies` value.

All ``*.yaml``/``*.yml`` files in the config directory are read in name order
and merged section by section; each section is validated strictly and every
error names file, line and key. The result is plain frozen data, built once
per (re)load and only read by the request path.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.policy.caching import (
    CacheSettings,
    CompressionSettings,
    Layered,
    PromptCacheSettings,
    ResponseCachePolicy,
    parse_cache,
    parse_compression,
    parse_prompt_cache,
)
from gateway.policy.cases import PolicyCase, parse_cases
from gateway.policy.limits import Limits, LimitTable, parse_limits
from gateway.policy.models import Deployment, ModelSpec, SimulatedSpec, parse_models
from gateway.policy.notify import NotifySpec, parse_notify
from gateway.policy.routes import HealthSpec, Route, parse_health, parse_routes
from gateway.policy.teams import DEFAULT_TEAM, TeamBudget, TeamSpec, parse_teams
from gateway.policy.yamlsource import Located, LocatedList, PolicyError, load_file
from gateway.pricing import PriceBook

__all__ = ["DEFAULT_TEAM", "CacheSettings", "LimitTable", "Limits",
           "CompressionSettings", "Deployment", "HealthSpec", "Layered", "ModelSpec",
           "Policies", "PolicyCase", "PolicyError", "PromptCacheSettings", "ResponseCachePolicy", "Route",
           "SimulatedSpec", "TeamBudget", "TeamSpec", "load_policies", "policy_files"]

SECTIONS = ("models", "routes", "health", "teams", "users", "tags", "sessions", "notify", "tests", "cache",
            "prompt_cache", "compression")
LIST_SECTIONS = ("routes", "tests")


@dataclass(frozen=True, slots=True)
class Policies:
    models: dict[str, ModelSpec]
    files: tuple[str, ...] = ()
    deployments: tuple[Deployment, ...] = field(default=())
    teams: dict[str, TeamSpec] = field(default_factory=lambda: {DEFAULT_TEAM: TeamSpec(DEFAULT_TEAM)})
    routes: tuple[Route, ...] = ()
    route_names: frozenset[str] = frozenset()   # names clients may ask for that only routes define (e.g. auto)
    health: HealthSpec = field(default_factory=HealthSpec)
    cases: tuple[PolicyCase, ...] = ()          # policy test cases, run by `gateway check`
    cache: ResponseCachePolicy = field(default_factory=ResponseCachePolicy)
    prompt_cache: Layered[PromptCacheSettings] = field(default_factory=lambda: Layered(PromptCacheSettings()))
    compression: Layered[CompressionSettings] = field(default_factory=lambda: Layered(CompressionSettings()))
    users: LimitTable = field(default_factory=lambda: LimitTable("user"))
    tags: LimitTable = field(default_factory=lambda: LimitTable("tag"))
    sessions: LimitTable = field(default_factory=lambda: LimitTable("session"))
    notify: NotifySpec = field(default_factory=NotifySpec)

    def model(self, name: str) -> ModelSpec | None:
        return self.models.get(name)

    def unique_models(self) -> list[ModelSpec]:
        seen: dict[str, ModelSpec] = {}
        for spec in self.models.values():
            seen.setdefault(spec.name, spec)
        return list(seen.values())


def policy_files(config_dir: str) -> list[str]:
    files = glob.glob(os.path.join(config_dir, "*.yaml")) + glob.glob(os.path.join(config_dir, "*.yml"))
    return sorted(files)


def load_policies(config_dir: str, env: dict[str, str] | None = None) -> Policies:
    if not os.path.isdir(config_dir):
        raise PolicyError(config_dir, 0, "<config>", "policy directory does not exist")
    files = policy_files(config_dir)
    if not files:
        raise PolicyError(config_dir, 0, "<config>", "no *.yaml policy files found")
    merged: dict[str, Any] = {}
    for path in files:
        doc = load_file(path)
        if doc is None:
            continue
        for section, value in doc.items():
            if section not in SECTIONS:
                raise doc.error(section, f"unknown section; expected one of {list(SECTIONS)}")
            _merge(merged, section, value, doc)
    book = PriceBook.bundled()
    models = parse_models(merged["models"], book, env) if "models" in merged else {}
    if not models:
        raise PolicyError(config_dir, 0, "models", "no models defined")
    deployments = tuple(d for spec in {s.name: s for s in models.values()}.values() for d in spec.deployments)
    routes = parse_routes(merged["routes"], models) if "routes" in merged else ()
    route_names = frozenset(n for r in routes for n in (r.match.models or ()) if n not in models)
    teams = parse_teams(merged["teams"], frozenset(models) | route_names) if "teams" in merged \
        else {DEFAULT_TEAM: TeamSpec(DEFAULT_TEAM)}
    health = parse_health(merged["health"]) if "health" in merged else HealthSpec()
    cases = parse_cases(merged["tests"]) if "tests" in merged else ()
    names = frozenset(models)
    cache = parse_cache(merged["cache"]) if "cache" in merged else ResponseCachePolicy()
    prompt_cache = parse_prompt_cache(merged["prompt_cache"]) if "prompt_cache" in merged \
        else Layered(PromptCacheSettings())
    compression = parse_compression(merged["compression"], names) if "compression" in merged \
        else Layered(CompressionSettings())
    for route in routes:                      # route overrides: global < team < route
        for kind, override in route.overrides:
            if kind == "cache":
                cache = replace(cache, layers=cache.layers.with_route(route.name, override))
            elif kind == "prompt_cache":
                prompt_cache = prompt_cache.with_route(route.name, override)
            else:
                compression = compression.with_route(route.name, override)
    limits = {name: parse_limits(name, merged[name]) if name in merged else LimitTable(scope)
              for name, scope in (("users", "user"), ("tags", "tag"), ("sessions", "session"))}
    return Policies(models=models, files=tuple(files), deployments=deployments, teams=teams, routes=routes,
                    route_names=route_names, health=health, cases=cases, cache=cache, prompt_cache=prompt_cache,
                    compression=compression, users=limits["users"], tags=limits["tags"],
                    sessions=limits["sessions"],
                    notify=parse_notify(merged["notify"], env) if "notify" in merged else NotifySpec())


def _merge(merged: dict[str, Any], section: str, value: Any, doc: Located) -> None:
    if section in LIST_SECTIONS:    # rules and cases: concatenated in file order
        if not isinstance(value, LocatedList):
            raise doc.error(section, "must be a list")
        if section in merged:
            merged[section].extend_located(value)
        else:
            merged[section] = value
        return
    if not isinstance(value, Located):
        raise doc.error(section, "must be a mapping")
    target = merged.get(section)
    if target is None:
        merged[section] = value
        return
    for key, item in value.items():
        if key in target:
            raise value.error(f"{section}.{key}",
                              f"already defined in {target.file}:{target.line_of(key)}")
        target[key] = item
        target.key_lines[key] = value.line_of(key)
