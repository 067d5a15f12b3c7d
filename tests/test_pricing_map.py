"""The whole bundled price map against the gateway's catalogue of price fields.

A litellm upgrade that adds a price-like field (a key naming a cost, price,
multiplier or uplift) the gateway neither applies nor deliberately ignores with a
reason fails here, and so does one whose applied fields stop reaching the Price.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import orjson
import pytest

from gateway.money import pico_from_usd
from gateway.pricemap import (
    IGNORED,
    MODAL_KEYS,
    NOT_PRICES,
    OFF_PEAK_RATE_KEYS,
    TIER_TABLE_KEYS,
    PriceBook,
    field_treatment,
    price_from_entry,
)

PRICE_LIKE = re.compile(r"cost|pric|multiplier|uplift")
OFF_PEAK_SCHEDULE_KEYS = frozenset({"windows", "hours_utc", "weekday_timezone"})


@pytest.fixture(scope="module")
def entries() -> dict[str, dict[str, Any]]:
    with open(PriceBook.bundled_path(), "rb") as fh:
        data = orjson.loads(fh.read())
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def test_every_price_field_in_the_map_is_applied_or_ignored_with_a_reason(entries: dict[str, Any]) -> None:
    unknown: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for name, entry in entries.items():
        for key, value in entry.items():
            if PRICE_LIKE.search(key):
                seen.add(key)
                if field_treatment(key) is None:
                    unknown[key].append(name)
            if key == "tiered_pricing" and isinstance(value, list):
                for row in value:
                    for row_key in row:
                        if row_key not in TIER_TABLE_KEYS and field_treatment(row_key) is None:
                            unknown[f"tiered_pricing[].{row_key}"].append(name)
            if key == "off_peak_pricing" and isinstance(value, dict):
                for block_key in value:
                    if block_key not in OFF_PEAK_RATE_KEYS | OFF_PEAK_SCHEDULE_KEYS:
                        unknown[f"off_peak_pricing.{block_key}"].append(name)
    assert not unknown, "price fields the gateway does not understand: " + "; ".join(
        f"{k} (e.g. {v[0]}, {len(v)} entries)" for k, v in sorted(unknown.items()))
    assert len(seen) > 100           # the walk really saw the map's price fields


def test_unknown_fields_are_reported_not_guessed() -> None:
    assert field_treatment("output_cost_per_hologram_token") is None
    assert field_treatment("input_cost_per_token_above_2m_tokens") is None     # not a threshold it can read
    assert field_treatment("input_cost_per_token_above_272k_tokens") == "applied"
    assert field_treatment("cache_creation_input_token_cost_above_1hr_above_200k_tokens") == "applied"
    assert field_treatment("input_cost_per_token_above_272k_tokens_priority") == "applied"
    assert field_treatment("output_cost_per_hologram_token_priority") is None
    assert field_treatment("output_cost_per_token_decisions") not in (None, "applied")
    assert field_treatment("output_cost_per_token_batches") not in (None, "applied")


def test_every_ignore_rule_is_used_and_has_a_reason(entries: dict[str, Any]) -> None:
    keys = {k for e in entries.values() for k in e} | {k for e in entries.values()
                                                      for row in e.get("tiered_pricing") or () for k in row}
    for pattern, reason in IGNORED:
        assert len(reason) > 40, pattern.pattern
        assert any(pattern.search(k) and field_treatment(k) == reason for k in keys), \
            f"ignore rule {pattern.pattern!r} matches nothing in the map: remove it"
    assert all(len(reason) > 20 for reason in NOT_PRICES.values())


def test_applied_fields_reach_the_price(entries: dict[str, Any]) -> None:
    checked = defaultdict(int)
    for name, entry in entries.items():
        if entry.get("tiered_pricing") or entry.get("off_peak_pricing"):
            continue                   # tables and schedules: covered by the golden tests
        anthropic = "claude" in name or "anthropic" in str(entry.get("litellm_provider"))
        try:
            price = price_from_entry(entry, anthropic=anthropic)
        except Exception as exc:       # pragma: no cover - the failure message is the point
            pytest.fail(f"{name}: {exc!r}")
        if price is None:
            assert entry.get("input_cost_per_token") is None and entry.get("output_cost_per_token") is None, name
            continue
        for key, attr in MODAL_KEYS.items():
            if isinstance(entry.get(key), (int, float)):
                assert getattr(price, attr) == pico_from_usd(entry[key]), f"{name}: {key}"
                checked[key] += 1
        thresholds = {int(m.group(1)) * 1000 for k, v in entry.items() if v is not None
                      and (m := re.match(r"^(?:input|output)_cost_per_token_above_(\d+)k_tokens$", k))}
        assert {t for t, _ in price.tiers} >= thresholds, name
        for threshold in thresholds:
            key = f"input_cost_per_token_above_{threshold // 1000}k_tokens"
            if isinstance(entry.get(key), (int, float)):
                assert price.at(threshold + 1).input == pico_from_usd(entry[key]), f"{name}: {key}"
                assert price.at(threshold).input != pico_from_usd(entry[key]) or \
                    entry[key] == entry.get("input_cost_per_token") or len(thresholds) > 1, f"{name}: {key}"
                checked["tiers"] += 1
        for tier in ("flex", "priority"):
            for key, attr in (("input_cost_per_token", "input"), ("output_cost_per_token", "output"),
                              ("cache_read_input_token_cost", "cache_read")):
                if isinstance(entry.get(f"{key}_{tier}"), (int, float)):
                    assert getattr(price.served_at(tier), attr) == pico_from_usd(entry[f"{key}_{tier}"]), \
                        f"{name}: {key}_{tier}"
                    checked[tier] += 1
    for key in ("output_cost_per_reasoning_token", "input_cost_per_audio_token", "output_cost_per_audio_token",
                "input_cost_per_image_token", "tiers", "flex", "priority"):
        assert checked[key] > 5, key
