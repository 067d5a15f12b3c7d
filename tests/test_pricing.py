"""Cost accounting: usage normalisation, prices and integer money, with hand-computed golden numbers.

Prices come from the model map bundled with the installed litellm (1.106.2); the
per-token USD figures quoted in comments are that file's values. Units: prices are
pico-USD (1e-12) per token, costs nano-USD (1e-9).
"""

from __future__ import annotations

import random
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from gateway.pricing import (
    FREE,
    Price,
    PriceBook,
    Usage,
    cost_nano,
    cost_pico,
    nano_to_usd,
    pico_from_usd,
    price_from_spec,
    resolve_price,
    usage_from_openai,
    usd_to_nano,
)


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook.bundled()


# --- the bundled map ---------------------------------------------------------------------------

def test_bundled_book_is_loaded_once(book: PriceBook) -> None:
    assert PriceBook.bundled() is book


def test_openai_cached_tokens(book: PriceBook) -> None:
    # gpt-4o-mini: input 1.5e-07, cache read 7.5e-08, output 6e-07 USD/token; no cache-write price,
    # so writes cost the input price.
    price = book.lookup("openai", "gpt-4o-mini")
    assert price is not None
    assert replace(price, service_tiers=()) == Price(input=150_000, output=600_000, cache_read=75_000,
                                                     cache_write=150_000, cache_write_1h=150_000)
    usage = usage_from_openai({"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200,
                               "prompt_tokens_details": {"cached_tokens": 400}})
    assert usage == Usage(input_tokens=1000, output_tokens=200, cached_input_tokens=400)
    assert usage.uncached_input_tokens == 600
    assert usage.total_tokens == 1200
    #   600 uncached × 150_000 =  90_000_000
    # + 400 cached   ×  75_000 =  30_000_000
    # + 200 output   × 600_000 = 120_000_000
    #                          = 240_000_000 pico = 240_000 nano = $0.00024
    assert cost_pico(usage, price) == 240_000_000
    assert cost_nano(usage, price) == 240_000
    assert nano_to_usd(240_000) == 0.00024
    # served at the priority tier (OpenAI says so beside usage): input 2.5e-07, cache read 1.25e-07,
    # output 1e-06:  600 × 250_000 + 400 × 125_000 + 200 × 1_000_000
    #              = 150_000_000 + 50_000_000 + 200_000_000 = 400_000_000 pico
    priority = usage_from_openai({"prompt_tokens": 1000, "completion_tokens": 200,
                                  "prompt_tokens_details": {"cached_tokens": 400}}, service_tier="priority")
    assert priority == replace(usage, service_tier="priority")
    assert cost_nano(priority, price) == 400_000
    assert usage_from_openai({"prompt_tokens": 1}, service_tier="default") == Usage(input_tokens=1)


# litellm 1.106.2 AnthropicConfig.calculate_usage(RAW_ANTHROPIC).model_dump(), trimmed of null fields:
# its prompt_tokens (2400) = input_tokens 100 + cache writes 300 + cache reads 2000.
RAW_ANTHROPIC: dict[str, Any] = {
    "input_tokens": 100, "output_tokens": 50,
    "cache_creation_input_tokens": 300, "cache_read_input_tokens": 2000,
    "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
}
LITELLM_ANTHROPIC: dict[str, Any] = {
    "completion_tokens": 50, "prompt_tokens": 2400, "total_tokens": 2450,
    "completion_tokens_details": {"reasoning_tokens": 0, "text_tokens": 50},
    "prompt_tokens_details": {
        "cache_write_tokens": 300, "cached_tokens": 2000, "text_tokens": 100, "cache_creation_tokens": 300,
        "cache_creation_token_details": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
    },
    "cache_creation_input_tokens": 300, "cache_read_input_tokens": 2000,
}


