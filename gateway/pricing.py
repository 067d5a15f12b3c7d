"""Token accounting and prices: the one place where usage becomes money.

This module owns the normalised :class:`Usage` (built from any upstream's usage
mapping by :func:`usage_from_openai`), integer prices in pico-USD per token
(:class:`Price`, from litellm's bundled price map via :class:`PriceBook` or from a
policy ``price:`` spec via :func:`price_from_spec`), and the cost arithmetic:
exact integer pico-USD per request, rounded half-up once to nano-USD. Every
USD amount is converted through ``Decimal(str(x))``; no float touches money
except :func:`nano_to_usd`, which formats integer nano-USD for JSON output.
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation
from typing import Any, ClassVar

import orjson

PRICE_MAP_FILE = "model_prices_and_context_window_backup.json"
PICO_PER_USD = Decimal(10) ** 12
PICO_PER_USD_PER_MTOK = Decimal(10) ** 6   # 1 USD per million tokens = 1e6 pico per token
NANO_PER_USD = Decimal(10) ** 9
_EXACT = Context(prec=80, rounding=ROUND_HALF_UP, traps=[InvalidOperation])   # money arithmetic, no silent rounding
# Anthropic prompt-caching multipliers of the input price, used only when the map lacks a key.
ANTHROPIC_CACHE_READ, ANTHROPIC_CACHE_WRITE, ANTHROPIC_CACHE_WRITE_1H = Decimal("0.1"), Decimal("1.25"), Decimal(2)
_PER_TOKEN_KEYS = ("input_per_mtok", "output_per_mtok")
_CACHE_KEYS = ("cache_read_per_mtok", "cache_write_per_mtok", "cache_write_1h_per_mtok")
_GPU_KEYS = ("gpu_hour_usd", "output_tokens_per_second", "input_tokens_per_second")
SPEC_KEYS = frozenset(_PER_TOKEN_KEYS + _CACHE_KEYS + _GPU_KEYS)
# litellm's cache prices: read, write (5-minute / default), write (Anthropic 1-hour)
_MAP_CACHE_KEYS = ("cache_read_input_token_cost", "cache_creation_input_token_cost",
                   "cache_creation_input_token_cost_above_1hr")


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0            # ALL prompt tokens: uncached + cache reads + cache writes (both tiers)
    output_tokens: int = 0           # all completion tokens, reasoning included
    cached_input_tokens: int = 0     # cache reads
    cache_write_tokens: int = 0      # cache writes, 5-minute / provider-default tier
    cache_write_1h_tokens: int = 0   # cache writes, Anthropic 1-hour tier
    reasoning_tokens: int = 0        # subset of output_tokens (informational)
    estimated: bool = False          # True when the gateway counted instead of the upstream

    @property
    def uncached_input_tokens(self) -> int:
        cached = self.cached_input_tokens + self.cache_write_tokens + self.cache_write_1h_tokens
        return max(0, self.input_tokens - cached)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _count(value: Any) -> int | None:
    """A token count, or None when it is absent or junk (bools, strings, NaN, fractions)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return max(0, int(value))
    return None


def _get(mapping: Any, *path: str) -> int | None:
    for key in path:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return _count(mapping)


def usage_from_openai(usage: Mapping[str, Any] | None) -> Usage | None:
    """Normalise an upstream usage mapping (OpenAI chat/embeddings/Responses, litellm, raw Anthropic).

    ``input_tokens`` of the result always counts every prompt token. OpenAI and
    litellm's ``prompt_tokens`` already include cache reads and writes (litellm
    adds Anthropic's cache tokens into it); a raw Anthropic ``input_tokens``
    excludes them, so they are added back here.
    """
    if not isinstance(usage, dict) or not usage:
        return None
    u = usage
    fast = _plain_openai(u)
    if fast is not None:
        return fast
    if "prompt_tokens" in u or "completion_tokens" in u:          # OpenAI chat/embeddings, litellm
        prompt, output, details = _get(u, "prompt_tokens"), _get(u, "completion_tokens"), u.get("prompt_tokens_details")
        cached = _first(_get(details, "cached_tokens"), _get(u, "cache_read_input_tokens"))
        writes = _first(_get(u, "cache_creation_input_tokens"), _get(details, "cache_creation_tokens"),
                        _get(details, "cache_write_tokens"))
        tiers = details.get("cache_creation_token_details") if isinstance(details, Mapping) else None
        tiers = tiers if isinstance(tiers, Mapping) else u.get("cache_creation")
        reasoning, includes_cache = _get(u, "completion_tokens_details", "reasoning_tokens"), True
    elif "input_tokens" in u or "output_tokens" in u:              # raw Anthropic, OpenAI Responses
        prompt, output = _get(u, "input_tokens"), _get(u, "output_tokens")
        includes_cache = isinstance(u.get("input_tokens_details"), Mapping)   # only the Responses API has it
        cached = _first(_get(u, "input_tokens_details", "cached_tokens"), _get(u, "cache_read_input_tokens"))
        writes, tiers = _get(u, "cache_creation_input_tokens"), u.get("cache_creation")
        reasoning = _get(u, "output_tokens_details", "reasoning_tokens")
    else:
        return None
    if prompt is None and output is None:
        return None
    cached, output = cached or 0, output or 0
    w1h = _get(tiers, "ephemeral_1h_input_tokens") or 0
    writes = _first(writes, (_get(tiers, "ephemeral_5m_input_tokens") or 0) + w1h) or 0
    w1h = min(w1h, writes)
    prompt = max(prompt or 0, cached + writes) if includes_cache else (prompt or 0) + cached + writes
    return Usage(input_tokens=prompt, output_tokens=output, cached_input_tokens=cached,
                 cache_write_tokens=writes - w1h, cache_write_1h_tokens=w1h,
                 reasoning_tokens=min(reasoning or 0, output))


