"""Resolving a request to an ordered list of candidate deployments: a pure function.

Given the loaded policies, the caller's team, the requested model and the
request body, :func:`resolve_policy` returns a :class:`Plan`: the model, the
deployments to try in order, the rule that decided and the baseline deployment
used to compute savings. It performs no I/O; randomness for weighted choice is
an argument.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidRequest, ModelNotFound
from gateway.policy import Deployment, ModelSpec, Policies
from gateway.tokens import count_prompt

ENDPOINT_CAPABILITY = {"chat": "chat", "completions": "completions", "embeddings": "embeddings"}


@dataclass(frozen=True, slots=True)
class Plan:
    model: ModelSpec
    requested: str
    candidates: tuple[Deployment, ...]
    route: str
    baseline: Deployment
    prompt_tokens: int | None = None


def required_capabilities(endpoint: str, body: dict[str, Any]) -> set[str]:
    needs = {ENDPOINT_CAPABILITY[endpoint]}
    if body.get("tools") or body.get("functions"):
        needs.add("tools")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        needs.add("json")
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
                isinstance(p, dict) and p.get("type") == "image_url" for p in content):
            needs.add("vision")
            break
    return needs


def weighted_order(deployments: tuple[Deployment, ...], pick: float) -> tuple[Deployment, ...]:
    """First one drawn by weight (``pick`` in [0, 1)), the rest in their configured order."""
    if len(deployments) == 1:
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


def resolve_policy(policies: Policies, team: str, model: str, endpoint: str, body: dict[str, Any],
                   raw_size: int, pick: float | None = None) -> Plan:
    spec = policies.model(model)
    if spec is None:
        raise ModelNotFound(f"The model '{model}' does not exist or is not served by this gateway.",
                            param="model")
    needs = required_capabilities(endpoint, body)
    fitting = tuple(d for d in spec.deployments if needs <= d.capabilities)
    if not fitting:
        raise InvalidRequest(
            f"The model '{model}' does not support {', '.join(sorted(needs))} on any deployment.",
            code="unsupported_capability", param="model")
    prompt_tokens = None
    windows = [d.context_window for d in fitting if d.context_window]
    # A prompt's tokens never outnumber its bytes by much, so small bodies skip counting.
    if windows and raw_size * 2 > min(windows):
        prompt_tokens = count_prompt(body, endpoint, fitting[0].upstream_model)
        fitting = tuple(d for d in fitting if not d.context_window or prompt_tokens < d.context_window)
        if not fitting:
            raise InvalidRequest(
                f"This request has about {prompt_tokens} prompt tokens, more than the context window "
                f"of every deployment of '{model}' ({max(windows)} at most).",
                code="context_length_exceeded", param="messages")
    ordered = weighted_order(fitting, random.random() if pick is None else pick)
    return Plan(model=spec, requested=model, candidates=ordered, route="default",
                baseline=spec.deployments[0], prompt_tokens=prompt_tokens)