def test_anthropic_cache_read_and_both_write_tiers(book: PriceBook) -> None:
    # claude-sonnet-4-5: input 3e-06, output 1.5e-05, cache read 3e-07, cache write (5 min) 3.75e-06,
    # cache write (1 h, cache_creation_input_token_cost_above_1hr) 6e-06 USD/token.
    price = book.lookup("anthropic", "claude-sonnet-4-5")
    assert price == Price(input=3_000_000, output=15_000_000, cache_read=300_000, cache_write=3_750_000,
                          cache_write_1h=6_000_000)
    expected = Usage(input_tokens=2400, output_tokens=50, cached_input_tokens=2000,
                     cache_write_tokens=100, cache_write_1h_tokens=200)
    assert usage_from_openai(RAW_ANTHROPIC) == expected
    assert usage_from_openai(LITELLM_ANTHROPIC) == expected
    assert expected.uncached_input_tokens == 100
    #   100 uncached  ×  3_000_000 =   300_000_000
    # + 2000 reads    ×    300_000 =   600_000_000
    # + 100 5m writes ×  3_750_000 =   375_000_000
    # + 200 1h writes ×  6_000_000 = 1_200_000_000
    # + 50 output     × 15_000_000 =   750_000_000
    #                              = 3_225_000_000 pico = 3_225_000 nano
    assert cost_nano(expected, price) == 3_225_000


def test_anthropic_usage_without_tier_breakdown_is_all_five_minute() -> None:
    raw = {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 40, "cache_read_input_tokens": 0}
    litellm_shape = {"prompt_tokens": 50, "completion_tokens": 5, "cache_creation_input_tokens": 40,
                     "cache_read_input_tokens": 0, "prompt_tokens_details": {"cached_tokens": 0}}
    expected = Usage(input_tokens=50, output_tokens=5, cache_write_tokens=40)
    assert usage_from_openai(raw) == expected
    assert usage_from_openai(litellm_shape) == expected


def test_anthropic_family_falls_back_to_cache_multipliers(book: PriceBook) -> None:
    # vertex_ai/claude-3-5-haiku has input 1e-06 and output 5e-06 but no cache keys in the map:
    # read 0.1 × input, 5-minute write 1.25 × input, 1-hour write 2 × input.
    assert book.lookup("vertex_ai", "claude-3-5-haiku") == Price(
        input=1_000_000, output=5_000_000, cache_read=100_000, cache_write=1_250_000, cache_write_1h=2_000_000)


def test_reasoning_tokens_are_output_tokens(book: PriceBook) -> None:
    # o4-mini: input 1.1e-06, output 4.4e-06 USD/token.
    price = book.lookup("openai", "o4-mini")
    assert price is not None and (price.input, price.output) == (1_100_000, 4_400_000)
    usage = usage_from_openai({"prompt_tokens": 500, "completion_tokens": 1200,
                               "completion_tokens_details": {"reasoning_tokens": 1000}})
    assert usage == Usage(input_tokens=500, output_tokens=1200, reasoning_tokens=1000)
    #   500 input   × 1_100_000 =   550_000_000
    # + 1200 output × 4_400_000 = 5_280_000_000   (the 1000 reasoning tokens are inside the 1200)
    #                           = 5_830_000_000 pico = 5_830_000 nano
    assert cost_nano(usage, price) == 5_830_000
    assert cost_nano(Usage(input_tokens=500, output_tokens=1200), price) == 5_830_000


def test_lookup_prefers_the_providers_own_entry_and_reads_limits(book: PriceBook) -> None:
    # azure/text-embedding-3-small is 2.2e-08 USD/token; the bare openai entry is 2e-08.
    assert book.lookup("azure", "text-embedding-3-small") == Price(22_000, 0, 22_000, 22_000, 22_000)
    assert book.lookup("openai", "text-embedding-3-small") == Price(20_000, 0, 20_000, 20_000, 20_000)
    assert book.context_window("openai", "gpt-4o-mini") == 128_000
    assert book.max_output_tokens("openai", "gpt-4o-mini") == 16_384
    assert book.lookup("openai", "no-such-model") is None
    assert book.context_window("openai", "no-such-model") is None
    assert book.lookup("openai", "dall-e-3") is None          # priced per image, not per token
    assert book.context_window("openai", "sample_spec") is None  # the map's prose placeholder entry


# --- policy overrides ---------------------------------------------------------------------------