def _plain_openai(u: dict[str, Any]) -> Usage | None:
    """The common case on the hot path: OpenAI's own usage shape with no cache writes."""
    prompt, output = u.get("prompt_tokens"), u.get("completion_tokens", 0)
    if type(prompt) is not int or type(output) is not int or prompt < 0 or output < 0 \
            or "cache_creation_input_tokens" in u or "cache_read_input_tokens" in u:
        return None
    details = u.get("prompt_tokens_details")
    cached = 0
    if details is not None:
        if type(details) is not dict or len(details.keys() - _PLAIN_PROMPT_DETAILS):
            return None
        cached = details.get("cached_tokens") or 0
        if type(cached) is not int or not 0 <= cached <= prompt:
            return None
    out_details = u.get("completion_tokens_details")
    reasoning = out_details.get("reasoning_tokens") if type(out_details) is dict else 0
    if type(reasoning) is not int or not 0 <= reasoning <= output:
        reasoning = 0
    return Usage(prompt, output, cached, 0, 0, reasoning)


_PLAIN_PROMPT_DETAILS = frozenset({"cached_tokens", "audio_tokens"})


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


@dataclass(frozen=True, slots=True)
class Price:
    """Integer pico-USD (1e-12 USD) per token."""

    input: int
    output: int
    cache_read: int
    cache_write: int
    cache_write_1h: int
    ZERO: ClassVar[Price]


Price.ZERO = FREE = Price(0, 0, 0, 0, 0)


def cost_pico(usage: Usage, price: Price) -> int:
    return (usage.uncached_input_tokens * price.input
            + usage.cached_input_tokens * price.cache_read
            + usage.cache_write_tokens * price.cache_write
            + usage.cache_write_1h_tokens * price.cache_write_1h
            + usage.output_tokens * price.output)


def _round_half_up(value: Decimal, scale: Decimal = Decimal(1)) -> int:
    """``value × scale`` rounded half-up to an integer (exact up to 80 digits)."""
    try:
        return int(_EXACT.multiply(value, scale).quantize(Decimal(1), context=_EXACT))
    except InvalidOperation:
        raise ValueError(f"amount out of range: {value}") from None


def cost_nano(usage: Usage, price: Price) -> int:
    """The request's cost in nano-USD: exact pico cost, rounded half-up once."""
    return (cost_pico(usage, price) + 500) // 1000


def nano_to_usd(nano: int) -> float:
    """Nano-USD as a float for JSON; its repr is the exact decimal (e.g. 123456 -> 0.000123456)."""
    return nano / 1e9


def _decimal(value: float | str | int, what: str = "amount") -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    try:
        result = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not result.is_finite():
        raise ValueError(f"{what} must be finite, got {value!r}")
    return result


def usd_to_nano(usd: float | str | int) -> int:
    """USD (e.g. a budget in a policy file) to integer nano-USD, exactly, rounded half-up."""
    return _round_half_up(_decimal(usd, "USD amount"), NANO_PER_USD)


def pico_from_usd(value: float | str | int) -> int:
    """A per-token USD price (e.g. litellm's 1.5e-07) to integer pico-USD, exactly."""
    usd = _decimal(value, "price")
    if usd < 0:
        raise ValueError(f"price must not be negative, got {value!r}")
    return _round_half_up(usd, PICO_PER_USD)


