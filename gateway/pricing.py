"""Token accounting and prices: the one place where usage becomes money.

This module is the pricing facade the rest of the gateway imports: the
normalised :class:`Usage` and its readers (:mod:`gateway.usage`), integer
prices in pico-USD per token (:class:`Price`, :mod:`gateway.price`) from
litellm's bundled price map (:class:`PriceBook`, :mod:`gateway.pricemap`) or
from a policy ``price:`` spec, and the cost arithmetic: exact integer pico-USD
per request, rounded half-up once to nano-USD (:mod:`gateway.money`). It owns
the policy side: :func:`price_from_spec` reads a ``price:`` mapping (per
million tokens, or a self-hosted GPU-hour cost and throughput) and
:func:`resolve_price` says where a deployment's price comes from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from gateway.money import (
    EXACT,
    NANO_PER_USD,
    PICO_PER_USD,
    PICO_PER_USD_PER_MTOK,
    nano_to_usd,
    pico_from_usd,
    round_half_up,
    to_decimal,
    usd_to_nano,
)
from gateway.price import FREE, Price, cost_nano, cost_pico
from gateway.pricemap import (
    ANTHROPIC_CACHE_READ,
    ANTHROPIC_CACHE_WRITE,
    ANTHROPIC_CACHE_WRITE_1H,
    PRICE_MAP_FILE,
    PriceBook,
)
from gateway.usage import Usage, upstream_cost_nano, usage_from_anthropic, usage_from_openai, usage_from_responses

__all__ = [
    "ANTHROPIC_CACHE_READ", "ANTHROPIC_CACHE_WRITE", "ANTHROPIC_CACHE_WRITE_1H", "FREE", "NANO_PER_USD",
    "PICO_PER_USD", "PICO_PER_USD_PER_MTOK", "PRICE_MAP_FILE", "SPEC_KEYS", "Price", "PriceBook", "Usage",
    "cost_nano", "cost_pico", "nano_to_usd", "pico_from_usd", "price_from_spec", "resolve_price",
    "upstream_cost_nano", "usage_from_anthropic", "usage_from_openai", "usage_from_responses", "usd_to_nano",
]

_PER_TOKEN_KEYS = ("input_per_mtok", "output_per_mtok")
_CACHE_KEYS = ("cache_read_per_mtok", "cache_write_per_mtok", "cache_write_1h_per_mtok")
# Optional per-million-token prices of one kind of token, and the Price attribute each sets.
_MODAL_KEYS = {"reasoning_per_mtok": "reasoning", "audio_input_per_mtok": "audio_input",
               "audio_output_per_mtok": "audio_output"}
_GPU_KEYS = ("gpu_hour_usd", "output_tokens_per_second", "input_tokens_per_second")
SPEC_KEYS = frozenset(_PER_TOKEN_KEYS + _CACHE_KEYS + _GPU_KEYS + tuple(_MODAL_KEYS))


def _spec_number(spec: Mapping[str, Any], key: str, *, positive: bool = False) -> Any:
    value = to_decimal(spec[key], f"price.{key}")
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
        pico_per_second = EXACT.divide(EXACT.multiply(_spec_number(spec, "gpu_hour_usd"), PICO_PER_USD), 3600)
        out_tps = _spec_number(spec, "output_tokens_per_second", positive=True)
        in_tps = (_spec_number(spec, "input_tokens_per_second", positive=True)
                  if "input_tokens_per_second" in spec else 10 * out_tps)
        inp, out = (round_half_up(EXACT.divide(pico_per_second, tps)) for tps in (in_tps, out_tps))
    else:
        stray = [k for k in _GPU_KEYS if k in spec]
        if stray:
            raise ValueError(f"price.{stray[0]} is only valid together with price.gpu_hour_usd")
        missing = [k for k in _PER_TOKEN_KEYS if k not in spec]
        if missing:
            raise ValueError(f"price needs price.{missing[0]} (USD per million tokens) or price.gpu_hour_usd")
        inp, out = (round_half_up(_spec_number(spec, k), PICO_PER_USD_PER_MTOK) for k in _PER_TOKEN_KEYS)

    def per_mtok(key: str) -> int | None:
        return round_half_up(_spec_number(spec, key), PICO_PER_USD_PER_MTOK) if key in spec else None

    read, write = per_mtok("cache_read_per_mtok"), per_mtok("cache_write_per_mtok")
    write = inp if write is None else write
    write_1h = per_mtok("cache_write_1h_per_mtok")
    price = Price(input=inp, output=out, cache_read=inp if read is None else read, cache_write=write,
                  cache_write_1h=write if write_1h is None else write_1h)
    modal: dict[str, Any] = {attr: per_mtok(key) for key, attr in _MODAL_KEYS.items()}
    return replace(price, **modal)


def resolve_price(spec: Mapping[str, Any] | None, provider: str, model: str, book: PriceBook) -> tuple[Price, str]:
    """The deployment's price and where it came from: ``policy``, ``litellm`` or ``unpriced``."""
    if spec is not None:
        return price_from_spec(spec), "policy"
    price = book.lookup(provider, model)
    if price is not None:
        return price, "litellm"
    return FREE, "unpriced"
