"""From a request to the budgets and limits that apply, and back to HTTP: pure functions.

Which budgets and rate limits bind a request (its team's, its key's, its end user's, tags'
and session's from the ``users``/``tags``/``sessions`` policies, and the ``max_usd_per_minute``
brakes as ``minute`` budgets); what it may
cost at worst (its prompt, bounded for tokenizers we only approximate, plus its
output cap, at the most expensive candidate's prices); how many output tokens a
smaller hold can pay for (the last cents of a budget admit a request whose output
is capped to fit, so settled spend never passes the limit and nothing is
under-admitted); and how a refusal or an admission is told to the client
(``budget_exceeded``, ``rate_limit_exceeded``, ``retry-after``, ``x-ratelimit-*``).
No I/O: the budget store does the atomic part.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from gateway.errors import BudgetExceeded, GatewayError, RateLimited
from gateway.money import usd_text
from gateway.policy import Deployment, Limits, Policies, TeamSpec
from gateway.pricing import usd_to_nano
from gateway.state.budgets import Admission, BudgetRule, Period, RateRule, Refusal
from gateway.state.keys import KeyRecord

DEFAULT_OUTPUT_CAP = 4096   # worst-case output when neither the request nor the deployment caps it
EXACT_TOKENIZER_PROVIDERS = frozenset({"openai", "simulated"})  # prompts counted with their own tokenizer
if TYPE_CHECKING:
    from gateway.pipeline.attribution import Attribution

Headers = list[tuple[bytes, bytes]]
_SCOPE_NAMES = {"team": "team", "key": "key", "user": "end user", "tag": "tag", "session": "session"}


def call_output_cap(capped: bool, held_cap: int | None, body: dict[str, Any], deployment: Deployment) -> int | None:
    """The output limit to send to ``deployment``, or None to leave the request's own. ``capped``: a budget
    applies (the upstream may produce no more than was held); ``held_cap``: a partial hold's output cap."""
    if not capped or deployment.price.output <= 0:
        return None
    cap = output_cap(body, deployment)
    if held_cap is not None:
        cap = min(cap, held_cap)
    return None if cap == requested_output(body) else cap


def budget_rules(team: TeamSpec, key: KeyRecord | None, soft: bool = False,
                 attributed: tuple[tuple[str, str, Limits], ...] = ()) -> tuple[BudgetRule, ...]:
    """The budgets that bind a request; with ``soft``, the team's carry its soft-alert threshold.
    ``attributed``: the end user's, tags' and session's limits (:func:`attributed_limits`)."""
    rules = [BudgetRule("team", team.name, cast(Period, b.period), b.limit_nano,
                        int(b.limit_nano * team.soft_alert) if soft else None) for b in team.budgets]
    if team.max_usd_per_minute_nano is not None:
        rules.append(BudgetRule("team", team.name, "minute", team.max_usd_per_minute_nano))
    if key is not None and key.budget_usd is not None:
        rules.append(BudgetRule("key", key.id, cast(Period, key.budget_period or "monthly"),
                                usd_to_nano(key.budget_usd)))
    if key is not None and key.max_usd_per_minute is not None:
        rules.append(BudgetRule("key", key.id, "minute", usd_to_nano(key.max_usd_per_minute)))
    for scope, owner, limits in attributed:
        rules.extend(BudgetRule(scope, owner, cast(Period, b.period), b.limit_nano) for b in limits.budgets)
        if limits.max_usd_per_minute_nano is not None:
            rules.append(BudgetRule(scope, owner, "minute", limits.max_usd_per_minute_nano))
    return tuple(rules)


