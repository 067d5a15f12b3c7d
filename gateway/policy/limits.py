"""The ``users``, ``tags`` and ``sessions`` sections: budgets and limits for what a request is for.

Each maps a name (an end user id, a tag, a session id) to its budgets (``daily``, ``weekly``,
``monthly`` or ``total``, a lifetime budget), an optional ``rpm``/``tpm`` and an optional
``max_usd_per_minute`` spend-rate brake. ``users`` and ``sessions`` may have a ``default`` entry
that applies, separately, to every user or session without its own entry; a tag has limits only
when named. Amounts become integer nano-USD here, once, like a team's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.policy.reader import Fields
from gateway.policy.teams import PERIODS, TeamBudget, parse_budgets, take_brake
from gateway.policy.yamlsource import Located, PolicyError

LIMIT_PERIODS = PERIODS | {"total"}
DEFAULT = "default"
SECTION_SCOPES = {"users": "user", "tags": "tag", "sessions": "session"}


@dataclass(frozen=True, slots=True)
class Limits:
    budgets: tuple[TeamBudget, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    max_usd_per_minute_nano: int | None = None

    @property
    def empty(self) -> bool:
        return not self.budgets and self.rpm is None and self.tpm is None and self.max_usd_per_minute_nano is None


@dataclass(frozen=True, slots=True)
class LimitTable:
    """The entries of one section, and the default for names without an entry (None: no default)."""

    scope: str
    entries: dict[str, Limits] = field(default_factory=dict)
    default: Limits | None = None

    def get(self, name: str) -> Limits | None:
        found = self.entries.get(name)
        return found if found is not None else self.default


def parse_limits(section_name: str, section: Any) -> LimitTable:
    scope = SECTION_SCOPES[section_name]
    if not isinstance(section, Located):
        raise PolicyError(getattr(section, "file", "<policies>"), getattr(section, "line", 1),
                          section_name, "must be a mapping of names to budgets and limits")
    entries: dict[str, Limits] = {}
    default: Limits | None = None
    for name, body in section.items():
        limits = _parse_entry(f"{section_name}.{name}", body, section.position(name))
        if name == DEFAULT and scope != "tag":
            default = limits
        else:
            entries[str(name)] = limits
    return LimitTable(scope, entries, default)


def _parse_entry(path: str, body: Any, where: tuple[str, int]) -> Limits:
    if body is None:
        return Limits()
    f = Fields(body, path, where)
    raw = f.take_list("budgets")
    budgets = parse_budgets(raw, f"{path}.budgets", LIMIT_PERIODS) if raw is not None else ()
    rpm = f.take_int("rpm", None, minimum=1)
    tpm = f.take_int("tpm", None, minimum=1)
    brake = take_brake(f)
    f.finish()
    return Limits(budgets, rpm, tpm, brake)
