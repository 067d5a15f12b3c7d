"""Resolving a request to an ordered list of candidate deployments: a pure function.

:func:`resolve_policy` takes the loaded policies, what is known about the request
(:class:`RouteInput`) and a snapshot of deployment health and latency
(:class:`HealthView`), and returns a :class:`Plan`: the rule that decided, the
deployments to try in order, and the baseline deployment savings are measured
against. Rules are tried in order and the first whose every condition holds wins;
with none, the requested model's own deployments are used (weighted, with fallback).
Candidates that lack a capability the request needs, or whose context window is
too small, are left out; cooled-down ones go last. With ``explain=True`` the plan
also says why each rule did or did not match and why each candidate was or was not
chosen (``gateway route`` prints it). No I/O; randomness for weighted choice is an
argument.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import ContextLengthExceeded, GatewayError, InvalidRequest, ModelNotFound, PermissionDenied
from gateway.policy import Deployment, ModelSpec, Policies
from gateway.policy.routes import DEFAULT_RETRY_ON, DEFAULT_ROUTE, Route
from gateway.pricing import Price
from gateway.routing.detectors import detect, request_text
from gateway.tokens import count_prompt

ENDPOINT_CAPABILITY = {"chat": "chat", "completions": "completions", "embeddings": "embeddings"}
TAGS_HEADER = "x-gateway-tags"


@dataclass(slots=True)
class RouteInput:
    """What routing may look at: who asks, for what, and the request itself. A value: never changed once
    made (not frozen, as :class:`Plan`, only because a frozen one costs about three times as much to make,
    once or twice per request)."""

    team: str
    model: str
    endpoint: str
    body: dict[str, Any]
    raw_size: int = 0
    key_id: str | None = None
    headers: dict[str, str] = field(default_factory=dict)   # lower-cased names
    allowed: frozenset[str] | None = None                    # the team's allowed models (None: all)


@dataclass(frozen=True, slots=True)
class HealthView:
    """A snapshot of shared deployment state: which are cooled down, and observed latency (seconds)."""

    cooled: frozenset[str] = frozenset()
    latency: dict[str, float] = field(default_factory=dict)   # moving average of the whole call
    ttft: dict[str, float] = field(default_factory=dict)      # moving average of time to first token


NO_HEALTH = HealthView()


@dataclass(slots=True)
class Plan:
    """The routing decision: candidates in order, the rule that chose them, the baseline for savings. A
    value: never changed once made (:func:`dataclasses.replace` makes a changed copy)."""

    model: ModelSpec                     # the requested model, or the baseline model for a route-only name
    requested: str
    candidates: tuple[Deployment, ...]
    route: str
    baseline: Deployment
    prompt_tokens: int | None = None
    rule: Route | None = None
    notes: tuple[str, ...] = ()          # with explain=True: the reasoning, line by line
    too_long: str | None = None          # the prompt fits no candidate's window (candidates: the capable ones)

    def too_long_error(self) -> ContextLengthExceeded:
        return ContextLengthExceeded(self.too_long or "The prompt is too long.", param="messages")

    @property
    def retry_on(self) -> frozenset[str]:
        return self.rule.retry_on if self.rule is not None else DEFAULT_RETRY_ON

    @property
    def max_attempts(self) -> int:
        limit = self.rule.max_attempts if self.rule is not None else None
        return min(limit, len(self.candidates)) if limit else len(self.candidates)

    @property
    def deadline_s(self) -> float | None:
        return self.rule.deadline_s if self.rule is not None else None


class _Facts:
    """Request facts computed at most once, and only when a rule or a check needs them."""

    def __init__(self, inp: RouteInput, model_hint: str) -> None:
        self.inp = inp
        self.model_hint = model_hint
        self._tokens: int | None = None
        self._text: str | None = None
        self.needs = required_capabilities(inp.endpoint, inp.body)
        self.tags = frozenset(t.strip() for t in inp.headers.get(TAGS_HEADER, "").split(",") if t.strip())

    @property
    def counted(self) -> int | None:
        return self._tokens

    def tokens(self) -> int:
        if self._tokens is None:
            self._tokens = count_prompt(self.inp.body, self.inp.endpoint, self.model_hint)
        return self._tokens

    def detected(self, names: frozenset[str]) -> list[str]:
        if self._text is None:
            self._text = request_text(self.inp.endpoint, self.inp.body)
        return detect(names, self._text)


def required_capabilities(endpoint: str, body: dict[str, Any]) -> set[str]:
    needs = {ENDPOINT_CAPABILITY[endpoint]}
    if body.get("tools") or body.get("functions"):
        needs.add("tools")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        needs.add("json")
    messages = body.get("messages") if endpoint == "chat" else None
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
                isinstance(p, dict) and p.get("type") == "image_url" for p in content):
            needs.add("vision")
            break
    return needs


def weighted_order(deployments: tuple[Deployment, ...], pick: float) -> tuple[Deployment, ...]:
    """First one drawn by weight (``pick`` in [0, 1)), the rest in their configured order."""
    if len(deployments) <= 1:
        return deployments
    total = sum(d.weight for d in deployments)
    if total <= 0:
        return deployments
    point = pick * total
    for i, d in enumerate(deployments):
        point -= d.weight
        if point < 0:
            return (d, *deployments[:i], *deployments[i + 1:])
    return deployments


def _why_not(rule: Route, inp: RouteInput, facts: _Facts) -> str | None:
    """None when every condition of ``rule`` holds, else the first one that does not."""
    m = rule.match
    if m.teams is not None and inp.team not in m.teams:
        return f"team {inp.team!r} not in {sorted(m.teams)}"
    if m.keys is not None and inp.key_id not in m.keys:
        return f"key {inp.key_id!r} not in {sorted(m.keys)}"
    if m.models is not None and inp.model not in m.models:
        return f"model {inp.model!r} not in {sorted(m.models)}"
    for name, value in m.headers:
        if inp.headers.get(name) != value:
            return f"header {name} is not {value!r}"
    if m.tags is not None and not (m.tags & facts.tags):
        return f"no tag of {sorted(m.tags)} in {TAGS_HEADER}"
    if m.capabilities is not None and not m.capabilities <= facts.needs:
        return f"request does not need {sorted(m.capabilities - facts.needs)}"
    if m.needs_tokens:
        n = facts.tokens()
        if m.min_prompt_tokens is not None and n < m.min_prompt_tokens:
            return f"{n} prompt tokens < {m.min_prompt_tokens}"
        if m.max_prompt_tokens is not None and n > m.max_prompt_tokens:
            return f"{n} prompt tokens > {m.max_prompt_tokens}"
    if m.contains is not None:
        fired = facts.detected(m.contains)
        if not fired:
            return f"no {', '.join(sorted(m.contains))} detected"
    return None


def estimated_cost_pico(price: Price, prompt_tokens: int, output_tokens: int) -> int:
    rates = price.at(prompt_tokens)    # a long prompt may fall in a dearer tier
    return prompt_tokens * rates.input + output_tokens * rates.output


def _expected_output(body: dict[str, Any], default: int) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def _order(rule: Route | None, fitting: tuple[Deployment, ...], inp: RouteInput, facts: _Facts,
           health: HealthView, pick: float, notes: list[str] | None) -> tuple[Deployment, ...]:
    strategy = rule.strategy if rule is not None else "weighted"
    if strategy == "weighted":
        ordered = weighted_order(fitting, pick)
    elif strategy == "cheapest":
        out = 0 if inp.endpoint == "embeddings" else _expected_output(
            inp.body, rule.expected_output_tokens if rule is not None else 256)
        tokens = facts.tokens()
        costs = {d.id: estimated_cost_pico(d.price, tokens, out) for d in fitting}
        ordered = tuple(sorted(fitting, key=lambda d: costs[d.id]))
        if notes is not None:
            notes.extend(f"  {d.id}: estimated ${costs[d.id] / 1e12:.6f} for {tokens} in + {out} out tokens"
                         for d in ordered)
    elif strategy == "latency":
        stream = inp.body.get("stream") is True
        seen = health.ttft if stream else health.latency
        ordered = tuple(sorted(fitting, key=lambda d: seen.get(d.id, 0.0)))
        if notes is not None:
            what = "time to first token" if stream else "duration"
            notes.extend(f"  {d.id}: observed {what} "
                         + (f"{seen[d.id] * 1000:.1f} ms" if d.id in seen else "unknown (tried first)")
                         for d in ordered)
    else:
        ordered = fitting
    if health.cooled:
        ordered = (*(d for d in ordered if d.id not in health.cooled), *(d for d in ordered if d.id in health.cooled))
    return ordered


def _fit(candidates: tuple[Deployment, ...], facts: _Facts, inp: RouteInput,
         notes: list[str] | None) -> tuple[tuple[Deployment, ...], int, tuple[Deployment, ...]]:
    """(candidates with the request's capabilities, the team's permission and a big enough window;
    the largest window among the capable ones; the capable ones whatever their window)."""
    fitting: list[Deployment] = []
    for d in candidates:
        if inp.allowed is not None and d.model not in inp.allowed:
            _note(notes, f"  {d.id}: skipped, team may not use model {d.model!r}")
        elif not facts.needs <= d.capabilities:
            _note(notes, f"  {d.id}: skipped, lacks {', '.join(sorted(facts.needs - d.capabilities))}")
        else:
            fitting.append(d)
    capable = tuple(fitting)
    windows = [d.context_window for d in fitting if d.context_window]
    largest = max(windows, default=0)
    # A prompt's tokens never outnumber its bytes by much, so small bodies skip counting.
    if windows and (facts.counted is not None or inp.raw_size * 2 > min(windows)):
        tokens = facts.tokens()
        kept = []
        for d in fitting:
            if d.context_window and tokens >= d.context_window:
                _note(notes, f"  {d.id}: skipped, {tokens} prompt tokens do not fit its {d.context_window} window")
            else:
                kept.append(d)
        fitting = kept
    return tuple(fitting), largest, capable


def _note(notes: list[str] | None, text: str) -> None:
    if notes is not None:
        notes.append(text)


def resolve_policy(policies: Policies, inp: RouteInput, health: HealthView = NO_HEALTH,
                   pick: float | None = None, explain: bool = False, allow_too_long: bool = False) -> Plan:
    """The plan for ``inp``; raises the client-facing error when no deployment may serve it.

    With ``explain`` the plan's ``notes`` (or, on a refusal, the exception's notes) say why. A prompt
    too long for every candidate's window raises ``context_length_exceeded``, or with
    ``allow_too_long`` returns a plan that says so (``too_long``: a cached answer may still serve the
    request, or compression shrink it to fit)."""
    notes: list[str] | None = [] if explain else None
    try:
        plan = _resolve(policies, inp, health, random.random() if pick is None else pick, notes)
    except GatewayError as exc:
        if notes:
            exc.add_note("\n".join(notes))
        raise
    if plan.too_long is not None and not allow_too_long:
        error = plan.too_long_error()
        if notes:
            error.add_note("\n".join(notes))
        raise error
    return plan


def _resolve(policies: Policies, inp: RouteInput, health: HealthView, pick: float,
             notes: list[str] | None) -> Plan:
    spec = policies.model(inp.model)
    if spec is not None and inp.allowed is not None and spec.name not in inp.allowed \
            and inp.model not in inp.allowed:
        raise PermissionDenied(f"Team '{inp.team}' may not use the model '{inp.model}'.", param="model")
    hint = spec.deployments[0].upstream_model if spec is not None else "gpt-4o"
    facts = _Facts(inp, hint)
    rule: Route | None = None
    for r in policies.routes:
        why = _why_not(r, inp, facts)
        if why is None:
            rule = r
            _note(notes, f"rule {r.name} ({r.file}:{r.line}): matches")
            break
        _note(notes, f"rule {r.name} ({r.file}:{r.line}): no, {why}")
    if rule is None:
        if spec is None:
            if inp.model in policies.route_names:
                raise ModelNotFound(f"No routing rule for '{inp.model}' matches this request.", param="model")
            raise ModelNotFound(f"The model '{inp.model}' does not exist or is not served by this gateway.",
                                param="model")
        candidates, route = spec.deployments, DEFAULT_ROUTE
        _note(notes, f"no rule matches: the model's own deployments ({route})")
    else:
        candidates, route = rule.candidates, rule.name
    if rule is not None and rule.baseline is not None:
        baseline = rule.baseline.deployments[0]
    elif spec is not None:
        baseline = spec.deployments[0]
    else:
        baseline = candidates[0]
    model = spec if spec is not None else policies.models[baseline.model]
    _note(notes, "candidates:")
    fitting, largest, capable = _fit(candidates, facts, inp, notes)
    if not fitting:
        if facts.counted is not None and largest and facts.counted >= largest:
            return Plan(model=model, requested=inp.model, candidates=capable, route=route, baseline=baseline,
                        prompt_tokens=facts.counted, rule=rule, notes=tuple(notes or ()), too_long=(
                            f"This request has about {facts.counted} prompt tokens, more than the context "
                            f"window of every candidate for '{inp.model}' ({largest} at most)."))
        if inp.allowed is not None and all(d.model not in inp.allowed for d in candidates):
            raise PermissionDenied(f"Team '{inp.team}' may not use any model that '{inp.model}' routes to.",
                                   param="model")
        raise InvalidRequest(
            f"No candidate for '{inp.model}' supports {', '.join(sorted(facts.needs))}.",
            code="unsupported_capability", param="model")
    ordered = _order(rule, fitting, inp, facts, health, pick, notes)
    if notes is not None:
        strategy = rule.strategy if rule is not None else "weighted"
        notes.append(f"order ({strategy}): " + ", ".join(
            d.id + (" [cooled down]" if d.id in health.cooled else "") for d in ordered))
        limit = rule.max_attempts if rule is not None and rule.max_attempts else len(ordered)
        notes.append(f"attempts: at most {min(limit, len(ordered))}"
                     + (f", deadline {rule.deadline_s:g}s" if rule is not None and rule.deadline_s else ""))
        notes.append(f"baseline (for savings): {baseline.id}")
    return Plan(model=model, requested=inp.model, candidates=ordered, route=route, baseline=baseline,
                prompt_tokens=facts.counted, rule=rule, notes=tuple(notes or ()))