class RuleBook:
    """The budget and rate rules of each (team spec, key, soft, attributed limits) seen, made once: every
    request they bind gets the same tuples, so the stores' memos of what follows from rules (the plan, key
    names, script arguments) find them by identity instead of hashing and comparing rules per request. An
    entry keeps what its name holds the ids of, so an id in a name is never another object's; a policy
    reload or a refreshed key record makes new entries. At most ``limit`` entries (then it starts over)."""

    __slots__ = ("_made", "limit")

    def __init__(self, limit: int = 4096) -> None:
        self._made: dict[tuple[Any, ...], tuple[Any, tuple[BudgetRule, ...], tuple[RateRule, ...]]] = {}
        self.limit = limit

    def rules(self, team: TeamSpec, key: KeyRecord | None, soft: bool,
              attributed: tuple[tuple[str, str, Limits], ...]) -> tuple[tuple[BudgetRule, ...], tuple[RateRule, ...]]:
        """(:func:`budget_rules`, :func:`rate_rules`) of these."""
        name: tuple[Any, ...] = (id(team), id(key), soft)
        if attributed:
            name += tuple((scope, owner, id(limits)) for scope, owner, limits in attributed)
        made = self._made.get(name)
        if made is None:
            if len(self._made) >= self.limit:
                self._made.clear()
            made = self._made[name] = ((team, key, attributed), budget_rules(team, key, soft, attributed),
                                       rate_rules(team, key, attributed))
        return made[1], made[2]


def attributed_limits(policies: Policies | None, who: Attribution) -> tuple[tuple[str, str, Limits], ...]:
    """(scope, owner, limits) of the request's end user, each of its tags and its session that the
    policies limit (an entry of their own, else the section's ``default``)."""
    if policies is None or (who.user is None and not who.tags and who.session is None):
        return ()
    out: list[tuple[str, str, Limits]] = []
    if who.user is not None and (u := policies.users.get(who.user)) is not None and not u.empty:
        out.append(("user", who.user, u))
    for tag in who.tags:
        if (t := policies.tags.get(tag)) is not None and not t.empty:
            out.append(("tag", tag, t))
    if who.session is not None and (s := policies.sessions.get(who.session)) is not None and not s.empty:
        out.append(("session", who.session, s))
    return tuple(out)


def rate_rules(team: TeamSpec, key: KeyRecord | None,
               attributed: tuple[tuple[str, str, Limits], ...] = ()) -> tuple[RateRule, ...]:
    rules = []
    if team.rpm or team.tpm:
        rules.append(RateRule("team", team.name, team.rpm, team.tpm))
    if key is not None and (key.rpm or key.tpm):
        rules.append(RateRule("key", key.id, key.rpm, key.tpm))
    rules.extend(RateRule(scope, owner, limits.rpm, limits.tpm) for scope, owner, limits in attributed
                 if limits.rpm or limits.tpm)
    return tuple(rules)


