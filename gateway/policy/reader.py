"""Strict field access for policy mappings.

A :class:`Fields` wraps one located mapping; each ``take_*`` call consumes a key
and checks its type, and :meth:`Fields.finish` rejects every key nobody took.
That is how "unknown keys are errors" holds for every section without a schema
library, with each error naming file, line and the dotted key.
"""

from __future__ import annotations

from typing import Any

from gateway.policy.yamlsource import Located, LocatedList, PolicyError

_MISSING: Any = object()


def _describe(value: Any) -> str:
    if isinstance(value, LocatedList):
        return "a list"
    return repr(value)


class Fields:
    """The keys of one mapping; ``where`` is the (file, line) at which that mapping's value is written.

    Callers pass ``where`` from the parent that held the value (:meth:`Located.position` for a
    key's value, :meth:`LocatedList.position` for a list item), so a value that is not a
    mapping at all (a scalar or a list) is still reported at its real file and line.
    """

    def __init__(self, data: Any, path: str, where: tuple[str, int]) -> None:
        if not isinstance(data, Located):
            file, line = where
            raise PolicyError(file, line, path, f"expected a mapping, got {_describe(data)}")
        self.data = data
        self.path = path
        self._taken: set[str] = set()

    def error(self, key: str, message: str) -> PolicyError:
        return PolicyError(self.data.file, self.data.line_of(key), self._key(key), message)

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.data

    def _take(self, key: str, default: Any) -> Any:
        self._taken.add(key)
        if key not in self.data or self.data[key] is None:
            if default is _MISSING:
                raise PolicyError(self.data.file, self.data.line, self._key(key), "is required")
            return default
        return self.data[key]

    def take_str(self, key: str, default: Any = _MISSING) -> Any:
        value = self._take(key, default)
        if value is not default and not isinstance(value, str):
            raise self.error(key, f"must be a string, got {value!r}")
        return value

    def take_int(self, key: str, default: Any = _MISSING, *, minimum: int | None = None) -> Any:
        value = self._take(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        return value

    def take_number(self, key: str, default: Any = _MISSING, *, minimum: float | None = None,
                    maximum: float | None = None) -> Any:
        value = self._take(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum}, got {value}")
        return value

    def take_bool(self, key: str, default: Any = _MISSING) -> Any:
        value = self._take(key, default)
        if value is not default and not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def take_str_list(self, key: str, default: Any = _MISSING,
                      *, allowed: frozenset[str] | None = None) -> Any:
        value = self._take(key, default)
        if value is default:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, "must be a list of strings")
        if allowed is not None:
            bad = [v for v in value if v not in allowed]
            if bad:
                raise self.error(key, f"unknown value(s) {bad}; allowed: {sorted(allowed)}")
        return list(value)

    def take_str_map(self, key: str, default: Any = _MISSING) -> Any:
        value = self._take(key, default)
        if value is default:
            return value
        if not isinstance(value, Located) or not all(isinstance(v, str) for v in value.values()):
            raise self.error(key, "must be a mapping of strings to strings")
        return dict(value)

    def take_mapping(self, key: str) -> Located | None:
        value = self._take(key, None)
        if value is None:
            return None
        if not isinstance(value, Located):
            raise self.error(key, "must be a mapping")
        return value

    def take_list(self, key: str) -> LocatedList | None:
        value = self._take(key, None)
        if value is None:
            return None
        if not isinstance(value, LocatedList):
            raise self.error(key, "must be a list")
        return value

    def finish(self) -> None:
        for key in self.data:
            if key not in self._taken:
                raise self.error(key, "unknown key")
