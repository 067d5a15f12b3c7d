"""The ``tests`` section: policy test cases that ``gateway check`` runs against the routes.

A case names a team (and optionally a key id), a requested model, request headers
and a request body (inline, or a JSON file relative to the policy file), and what the
policies must decide: the route, the first deployment, or an error code. Cases
live next to the policies they test, so a policy change that breaks an intent fails
``gateway check`` before it reaches traffic.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from gateway.policy.reader import Fields
from gateway.policy.yamlsource import LocatedList, PolicyError

ENDPOINTS = ("chat", "completions", "embeddings", "messages", "responses")


@dataclass(frozen=True, slots=True)
class PolicyCase:
    name: str
    team: str
    model: str
    endpoint: str
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...]
    key_id: str | None
    expect_route: str | None
    expect_deployment: str | None
    expect_error: str | None
    file: str
    line: int


def _plain(value: Any) -> Any:
    """Located mappings and lists back to plain JSON-like values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def parse_cases(section: Any) -> tuple[PolicyCase, ...]:
    if not isinstance(section, LocatedList):
        raise PolicyError(getattr(section, "file", "<policies>"), getattr(section, "line", 1),
                          "tests", "must be a list of cases")
    return tuple(_parse_case(item, f"tests[{i}]", section.position(i)) for i, item in enumerate(section))


def _parse_case(data: Any, path: str, where: tuple[str, int]) -> PolicyCase:
    f = Fields(data, path, where)
    name = f.take_str("name")
    team = f.take_str("team", "default")
    key_id = f.take_str("key", None)
    model = f.take_str("model")
    endpoint = f.take_str("endpoint", "chat")
    if endpoint not in ENDPOINTS:
        raise f.error("endpoint", f"must be one of {list(ENDPOINTS)}, got {endpoint!r}")
    headers = f.take_str_map("headers", {})
    inline = f.take_mapping("request")
    file = f.take_str("file", None)
    expect = f.take_mapping("expect")
    f.finish()
    if (inline is None) == (file is None):
        raise f.error("request", "give exactly one of `request` (inline body) or `file` (a JSON body)")
    if file is not None:
        full = os.path.join(os.path.dirname(data.file), file)
        try:
            with open(full, encoding="utf-8") as fh:
                body = json.load(fh)
        except (OSError, ValueError) as exc:
            raise f.error("file", f"cannot read a JSON body from {full}: {exc}") from None
        if not isinstance(body, dict):
            raise f.error("file", f"{full} must hold a JSON object")
    else:
        body = _plain(inline)
    body.setdefault("model", model)
    if expect is None:
        raise f.error("expect", "is required: route, deployment and/or error")
    e = Fields(expect, f"{path}.expect", f.data.position("expect"))
    route = e.take_str("route", None)
    deployment = e.take_str("deployment", None)
    error = e.take_str("error", None)
    e.finish()
    if route is None and deployment is None and error is None:
        raise e.error("route", "expect at least one of route, deployment, error")
    return PolicyCase(name=name, team=team, model=model, endpoint=endpoint, body=body,
                      headers=tuple((k.lower(), v) for k, v in headers.items()), key_id=key_id,
                      expect_route=route, expect_deployment=deployment, expect_error=error,
                      file=data.file, line=data.line)
