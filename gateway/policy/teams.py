"""The ``teams`` section: budgets, what happens past them, rate limits and allowed models.

A team's budgets are USD amounts per UTC calendar period (``daily``, ``weekly``,
``monthly``); past one, requests are refused (``on_exceed: block``) or sent to a
cheaper model (``on_exceed: downgrade`` with ``downgrade_to``). ``soft_alert`` is
the fraction of a budget at which the team counts as about to run out: reported by
``/admin/teams``, and for a ``downgrade`` team the point from which it is sent to the
cheaper model. Amounts are converted to
integer nano-USD here, once, and bounded so they stay exact in the budget script.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.policy.reader import Fields
from gateway.policy.yamlsource import Located, LocatedList, PolicyError
from gateway.pricing import usd_to_nano

PERIODS = frozenset({"daily", "weekly", "monthly"})
MAX_BUDGET_USD = (2**53 - 1) // 10**9   # budgets are nano-USD and must stay exact in the budget script
DEFAULT_TEAM = "default"


@dataclass(frozen=True, slots=True)
class TeamBudget:
    period: str
    limit_nano: int


@dataclass(frozen=True, slots=True)
class TeamSpec:
    name: str
    budgets: tuple[TeamBudget, ...] = ()
    on_exceed: str = "block"
    downgrade_to: str | None = None
    soft_alert: float = 0.8
    rpm: int | None = None
    tpm: int | None = None
    allowed_models: frozenset[str] | None = None   # None: every model
    strict_translation: bool = False               # a feature translation would drop: a 400 instead
    max_usd_per_minute_nano: int | None = None     # spend-rate brake: settled + reserved in a UTC minute

    def allows(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


def take_brake(f: Fields) -> int | None:
    """``max_usd_per_minute`` in nano-USD, or None."""
    usd = f.take_number("max_usd_per_minute", None, minimum=0, maximum=MAX_BUDGET_USD)
    return None if usd is None else usd_to_nano(str(usd))


def parse_teams(section: Any, model_names: frozenset[str]) -> dict[str, TeamSpec]:
    if not isinstance(section, Located):
        raise PolicyError(getattr(section, "file", "<policies>"), getattr(section, "line", 1),
                          "teams", "must be a mapping of team names")
    teams = {name: _parse_team(name, body, section.position(name), model_names) for name, body in section.items()}
    teams.setdefault(DEFAULT_TEAM, TeamSpec(DEFAULT_TEAM))
    return teams


def parse_budgets(items: LocatedList, path: str, periods: frozenset[str] = PERIODS) -> tuple[TeamBudget, ...]:
    budgets: list[TeamBudget] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        b = Fields(item, f"{path}[{i}]", items.position(i))
        period = b.take_str("period")
        if period not in periods:
            raise b.error("period", f"must be one of {sorted(periods)}, got {period!r}")
        if period in seen:
            raise b.error("period", f"a {period} budget is already defined for this team")
        seen.add(period)
        usd = b.take_number("usd", minimum=0, maximum=MAX_BUDGET_USD)
        b.finish()
        budgets.append(TeamBudget(period, usd_to_nano(str(usd))))
    return tuple(budgets)


def _parse_team(name: str, body: Any, where: tuple[str, int], model_names: frozenset[str]) -> TeamSpec:
    path = f"teams.{name}"
    if body is None:
        return TeamSpec(name)
    f = Fields(body, path, where)
    raw_budgets = f.take_list("budgets")
    budgets = parse_budgets(raw_budgets, f"{path}.budgets") if raw_budgets is not None else ()
    on_exceed = f.take_str("on_exceed", "block")
    if on_exceed not in ("block", "downgrade"):
        raise f.error("on_exceed", f"must be 'block' or 'downgrade', got {on_exceed!r}")
    downgrade_to = f.take_str("downgrade_to", None)
    if on_exceed == "downgrade" and downgrade_to is None:
        raise f.error("downgrade_to", "on_exceed: downgrade needs the model to downgrade to")
    if downgrade_to is not None and downgrade_to not in model_names:
        raise f.error("downgrade_to", f"unknown model {downgrade_to!r}")
    soft_alert = float(f.take_number("soft_alert", 0.8, minimum=0, maximum=1))
    rpm = f.take_int("rpm", None, minimum=1)
    tpm = f.take_int("tpm", None, minimum=1)
    brake = take_brake(f)
    allowed = f.take_str_list("allowed_models", None)
    strict = bool(f.take_bool("strict_translation", False))
    if allowed is not None:
        unknown = [m for m in allowed if m not in model_names]
        if unknown:
            raise f.error("allowed_models", f"unknown model(s) {unknown}")
    f.finish()
    return TeamSpec(name=name, budgets=budgets, on_exceed=on_exceed, downgrade_to=downgrade_to,
                    soft_alert=soft_alert, rpm=rpm, tpm=tpm, max_usd_per_minute_nano=brake,
                    allowed_models=frozenset(allowed) if allowed is not None else None, strict_translation=strict)