class PriceBook:
    """Prices from litellm's bundled map, loaded once."""

    _bundled: ClassVar[PriceBook | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, entries: Mapping[str, Any]) -> None:
        self._entries = {k: v for k, v in entries.items() if isinstance(v, Mapping)}

    @classmethod
    def from_file(cls, path: str) -> PriceBook:
        with open(path, "rb") as fh:
            data = orjson.loads(fh.read())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a JSON object")
        return cls(data)

    @classmethod
    def bundled(cls) -> PriceBook:
        """The map shipped inside the installed litellm package (found without importing litellm)."""
        with cls._lock:
            if cls._bundled is None:
                spec = importlib.util.find_spec("litellm")
                if spec is None or not spec.submodule_search_locations:
                    raise RuntimeError("litellm is not installed; its bundled price map is required")
                cls._bundled = cls.from_file(os.path.join(spec.submodule_search_locations[0], PRICE_MAP_FILE))
            return cls._bundled

    def _entry(self, provider: str, model: str) -> tuple[str, Mapping[str, Any]] | None:
        for key in (f"{provider}/{model}", model):   # the provider's own price (azure/...) first
            entry = self._entries.get(key)
            if entry is not None:
                return key, entry
        return None

    def lookup(self, provider: str, model: str) -> Price | None:
        found = self._entry(provider, model)
        if found is None:
            return None
        key, e = found
        inp, out = _map_price(e, "input_cost_per_token"), _map_price(e, "output_cost_per_token")
        if inp is None and out is None:
            return None                 # priced per image/second/query, not per token
        inp, out = inp or 0, out or 0
        read, write, write_1h = (_map_price(e, k) for k in _MAP_CACHE_KEYS)
        family = f"{provider} {key} {e.get('litellm_provider', '')}".lower()
        if "anthropic" in family or "claude" in family:
            read = _or(read, _round_half_up(Decimal(inp), ANTHROPIC_CACHE_READ))
            write = _or(write, _round_half_up(Decimal(inp), ANTHROPIC_CACHE_WRITE))
            write_1h = _or(write_1h, _round_half_up(Decimal(inp), ANTHROPIC_CACHE_WRITE_1H))
        else:                           # no discount and no surcharge unless the map says so
            read, write = _or(read, inp), _or(write, inp)
            write_1h = _or(write_1h, write)
        return Price(input=inp, output=out, cache_read=read, cache_write=write, cache_write_1h=write_1h)

    def _int_field(self, provider: str, model: str, *keys: str) -> int | None:
        found = self._entry(provider, model)
        if found is None:
            return None
        for key in keys:
            value = _count(found[1].get(key))
            if value:                   # a positive int; 0, junk and the sample_spec prose are skipped
                return value
        return None

    def context_window(self, provider: str, model: str) -> int | None:
        return self._int_field(provider, model, "max_input_tokens", "max_tokens")

    def max_output_tokens(self, provider: str, model: str) -> int | None:
        return self._int_field(provider, model, "max_output_tokens")


def _map_price(entry: Mapping[str, Any], key: str) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    try:
        return pico_from_usd(value)
    except ValueError:
        return None                     # junk in the map: treat as absent


def _spec_number(spec: Mapping[str, Any], key: str, *, positive: bool = False) -> Decimal:
    value = _decimal(spec[key], f"price.{key}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"price.{key} must be {'greater than 0' if positive else 'non-negative'}, got {spec[key]!r}")
    return value


def price_from_spec(spec: Mapping[str, Any]) -> Price:
    """A policy ``price:`` mapping to a Price: per-million-token USD, or self-hosted GPU-hour cost."""
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError("price must be a non-empty mapping")
    unknown = sorted(str(k) for k in spec if k not in SPEC_KEYS)
    if unknown:
        raise ValueError(f"unknown price key {unknown[0]!r}; expected some of {sorted(SPEC_KEYS)}")
    if "gpu_hour_usd" in spec:
        mixed = [k for k in _PER_TOKEN_KEYS if k in spec]
        if mixed:
            raise ValueError(f"price.gpu_hour_usd cannot be combined with price.{mixed[0]}")
        if "output_tokens_per_second" not in spec:
            raise ValueError("price.gpu_hour_usd needs price.output_tokens_per_second")
        # pico per token = gpu_hour_usd × 1e12 / 3600 / tokens_per_second
        pico_per_second = _EXACT.divide(_EXACT.multiply(_spec_number(spec, "gpu_hour_usd"), PICO_PER_USD), 3600)
        out_tps = _spec_number(spec, "output_tokens_per_second", positive=True)
        in_tps = (_spec_number(spec, "input_tokens_per_second", positive=True)
                  if "input_tokens_per_second" in spec else 10 * out_tps)
        inp, out = (_round_half_up(_EXACT.divide(pico_per_second, tps)) for tps in (in_tps, out_tps))
    else:
        stray = [k for k in _GPU_KEYS if k in spec]
        if stray:
            raise ValueError(f"price.{stray[0]} is only valid together with price.gpu_hour_usd")
        missing = [k for k in _PER_TOKEN_KEYS if k not in spec]
        if missing:
            raise ValueError(f"price needs price.{missing[0]} (USD per million tokens) or price.gpu_hour_usd")
        inp, out = (_round_half_up(_spec_number(spec, k), PICO_PER_USD_PER_MTOK) for k in _PER_TOKEN_KEYS)

    def cache(key: str, default: int) -> int:
        return _round_half_up(_spec_number(spec, key), PICO_PER_USD_PER_MTOK) if key in spec else default

    read, write = cache("cache_read_per_mtok", inp), cache("cache_write_per_mtok", inp)
    return Price(input=inp, output=out, cache_read=read, cache_write=write,
                 cache_write_1h=cache("cache_write_1h_per_mtok", write))


def resolve_price(spec: Mapping[str, Any] | None, provider: str, model: str, book: PriceBook) -> tuple[Price, str]:
    """The deployment's price and where it came from: ``policy``, ``litellm`` or ``unpriced``."""
    if spec is not None:
        return price_from_spec(spec), "policy"
    price = book.lookup(provider, model)
    if price is not None:
        return price, "litellm"
    return FREE, "unpriced"