def requested_output(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def choices_of(body: dict[str, Any]) -> int:
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def output_cap(body: dict[str, Any], deployment: Deployment) -> int:
    return requested_output(body) or deployment.max_output_tokens or DEFAULT_OUTPUT_CAP


def prompt_bound(deployment: Deployment, prompt_tokens: int) -> int:
    """Prompt tokens to reserve for: exact where we count with the provider's tokenizer, +25% elsewhere."""
    if deployment.provider in EXACT_TOKENIZER_PROVIDERS:
        return prompt_tokens
    return prompt_tokens + (prompt_tokens + 3) // 4


def _pico_to_nano(pico: int) -> int:
    return (pico + 999) // 1000


def _own_prompt(d: Deployment, prompt_tokens: int, prompts: Mapping[str, int] | None) -> int:
    return prompt_bound(d, prompts.get(d.id, prompt_tokens) if prompts else prompt_tokens)


def worst_case(body: dict[str, Any], candidates: tuple[Deployment, ...], prompt_tokens: int,
               endpoint: str, prompts: Mapping[str, int] | None = None) -> tuple[int, int, int]:
    """(worst cost, least useful cost, tokens) over the candidates: nano-USD, nano-USD, tokens.

    ``prompts``: a candidate's own prompt count by deployment id, where it differs from ``prompt_tokens``
    (images are billed per model family). The least useful cost is the prompt plus one output token per
    choice: a hold smaller than that cannot pay for any answer."""
    choices = choices_of(body)
    worst_cost = least = worst_tokens = 0
    for d in candidates:
        prompt = _own_prompt(d, prompt_tokens, prompts)
        out = 0 if endpoint == "embeddings" else output_cap(body, d) * choices
        rate_in, rate_out = d.price.hold_rates(prompt, body.get("service_tier"))
        in_pico = prompt * rate_in
        worst_cost = max(worst_cost, _pico_to_nano(in_pico + out * rate_out))
        least = max(least, _pico_to_nano(in_pico + (rate_out * choices if out else 0)))
        worst_tokens = max(worst_tokens, prompt + out)
    return worst_cost, least, worst_tokens


def affordable_output(hold_nano: int, body: dict[str, Any], candidates: tuple[Deployment, ...],
                      prompt_tokens: int, prompts: Mapping[str, int] | None = None) -> int:
    """The largest output cap (per choice) whose worst case fits ``hold_nano`` on every candidate."""
    choices = choices_of(body)
    cap = None
    for d in candidates:
        prompt = _own_prompt(d, prompt_tokens, prompts)
        rate_in, rate_out = d.price.hold_rates(prompt, body.get("service_tier"))
        if rate_out <= 0:
            continue
        left = hold_nano * 1000 - prompt * rate_in
        fits = max(0, left) // (rate_out * choices)
        cap = fits if cap is None else min(cap, fits)
    return cap if cap is not None else output_cap(body, candidates[0])


def cap_output(body: dict[str, Any], cap: int, deployment: Deployment, endpoint: str) -> None:
    """Lower (or set) the request's output limit to ``cap``, in the field the upstream expects."""
    if endpoint == "embeddings":
        return
    if "max_completion_tokens" in body or (endpoint == "chat" and deployment.provider == "openai"
                                           and "max_tokens" not in body):
        body["max_completion_tokens"] = cap
    else:
        body["max_tokens"] = cap


def refusal_error(refusal: Refusal, admission: Admission) -> GatewayError:
    who = f"key {refusal.owner}" if refusal.scope == "key" else f"{_SCOPE_NAMES[refusal.scope]} '{refusal.owner}'"
    if refusal.kind == "budget" and refusal.period == "minute":
        return BudgetExceeded(
            f"The spend-rate brake of {who} (max_usd_per_minute ${refusal.limit / 1e9:.6f}) stops this request: "
            f"spent and reserved ${refusal.used / 1e9:.6f} in this minute; retry in the next.")
    if refusal.kind == "budget" and refusal.period == "total":
        return BudgetExceeded(
            f"The lifetime (total) budget of {who} cannot cover this request: "
            f"spent and reserved ${refusal.used / 1e9:.6f} of ${refusal.limit / 1e9:.6f}.")
    if refusal.kind == "budget_soft":
        return BudgetExceeded(
            f"The {refusal.period} budget of {who} is past its soft threshold: "
            f"spent and reserved ${usd_text(refusal.used)} of ${usd_text(refusal.limit)}.")
    if refusal.kind == "budget":
        return BudgetExceeded(
            f"The {refusal.period} budget of {who} cannot cover this request: "
            f"spent and reserved ${usd_text(refusal.used)} of ${usd_text(refusal.limit)}.")
    what = "requests" if refusal.kind == "rate_requests" else "tokens"
    headers = {k.decode(): v.decode() for k, v in rate_headers(admission)}
    if refusal.retry_after_s is None:   # a single request larger than the whole minute's allowance
        return RateLimited(f"This request needs more {what} than the limit of {refusal.limit} per minute "
                           f"of {who} allows.", headers=headers)
    headers["retry-after"] = str(refusal.retry_after_s)
    return RateLimited(f"Rate limit of {refusal.limit} {what} per minute reached for {who}; "
                       f"retry in {refusal.retry_after_s}s.", headers=headers)


def rate_headers(admission: Admission) -> Headers:
    rate = admission.rate
    out: Headers = []
    if rate.limit_requests is not None:
        out.append((b"x-ratelimit-limit-requests", b"%d" % rate.limit_requests))
    if rate.remaining_requests is not None:
        out.append((b"x-ratelimit-remaining-requests", b"%d" % max(0, rate.remaining_requests)))
    if rate.limit_tokens is not None:
        out.append((b"x-ratelimit-limit-tokens", b"%d" % rate.limit_tokens))
    if rate.remaining_tokens is not None:
        out.append((b"x-ratelimit-remaining-tokens", b"%d" % max(0, rate.remaining_tokens)))
    return out
