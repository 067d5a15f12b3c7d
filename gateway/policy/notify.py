"""The ``notify`` section: budget notifications by signed webhook.

Each webhook names a URL, the thresholds (fractions of a budget's limit, e.g. ``[0.5, 0.8, 1.0]``)
at which it is told, which budgets it watches (``team``, ``key``, ``user``, ``tag``, ``session``, or
one owner such as ``team:research``) and the environment variable holding its HMAC secret (read
here, at load; a missing variable is an error naming it). The secret never appears in logs or
reports.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from gateway.policy.reader import Fields
from gateway.policy.yamlsource import Located, PolicyError

SCOPES = ("team", "key", "user", "tag", "session")


@dataclass(frozen=True, slots=True)
class Webhook:
    name: str
    url: str
    thresholds: tuple[float, ...]
    watches: tuple[tuple[str, str | None], ...]   # (scope, owner or None for every owner)
    secret: str | None = field(default=None, repr=False)

    def watches_budget(self, scope: str, owner: str) -> bool:
        return any(s == scope and (o is None or o == owner) for s, o in self.watches)


@dataclass(frozen=True, slots=True)
class NotifySpec:
    webhooks: tuple[Webhook, ...] = ()


def parse_notify(section: Any, env: Mapping[str, str] | None = None) -> NotifySpec:
    env = os.environ if env is None else env
    if not isinstance(section, Located):
        raise PolicyError(getattr(section, "file", "<policies>"), getattr(section, "line", 1), "notify",
                          "must be a mapping with a 'webhooks' list")
    f = Fields(section, "notify", (section.file, section.line))
    items = f.take_list("webhooks")
    f.finish()
    hooks: list[Webhook] = []
    names: set[str] = set()
    for i, item in enumerate(items or ()):
        path = f"notify.webhooks[{i}]"
        w = Fields(item, path, items.position(i) if items is not None else ("<policies>", 1))
        name = w.take_str("name", f"webhook{i + 1}")
        if name in names:
            raise w.error("name", f"webhook {name!r} is defined twice")
        names.add(name)
        url = w.take_str("url")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise w.error("url", f"must be an http(s) URL, got {url!r}")
        raw = w.take_list("thresholds")
        thresholds = _thresholds(w, list(raw) if raw is not None else [0.5, 0.8, 1.0])
        budgets = w.take_str_list("budgets", ["team"])
        watches: list[tuple[str, str | None]] = []
        for b in budgets:
            scope, _, owner = b.partition(":")
            if scope not in SCOPES:
                raise w.error("budgets", f"{b!r}: the scope must be one of {', '.join(SCOPES)} "
                                         "(optionally ':<owner>')")
            watches.append((scope, owner or None))
        secret_env = w.take_str("secret_env", None)
        secret = None
        if secret_env is not None:
            secret = env.get(secret_env)
            if not secret:
                raise w.error("secret_env", f"environment variable {secret_env} is not set")
        w.finish()
        hooks.append(Webhook(name, url, thresholds, tuple(watches), secret))
    return NotifySpec(tuple(hooks))


def _thresholds(w: Fields, raw: list[Any]) -> tuple[float, ...]:
    if not raw:
        raise w.error("thresholds", "must be a non-empty list of fractions such as [0.5, 0.8, 1.0]")
    out = []
    for v in raw:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 10:
            raise w.error("thresholds", f"each threshold must be a number in (0, 10], got {v!r}")
        out.append(float(v))
    return tuple(sorted(set(out)))