def test_self_hosted_gpu_hour_price() -> None:
    price = price_from_spec({"gpu_hour_usd": 2.0, "output_tokens_per_second": 1000})
    # output: 2 / 3600 / 1000 USD = 555_555.55… pico → 555_556
    # input (default 10 × 1000 = 10_000 tok/s): 55_555.55… pico → 55_556; cache reads/writes as input
    assert price == Price(input=55_556, output=555_556, cache_read=55_556, cache_write=55_556,
                          cache_write_1h=55_556)
    usage = Usage(input_tokens=3000, output_tokens=400)
    #   3000 × 55_556  = 166_668_000
    # + 400 × 555_556  = 222_222_400
    #                  = 388_890_400 pico → 388_890 nano
    # (exact GPU time: 3000/10000 + 400/1000 = 0.7 s × 2/3600 $/s = 388_888.9 nano; the gap is
    #  the per-token rounding to whole pico)
    assert cost_nano(usage, price) == 388_890
    # 3.6 $/h = 1e9 pico/s: 1e9/50 = 20_000_000 per output token, 1e9/2000 = 500_000 per input token.
    explicit = price_from_spec({"gpu_hour_usd": 3.6, "output_tokens_per_second": 50, "input_tokens_per_second": 2000})
    assert (explicit.input, explicit.output, explicit.cache_read) == (500_000, 20_000_000, 500_000)


def test_per_mtok_spec_and_cache_defaults() -> None:
    # 3 $/Mtok = 3_000_000 pico/token; 15 $/Mtok = 15_000_000; 0.15 $/Mtok = 150_000.
    assert price_from_spec({"input_per_mtok": 3, "output_per_mtok": 15}) == Price(
        3_000_000, 15_000_000, 3_000_000, 3_000_000, 3_000_000)
    # the 1-hour write defaults to the (5-minute) write price
    assert price_from_spec({"input_per_mtok": 3, "output_per_mtok": 15, "cache_write_per_mtok": 3.75}) == Price(
        3_000_000, 15_000_000, 3_000_000, 3_750_000, 3_750_000)
    assert price_from_spec({"input_per_mtok": 0.15, "output_per_mtok": 0.6, "cache_read_per_mtok": 0.075,
                            "cache_write_per_mtok": 0.1875, "cache_write_1h_per_mtok": 0.3}) == Price(
        150_000, 600_000, 75_000, 187_500, 300_000)
    # self-hosted with an explicit cache-read price: 3.6 $/h = 1e9 pico/s; input at the default
    # 10 × 50 = 500 tok/s is 1e9/500 = 2_000_000 pico; 0.01 $/Mtok = 10_000 pico
    gpu = price_from_spec({"gpu_hour_usd": 3.6, "output_tokens_per_second": 50, "cache_read_per_mtok": 0.01})
    assert (gpu.input, gpu.cache_read, gpu.cache_write) == (2_000_000, 10_000, 2_000_000)


