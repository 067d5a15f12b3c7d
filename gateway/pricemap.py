"""litellm's bundled price map read into :class:`~gateway.price.Price`, and the catalogue of its fields.

This module owns :class:`PriceBook` (the map shipped inside the installed
litellm package, loaded once, looked up by provider and model), the reading of
one map entry into a Price (text, cache read/write and Anthropic 1-hour write
prices; reasoning, audio, image, video and citation prices; long-context tiers
from ``*_above_<N>k_tokens`` keys or a ``tiered_pricing`` table; the off-peak
schedule; the flex/priority/... service-tier variants) and :func:`field_treatment`,
which says for every price-like field name whether the gateway applies it or
deliberately ignores it and why. Where an Anthropic-family entry lacks a cache
price, Anthropic's published multipliers of the input price stand in (reads
0.1x, 5-minute writes 1.25x, 1-hour writes 2x), tier by tier; elsewhere a
missing cache price is the input price.
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal
from typing import Any, ClassVar

import orjson

from gateway.money import pico_from_usd, round_half_up
from gateway.offpeak import parse_off_peak
from gateway.price import Price
from gateway.usage import SERVICE_TIERS, token_count

PRICE_MAP_FILE = "model_prices_and_context_window_backup.json"
# Anthropic prompt-caching multipliers of the input price, used only when the map lacks a key.
ANTHROPIC_CACHE_READ, ANTHROPIC_CACHE_WRITE, ANTHROPIC_CACHE_WRITE_1H = Decimal("0.1"), Decimal("1.25"), Decimal(2)
INCLUSIVE_TIER_PROVIDERS = frozenset({"xai"})    # bill the higher tier from the threshold itself (>=)
PASS_THROUGH_PROVIDERS = frozenset({"openrouter"})   # resell at the model vendor's own prices

INPUT, OUTPUT = "input_cost_per_token", "output_cost_per_token"
READ, WRITE, WRITE_1H = "cache_read_input_token_cost", "cache_creation_input_token_cost", \
    "cache_creation_input_token_cost_above_1hr"
READ_ALIAS = "input_cost_per_token_cache_hit"     # DeepSeek's name for the cache-read price
REASONING = "output_cost_per_reasoning_token"
_CACHE_KEYS = (READ, WRITE, WRITE_1H, READ_ALIAS)
_TEXT_KEYS = (INPUT, OUTPUT, *_CACHE_KEYS, REASONING)
# Price fields for one kind of token, mapped to the Price attribute they set.
MODAL_KEYS = {
    REASONING: "reasoning",
    "input_cost_per_audio_token": "audio_input", "output_cost_per_audio_token": "audio_output",
    "cache_read_input_audio_token_cost": "audio_cache_read",
    "input_cost_per_image_token": "image_input", "output_cost_per_image_token": "image_output",
    "cache_read_input_image_token_cost": "image_cache_read",
    "input_cost_per_video_token": "video_input", "output_cost_per_video_token": "video_output",
    "citation_cost_per_token": "citation",
}
_TIER_KEY = re.compile(rf"^({WRITE_1H}|{INPUT}|{OUTPUT}|{READ}|{WRITE})_above_(\d+)(k?)_tokens$")
_SERVICE_TIER_KEY = re.compile(rf"_({'|'.join(sorted(set(SERVICE_TIERS.values())))})$")
APPLIED = frozenset({INPUT, OUTPUT, READ, WRITE, WRITE_1H, READ_ALIAS, *MODAL_KEYS, "tiered_pricing",
                     "off_peak_pricing"})
TIER_TABLE_KEYS = frozenset({INPUT, OUTPUT, READ, REASONING, "range"})   # understood inside tiered_pricing rows
OFF_PEAK_RATE_KEYS = frozenset({INPUT, OUTPUT, READ, WRITE, REASONING})   # understood inside off_peak_pricing

# Deliberately ignored fields, by pattern, each with the reason. First match wins.
IGNORED: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"_batches$",
     "Batch API price: the gateway serves no batch endpoint, every request it prices is a synchronous one"),
    (r"_decisions$",
     "OpenAI 'decisions' tier of gpt-6-luna: not a service tier any usage or response reports (litellm "
     "does not read it either); requests are priced at the tier they report"),
    (r"^search_context_cost_per_query$|^google_maps_grounding_cost_per_query$",
     "web-search and grounding tool fees, per query: not a token price; the upstream's own reported cost "
     "(upstream_cost_nano) shows them in the drift counter (not done: billed as tokens only)"),
    (r"^input_cost_per_request$",
     "per-request fee of four Perplexity models retired in 2024 (pplx-*-online, sonar-*-online)"),
    (r"^(annotation|ocr|guardrail|vector_store|file_search|code_interpreter)_",
     "document-annotation, OCR, guardrail, vector-store, file-search and code-interpreter fees: endpoints and "
     "hosted tools the gateway does not serve"),
    (r"per_second|per_character|per_pixel|per_page|per_credit|per_session|per_gb|per_1k_calls|"
     r"per_text_message|per_query$|per_unit$|_dbu_",
     "priced per second, character, pixel, page, credit, session, stored GB, message, query or "
     "Databricks DBU: none of these units appears in a usage object that reaches the gateway (speech, "
     "transcription, video generation, OCR, rerank, search and storage endpoints are not served); an "
     "entry priced only this way is unpriced"),
    (r"^(input|output)_cost_per_image(_above_\d+k_tokens|_\d+(\.\d+)?[kK]?|_\d+)?$",
     "price per generated or attached image (not per image token): the image-generation endpoint is not "
     "served and chat usage counts image tokens, priced by *_cost_per_image_token"),
    (r"^computer_use_(input|output)_cost_per_1k_tokens$",
     "OpenAI computer-use tool (Responses API tool calls): only sample_spec carries it, at 0"),
    (r"^cache_creation_input_audio_token_cost$",
     "audio cache writes (OpenAI Realtime): no usage object reaching the gateway reports them apart from "
     "text cache writes, which are priced at the text write price"),
    (r"^explicit_cache_read_input_token_cost$",
     "DashScope explicit-cache reads: the usage reader does not tell explicit from implicit cache hits, "
     "so every hit is priced at cache_read_input_token_cost (not done)"),
    (r"^regional_(processing|endpoint)_uplift_multiplier",
     "regional data-residency or Vertex regional-endpoint uplift: depends on the endpoint host, which a "
     "deployment's policy price override sets today (not done: no automatic uplift)"),
))
# Fields that look like prices by name but are not, found in the map, with the reason.
NOT_PRICES = {"max_results_range": "row selector of search tiered_pricing (per query), not a price"}


def field_treatment(key: str) -> str | None:
    """``"applied"`` for a field the gateway prices with, the reason it deliberately ignores it,
    or None for a field it does not know (the map test fails on those)."""
    if key in APPLIED or _TIER_KEY.match(key):
        return "applied"
    base = _SERVICE_TIER_KEY.sub("", key)
    if base != key and (base in APPLIED or _TIER_KEY.match(base)):
        return "applied"                # a service tier's own price of an applied field
    for pattern, reason in IGNORED:
        if pattern.search(key):
            return reason
    return NOT_PRICES.get(key)


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
    def bundled_path(cls) -> str:
        """The map file inside the installed litellm package (found without importing litellm)."""
        spec = importlib.util.find_spec("litellm")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("litellm is not installed; its bundled price map is required")
        return os.path.join(spec.submodule_search_locations[0], PRICE_MAP_FILE)

    @classmethod
    def bundled(cls) -> PriceBook:
        with cls._lock:
            if cls._bundled is None:
                cls._bundled = cls.from_file(cls.bundled_path())
            return cls._bundled

    def entries(self) -> Mapping[str, Mapping[str, Any]]:
        return self._entries

    def _entry(self, provider: str, model: str) -> tuple[str, Mapping[str, Any]] | None:
        keys = [f"{provider}/{model}", model]       # the provider's own price (azure/...) first
        if provider in PASS_THROUGH_PROVIDERS and "/" in model:
            keys.append(model.split("/", 1)[1])     # openrouter's openai/gpt-4o-mini is OpenAI's gpt-4o-mini
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                return key, entry
        return None

    def lookup(self, provider: str, model: str) -> Price | None:
        found = self._entry(provider, model)
        if found is None:
            return None
        key, entry = found
        litellm_provider = str(entry.get("litellm_provider", ""))
        family = f"{provider} {key} {litellm_provider}".lower()
        return price_from_entry(entry, anthropic="anthropic" in family or "claude" in family,
                                inclusive=provider in INCLUSIVE_TIER_PROVIDERS
                                or litellm_provider in INCLUSIVE_TIER_PROVIDERS)

    def _int_field(self, provider: str, model: str, *keys: str) -> int | None:
        found = self._entry(provider, model)
        if found is None:
            return None
        for key in keys:
            value = token_count(found[1].get(key))
            if value:                   # a positive int; 0, junk and the sample_spec prose are skipped
                return value
        return None

    def context_window(self, provider: str, model: str) -> int | None:
        return self._int_field(provider, model, "max_input_tokens", "max_tokens")

    def max_output_tokens(self, provider: str, model: str) -> int | None:
        return self._int_field(provider, model, "max_output_tokens")


def price_from_entry(entry: Mapping[str, Any], *, anthropic: bool = False, inclusive: bool = False,
                     service_tiers: bool = True) -> Price | None:
    """One map entry as a Price, or None when it has no per-token price (priced per image, second, ...)."""
    table = _tier_table(entry.get("tiered_pricing"))
    base_entry: Mapping[str, Any]
    tier_entries: list[tuple[int, dict[str, Any]]]
    if table:
        tiers = [(start, _tier_row(entry, row)) for start, row in table]
        base_entry, tier_entries = tiers[0][1], [(start, e) for start, e in tiers[1:]]
    else:
        base_entry, tier_entries = entry, _threshold_tiers(entry, anthropic)
    base = _flat(base_entry, anthropic)
    if base is None:
        return None
    built = tuple((threshold, flat) for threshold, e in tier_entries if (flat := _flat(e, anthropic)) is not None)
    schedule = parse_off_peak(entry.get("off_peak_pricing"))
    off_peak = None
    if schedule is not None and isinstance(entry.get("off_peak_pricing"), Mapping):
        rates = {k: v for k, v in entry["off_peak_pricing"].items() if k in OFF_PEAK_RATE_KEYS}
        cheaper = _flat({**base_entry, **rates}, anthropic)
        if cheaper is not None and rates:
            off_peak = (schedule, cheaper)
    standard = replace(base, tiers=built, inclusive_tiers=inclusive and bool(built), off_peak=off_peak)
    variants = []
    for tier in sorted(set(SERVICE_TIERS.values())) if service_tiers and not table else ():
        own = {k[:-len(tier) - 1]: v for k, v in entry.items() if k.endswith(f"_{tier}") and v is not None}
        if own:
            merged = {**entry, **own}
            if OUTPUT in own and REASONING not in own:
                merged.pop(REASONING, None)     # the tier's output price stands for its reasoning, as litellm
            variant = price_from_entry(merged, anthropic=anthropic, inclusive=inclusive, service_tiers=False)
            if variant is not None:
                variants.append((tier, variant))
    return replace(standard, service_tiers=tuple(variants)) if variants else standard


def _threshold_tiers(entry: Mapping[str, Any], anthropic: bool) -> list[tuple[int, dict[str, Any]]]:
    """``*_above_<N>k_tokens`` keys as cumulative entries, ascending: above each threshold the tier's
    keys replace the base ones (and a lower tier's); an Anthropic-family tier without its own cache
    prices derives them from its own input price."""
    by_threshold: dict[int, dict[str, Any]] = {}
    for key, value in entry.items():
        m = _TIER_KEY.match(key)
        if m is not None and value is not None:
            threshold = int(m.group(2)) * (1000 if m.group(3) else 1)
            by_threshold.setdefault(threshold, {})[m.group(1)] = value
    current = dict(entry)
    if anthropic:
        for key in _CACHE_KEYS:
            current.pop(key, None)
    out = []
    for threshold in sorted(by_threshold):
        current = {**current, **by_threshold[threshold]}
        out.append((threshold, current))
    return out


def _tier_table(rows: Any) -> list[tuple[int, Mapping[str, Any]]]:
    """A ``tiered_pricing`` table's per-token rows as (range start, row), ascending; [] when none."""
    if not isinstance(rows, list):
        return []
    out = []
    for row in rows:
        if not isinstance(row, Mapping) or INPUT not in row:
            continue                    # per-query search tiers (max_results_range) are not token tiers
        rng = row.get("range")
        if isinstance(rng, list) and len(rng) == 2 and isinstance(rng[0], (int, float)) \
                and not isinstance(rng[0], bool):
            out.append((int(rng[0]), row))
    return sorted(out, key=lambda item: item[0])


def _tier_row(entry: Mapping[str, Any], row: Mapping[str, Any]) -> dict[str, Any]:
    """An entry as priced by one ``tiered_pricing`` row: all-or-nothing, every token at the row's
    rates; cache prices the row lacks are its input price, its output falls back to the model's,
    and reasoning to the row's output when the row has one."""
    out = {k: v for k, v in entry.items() if k not in _TEXT_KEYS}
    out.update({k: row[k] for k in (INPUT, OUTPUT, READ, REASONING) if k in row})
    if OUTPUT not in row and OUTPUT in entry:
        out[OUTPUT] = entry[OUTPUT]
    if REASONING not in row and OUTPUT not in row and REASONING in entry:
        out[REASONING] = entry[REASONING]
    return out


def _flat(e: Mapping[str, Any], anthropic: bool) -> Price | None:
    inp, out = _map_price(e, INPUT), _map_price(e, OUTPUT)
    if inp is None and out is None:
        return None                     # priced per image/second/query, not per token
    inp, out = inp or 0, out or 0
    read = _first(_map_price(e, READ), _map_price(e, READ_ALIAS))
    write, write_1h = _map_price(e, WRITE), _map_price(e, WRITE_1H)
    if anthropic:
        read = _or(read, round_half_up(Decimal(inp), ANTHROPIC_CACHE_READ))
        write = _or(write, round_half_up(Decimal(inp), ANTHROPIC_CACHE_WRITE))
        write_1h = _or(write_1h, round_half_up(Decimal(inp), ANTHROPIC_CACHE_WRITE_1H))
    else:                               # no discount and no surcharge unless the map says so
        read, write = _or(read, inp), _or(write, inp)
        write_1h = _or(write_1h, write)
    modal: dict[str, Any] = {attr: _map_price(e, key) for key, attr in MODAL_KEYS.items()}
    return replace(Price(input=inp, output=out, cache_read=read, cache_write=write, cache_write_1h=write_1h), **modal)


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _map_price(entry: Mapping[str, Any], key: str) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    try:
        return pico_from_usd(value)
    except ValueError:
        return None                     # junk in the map: treat as absent
