"""Values that validate against a JSON schema, for the simulated model's structured output and tool calls.

:func:`value_for` walks a JSON schema (the subset OpenAI's structured outputs and function
parameters use, and what Pydantic emits: ``type`` and type lists, ``properties``/``required``,
``items``/``prefixItems``, ``enum``/``const``, ``anyOf``/``oneOf``/``allOf``, ``$ref`` into
``$defs``/``definitions``, string formats and lengths, numeric bounds and ``multipleOf``, array
sizes) and builds one deterministic value that satisfies it, within fixed bounds on size and depth
(the schema is client input). Every property is filled in (strict
schemas require them all); recursive schemas stop at a fixed depth by taking a branch that ends
(``null``, an empty array, an object with no required keys). ``pattern`` is not honoured.
"""

from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 8        # past this, only required properties, the fewest items, the branch that ends
HARD_DEPTH = 64      # past this, null: the schema has no finite instance
MAX_NODES = 10_000   # values generated per answer at most
MAX_ITEMS = 256      # items per array at most
MAX_CHARS = 4096     # characters per string at most
INT_LIMIT = 2**63 - 1
WORDS = ("simulated", "gateway", "request", "model", "answer", "team", "budget", "token")
FORMATS = {
    "date-time": "2026-01-01T00:00:00Z", "date": "2026-01-01", "time": "00:00:00Z",
    "email": "user@example.com", "idn-email": "user@example.com", "uri": "https://example.com/",
    "iri": "https://example.com/", "uri-reference": "https://example.com/", "hostname": "example.com",
    "ipv4": "192.0.2.1", "ipv6": "2001:db8::1", "uuid": "00000000-0000-4000-8000-000000000000",
    "duration": "PT1M",
}


def value_for(schema: Any, root: Any = None, *, salt: int = 0, depth: int = 0) -> Any:
    """A value valid under ``schema``; ``root`` resolves ``$ref`` (default: ``schema`` itself).

    Schemas come from clients, so the walk is bounded: at most :data:`MAX_NODES` values, arrays of at
    most :data:`MAX_ITEMS` and strings of at most :data:`MAX_CHARS`, and no deeper than :data:`HARD_DEPTH`
    (a schema with no finite instance, such as a required property that refers to itself, gets ``null``
    there). Past those bounds the value may not validate, but the answer stays small."""
    return _Walk(schema if root is None else root).value(schema, salt, depth)


class _Walk:
    __slots__ = ("root", "nodes")

    def __init__(self, root: Any) -> None:
        self.root = root
        self.nodes = 0

    def value(self, schema: Any, salt: int, depth: int) -> Any:
        self.nodes += 1
        if depth > HARD_DEPTH or self.nodes > MAX_NODES:
            return None
        root = self.root
        if schema is True or not isinstance(schema, dict):
            return WORDS[salt % len(WORDS)]
        schema = _resolve(schema, root)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[salt % len(enum)]
        if isinstance(schema.get("allOf"), list):
            return self.value(_merge_all(schema, root), salt, depth + 1)
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                return self.value(_pick(branches, root, depth), salt, depth + 1)
        kind = _type(schema, depth)
        if kind == "object":
            return self.object(schema, depth)
        if kind == "array":
            return self.array(schema, salt, depth)
        if kind == "string":
            return _string(schema, salt)
        if kind == "integer":
            return _integer(schema, salt)
        if kind == "number":
            return _number(schema, salt)
        if kind == "boolean":
            return salt % 2 == 0
        if kind == "null":
            return None
        return WORDS[salt % len(WORDS)]

    def object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = [r for r in schema.get("required", []) if isinstance(r, str)] \
            if isinstance(schema.get("required"), list) else []
        names = list(properties) if depth < MAX_DEPTH else [n for n in properties if n in required]
        names += [r for r in required if r not in properties]
        return {name: self.value(properties.get(name, {}), i, depth + 1) for i, name in enumerate(names)}

    def array(self, schema: dict[str, Any], salt: int, depth: int) -> list[Any]:
        low = _int(schema.get("minItems"), 0) or 0
        high = _int(schema.get("maxItems"), None)
        raw_prefix = schema.get("prefixItems")
        prefix: list[Any] = raw_prefix if isinstance(raw_prefix, list) else []
        count = max(low, len(prefix), 0 if depth >= MAX_DEPTH else 2)
        if high is not None:
            count = min(count, high)
        items = schema.get("items", {})
        out = []
        for i in range(min(count, MAX_ITEMS)):
            sub = prefix[i] if i < len(prefix) else items
            out.append(self.value(sub if sub is not False else {}, salt + i, depth + 1))
        return out


