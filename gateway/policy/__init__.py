"""Loading the operator's policy files into one immutable :class:`Policies` value.

All ``*.yaml``/``*.yml`` files in the config directory are read in name order
and merged section by section; each section is validated strictly and every
error names file, line and key. The result is plain frozen data, built once
per (re)load and only read by the request path.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
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
from gateway.policy.models import Deployment, ModelSpec, SimulatedSpec, parse_models
from gateway.policy.teams import DEFAULT_TEAM, TeamBudget, TeamSpec, parse_teams
from gateway.policy.yamlsource import Located, PolicyError, load_file
from gateway.pricing import PriceBook

__all__ = ["DEFAULT_TEAM", "CacheSettings", "CompressionSettings", "Deployment", "Layered", "ModelSpec", "Policies",
           "PolicyError", "PromptCacheSettings", "ResponseCachePolicy", "SimulatedSpec", "TeamBudget", "TeamSpec",
           "load_policies"]

SECTIONS = ("models", "teams", "cache", "prompt_cache", "compression")


@dataclass(frozen=True, slots=True)
class Policies:
    models: dict[str, ModelSpec]
    files: tuple[str, ...] = ()
    deployments: tuple[Deployment, ...] = field(default=())
    teams: dict[str, TeamSpec] = field(default_factory=lambda: {DEFAULT_TEAM: TeamSpec(DEFAULT_TEAM)})
    cache: ResponseCachePolicy = field(default_factory=ResponseCachePolicy)
    prompt_cache: Layered[PromptCacheSettings] = field(default_factory=lambda: Layered(PromptCacheSettings()))
    compression: Layered[CompressionSettings] = field(default_factory=lambda: Layered(CompressionSettings()))

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
    merged: dict[str, Located] = {}
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
    teams = parse_teams(merged["teams"], frozenset(models)) if "teams" in merged \
        else {DEFAULT_TEAM: TeamSpec(DEFAULT_TEAM)}
    names = frozenset(models)
    return Policies(
        models=models, files=tuple(files), deployments=deployments, teams=teams,
        cache=parse_cache(merged["cache"]) if "cache" in merged else ResponseCachePolicy(),
        prompt_cache=parse_prompt_cache(merged["prompt_cache"]) if "prompt_cache" in merged
        else Layered(PromptCacheSettings()),
        compression=parse_compression(merged["compression"], names) if "compression" in merged
        else Layered(CompressionSettings()))


def _merge(merged: dict[str, Located], section: str, value: Any, doc: Located) -> None:
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
