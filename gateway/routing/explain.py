"""Explaining routing decisions and running the policy test cases, offline.

``gateway route --team T --model M --file request.json`` prints which rule matches a
request, the candidates in order and why each was or was not chosen;
``gateway check`` runs the ``tests:`` cases kept next to the policies and fails on a
mismatch. Both call the same pure :func:`~gateway.routing.resolve.resolve_policy` the request
path uses (with no health data unless one is passed: every deployment counts as
healthy), so what they say is what the gateway does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.errors import GatewayError
from gateway.policy import Policies, PolicyCase
from gateway.policy.teams import TeamSpec
from gateway.routing.resolve import NO_HEALTH, HealthView, Plan, RouteInput, resolve_policy

Shape = Callable[[str, dict[str, Any]], tuple[str, dict[str, Any]]]   # (endpoint, body) as routing reads them


def route_input(policies: Policies, team: str, model: str, body: dict[str, Any], endpoint: str = "chat",
                headers: dict[str, str] | None = None, key_id: str | None = None,
                shape: Shape | None = None) -> RouteInput:
    """``shape``: turns a request of another API (Messages, Responses) into the shape routing reads."""
    spec = policies.teams.get(team) or TeamSpec(team)
    if shape is not None:
        endpoint, body = shape(endpoint, body)
    return RouteInput(team=team, model=model, endpoint=endpoint, body=body, raw_size=len(repr(body)),
                      key_id=key_id, headers=headers or {}, allowed=spec.allowed_models)


def explain(policies: Policies, inp: RouteInput, health: HealthView = NO_HEALTH) -> tuple[str, Plan | None]:
    """The routing decision for ``inp`` as text, and the plan (None when the request is refused).

    ``health`` is a snapshot of cooled-down deployments and observed latencies to decide with."""
    lines = [f"request: team {inp.team}, model {inp.model}, endpoint {inp.endpoint}"]
    try:
        plan = resolve_policy(policies, inp, health, pick=0.0, explain=True)
    except GatewayError as exc:
        lines.extend(getattr(exc, "__notes__", ()))
        lines.append(f"refused: {exc.status_code} {exc.code}: {exc.message}")
        return "\n".join(lines), None
    lines.extend(plan.notes)
    lines.append(f"decision: route {plan.route}, first deployment {plan.candidates[0].id}")
    return "\n".join(lines), plan


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: PolicyCase
    ok: bool
    got: str

    def line(self) -> str:
        where = f"{self.case.file}:{self.case.line}"
        return f"{'ok  ' if self.ok else 'FAIL'} {self.case.name} ({where}): {self.got}"


def run_case(policies: Policies, case: PolicyCase, shape: Shape | None = None) -> CaseResult:
    inp = route_input(policies, case.team, case.model, case.body, case.endpoint, dict(case.headers), case.key_id,
                      shape)
    try:
        plan = resolve_policy(policies, inp, pick=0.0)
    except GatewayError as exc:
        ok = case.expect_error == exc.code
        return CaseResult(case, ok, f"error {exc.code}" + ("" if ok else _wanted(case)))
    got = f"route {plan.route}, deployment {plan.candidates[0].id}"
    ok = case.expect_error is None
    if case.expect_route is not None and case.expect_route != plan.route:
        ok = False
    if case.expect_deployment is not None and case.expect_deployment != plan.candidates[0].id:
        ok = False
    return CaseResult(case, ok, got + ("" if ok else _wanted(case)))


def _wanted(case: PolicyCase) -> str:
    parts = [f"{k} {v}" for k, v in (("route", case.expect_route), ("deployment", case.expect_deployment),
                                     ("error", case.expect_error)) if v is not None]
    return f" (expected {', '.join(parts)})"


def run_cases(policies: Policies, shape: Shape | None = None) -> list[CaseResult]:
    return [run_case(policies, case, shape) for case in policies.cases]