def _resolve(schema: dict[str, Any], root: Any, seen: int = 0) -> dict[str, Any]:
    ref = schema.get("$ref")
    if not isinstance(ref, str) or seen > 32:
        return schema
    target: Any = root
    if ref.startswith("#"):
        for part in ref.lstrip("#").strip("/").split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, dict) else None
    else:
        target = None
    if not isinstance(target, dict):
        return {k: v for k, v in schema.items() if k != "$ref"}
    merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}   # siblings of $ref apply too
    return _resolve(merged, root, seen + 1) if "$ref" in target else merged


def _merge_all(schema: dict[str, Any], root: Any) -> dict[str, Any]:
    merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
    for part in schema["allOf"]:
        if not isinstance(part, dict):
            continue
        part = _resolve(part, root)
        for key, value in part.items():
            if key == "properties" and isinstance(value, dict):
                merged["properties"] = {**merged.get("properties", {}), **value}
            elif key == "required" and isinstance(value, list):
                merged["required"] = [*merged.get("required", []), *value]
            else:
                merged.setdefault(key, value)
    return merged


def _ends(schema: Any) -> bool:
    """Whether a branch can be filled without going deeper (for recursive schemas)."""
    if not isinstance(schema, dict):
        return True
    kind = schema.get("type")
    return kind in ("null", "string", "integer", "number", "boolean") or "enum" in schema or "const" in schema


def _pick(branches: list[Any], root: Any, depth: int) -> Any:
    resolved = [_resolve(b, root) if isinstance(b, dict) else b for b in branches]
    if depth >= MAX_DEPTH:
        for branch in resolved:
            if _ends(branch):
                return branch
    for branch in resolved:   # a value rather than null when there is a choice
        if not (isinstance(branch, dict) and branch.get("type") == "null"):
            return branch
    return resolved[0]


def _type(schema: dict[str, Any], depth: int) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if isinstance(k, str)]
        if depth >= MAX_DEPTH and "null" in kinds:
            return "null"
        real = [k for k in kinds if k != "null"]
        return real[0] if real else (kinds[0] if kinds else None)
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return None


def _string(schema: dict[str, Any], salt: int) -> str:
    fmt = schema.get("format")
    text = FORMATS.get(fmt, WORDS[salt % len(WORDS)]) if isinstance(fmt, str) else WORDS[salt % len(WORDS)]
    low = min(_int(schema.get("minLength"), 0) or 0, MAX_CHARS)
    high = _int(schema.get("maxLength"), None)
    if len(text) < low:
        text += "x" * (low - len(text))
    if high is not None and len(text) > high:
        text = text[:high]
    return text


def _bounds(schema: dict[str, Any]) -> tuple[float | None, float | None, bool, bool]:
    low, high = schema.get("minimum"), schema.get("maximum")
    ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    strict_low = strict_high = False
    if isinstance(ex_low, (int, float)) and not isinstance(ex_low, bool):
        low, strict_low = ex_low, True
    elif ex_low is True:
        strict_low = True
    if isinstance(ex_high, (int, float)) and not isinstance(ex_high, bool):
        high, strict_high = ex_high, True
    elif ex_high is True:
        strict_high = True
    return (_num(low), _num(high), strict_low, strict_high)


def _integer(schema: dict[str, Any], salt: int) -> int | float:
    low, high, strict_low, strict_high = _bounds(schema)
    lo = None if low is None else (math.floor(low) + 1 if strict_low else math.ceil(low))
    hi = None if high is None else (math.ceil(high) - 1 if strict_high else math.floor(high))
    step = schema.get("multipleOf")
    step = int(step) if isinstance(step, int) and not isinstance(step, bool) and step > 0 else 1
    value = lo if lo is not None else (min(hi, 1 + salt) if hi is not None else 1 + salt)
    value = -(-value // step) * step                           # up to a multiple
    if hi is not None and value > hi:
        value = hi // step * step
    return value if -INT_LIMIT <= value <= INT_LIMIT else float(value)   # JSON encoders stop at 64 bits


def _number(schema: dict[str, Any], salt: int) -> float | int:
    step = _num(schema.get("multipleOf"))
    if step is not None and step > 0:
        low, high, strict_low, _ = _bounds(schema)
        k = math.ceil(low / step) if low is not None else 1
        if low is not None and strict_low and k * step <= low:
            k += 1
        value = k * step
        return int(value) if float(value).is_integer() else value
    low, high, strict_low, strict_high = _bounds(schema)
    if low is not None and high is not None:
        return (low + high) / 2 if strict_low or strict_high else low
    if low is not None:
        return low + 1 if strict_low else low
    if high is not None:
        return high - 1 if strict_high else high
    return 1.5 + salt


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default