@pytest.mark.parametrize("spec", [
    {},
    {"output_per_mtok": 1},                                     # input missing
    {"input_per_mtok": 1},                                      # output missing
    {"input_per_mtok": -1, "output_per_mtok": 1},
    {"input_per_mtok": "cheap", "output_per_mtok": 1},
    {"input_per_mtok": True, "output_per_mtok": 1},
    {"input_per_mtok": float("nan"), "output_per_mtok": 1},
    {"input_per_mtok": 1, "output_per_mtok": 1, "per_request_usd": 1},          # unknown key
    {"input_per_mtok": 1, "output_per_mtok": 1, "output_tokens_per_second": 9},  # throughput without GPU
    {"gpu_hour_usd": 2.0},                                      # throughput missing
    {"gpu_hour_usd": 2.0, "output_tokens_per_second": 0},
    {"gpu_hour_usd": 2.0, "output_tokens_per_second": 100, "input_tokens_per_second": 0},
    {"gpu_hour_usd": 2.0, "output_tokens_per_second": 100, "input_per_mtok": 1},  # two forms mixed
])
def test_invalid_specs_raise(spec: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        price_from_spec(spec)


def test_resolve_price_sources(book: PriceBook) -> None:
    override = {"input_per_mtok": 1, "output_per_mtok": 2}
    assert resolve_price(override, "openai", "gpt-4o-mini", book) == (Price(1_000_000, 2_000_000, 1_000_000,
                                                                            1_000_000, 1_000_000), "policy")
    assert resolve_price(None, "openai", "gpt-4o-mini", book) == (book.lookup("openai", "gpt-4o-mini"), "litellm")
    assert resolve_price(None, "vllm", "my-finetune", book) == (FREE, "unpriced")
    assert Price.ZERO is FREE and cost_nano(Usage(input_tokens=10**6, output_tokens=10**6), FREE) == 0


# --- integer money -------------------------------------------------------------------------------

@pytest.mark.parametrize(("pico", "nano"), [(1500, 2), (1499, 1), (500, 1), (499, 0), (2500, 3), (0, 0)])
def test_rounding_is_half_up_at_the_nano_boundary(pico: int, nano: int) -> None:
    price = Price(input=pico, output=0, cache_read=0, cache_write=0, cache_write_1h=0)
    assert cost_pico(Usage(input_tokens=1), price) == pico
    assert cost_nano(Usage(input_tokens=1), price) == nano


def test_usd_conversions_are_decimal_exact() -> None:
    assert pico_from_usd(1.5e-07) == 150_000
    assert 3e-08 * 1e12 < 30_000 and pico_from_usd(3e-08) == 30_000    # float arithmetic would give 29_999
    assert pico_from_usd("1.2e-07") == 120_000
    assert usd_to_nano(0.1) == 100_000_000
    assert usd_to_nano("25") == usd_to_nano(25) == 25_000_000_000
    assert usd_to_nano("0.0000000005") == 1                             # half a nano rounds up
    for bad in ("ten", float("inf"), None, True, "1e200"):
        with pytest.raises(ValueError):
            usd_to_nano(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pico_from_usd(-1e-6)
    assert repr(nano_to_usd(123_456)) == "0.000123456"
    assert repr(nano_to_usd(1)) == "1e-09"


def test_money_agreement_over_many_requests(book: PriceBook) -> None:
    rng = random.Random(1234)
    prices = [p for p in (book.lookup("openai", "gpt-4o-mini"), book.lookup("anthropic", "claude-sonnet-4-5"),
                          price_from_spec({"gpu_hour_usd": 2.0, "output_tokens_per_second": 1000})) if p]
    costs = []
    for _ in range(5000):
        cached, write, write_1h = rng.randrange(2000), rng.randrange(500), rng.randrange(300)
        usage = Usage(input_tokens=rng.randrange(5000) + cached + write + write_1h, output_tokens=rng.randrange(4000),
                      cached_input_tokens=cached, cache_write_tokens=write, cache_write_1h_tokens=write_1h)
        costs.append(cost_nano(usage, rng.choice(prices)))
    total = sum(costs)
    assert round(round(sum(nano_to_usd(c) for c in costs), 9) * 1e9) == total
    assert all(Decimal(repr(nano_to_usd(c))) == Decimal(c) / 10**9 for c in costs)


# --- usage normalisation -------------------------------------------------------------------------

def test_embeddings_usage() -> None:
    assert usage_from_openai({"prompt_tokens": 8, "total_tokens": 8}) == Usage(input_tokens=8)


def test_responses_api_usage_counts_cached_inside_input() -> None:
    usage = usage_from_openai({"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 400},
                               "output_tokens": 200, "output_tokens_details": {"reasoning_tokens": 150}})
    assert usage == Usage(input_tokens=1000, output_tokens=200, cached_input_tokens=400, reasoning_tokens=150)


@pytest.mark.parametrize("raw", [None, {}, {"total_tokens": 5}, {"foo": 1}, {"prompt_tokens": "12"},
                                 {"prompt_tokens": None, "completion_tokens": None}, [1, 2], "usage"])
def test_unrecognisable_usage_is_none(raw: Any) -> None:
    assert usage_from_openai(raw) is None


def test_junk_values_count_as_zero() -> None:
    junk = {"prompt_tokens": 10, "completion_tokens": "x", "prompt_tokens_details": "junk",
            "completion_tokens_details": {"reasoning_tokens": -5}}
    assert usage_from_openai(junk) == Usage(input_tokens=10)
    assert usage_from_openai({"prompt_tokens": -3, "completion_tokens": 7.0}) == Usage(output_tokens=7)
    assert usage_from_openai({"prompt_tokens": True, "completion_tokens": 2.5}) is None
    # cache counts larger than the prompt cannot make uncached input negative
    odd = usage_from_openai({"prompt_tokens": 10, "completion_tokens": 1,
                             "prompt_tokens_details": {"cached_tokens": 50}})
    assert odd == Usage(input_tokens=50, output_tokens=1, cached_input_tokens=50)
    assert odd.uncached_input_tokens == 0
