"""Golden costs for every row of issue 16's pricing table, computed by hand from litellm's bundled map.

Each expected number is written out as integer arithmetic in the test: per-token
USD prices from the map (quoted in the comments) are turned into pico-USD by
hand (1e-06 USD = 1_000_000 pico), multiplied by the token counts, summed, and
rounded half-up to nano-USD. The code under test is only asked for its answer.
Prices are those of litellm 1.106.2's model_prices_and_context_window_backup.json.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.pricing import (
    Price,
    PriceBook,
    Usage,
    cost_nano,
    usage_from_anthropic,
    usage_from_openai,
)


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook.bundled()


def priced(book: PriceBook, provider: str, model: str) -> Price:
    price = book.lookup(provider, model)
    assert price is not None, f"{provider}/{model} is not in the bundled map"
    return price


# --- long-context tiers --------------------------------------------------------------------------

def test_gemini_2_5_pro_250k_prompt(book: PriceBook) -> None:
    # gemini/gemini-2.5-pro: above 200k prompt tokens input 2.5e-06 (base 1.25e-06), output 1.5e-05 (base 1e-05)
    price = priced(book, "gemini", "gemini-2.5-pro")
    usage = usage_from_openai({"prompt_tokens": 250_000, "completion_tokens": 1_000, "total_tokens": 251_000})
    assert usage == Usage(input_tokens=250_000, output_tokens=1_000)
    #   250_000 input × 2_500_000 = 625_000_000_000
    # +   1_000 output × 15_000_000 = 15_000_000_000
    #                               = 640_000_000_000 pico = 640_000_000 nano ($0.64)
    assert cost_nano(usage, price) == 640_000_000
    # the same request at the threshold itself (200k, not above it) is billed at the base prices:
    #   200_000 × 1_250_000 + 1_000 × 10_000_000 = 250_000_000_000 + 10_000_000_000 = 260_000_000_000 pico
    assert cost_nano(Usage(input_tokens=200_000, output_tokens=1_000), price) == 260_000_000


# litellm's OpenAI-shaped usage of an Anthropic-family answer with 250k prompt tokens: 120k uncached,
# 100k cache reads, 20k five-minute and 10k one-hour cache writes, 2k output.
LITELLM_CLAUDE_250K: dict[str, Any] = {
    "prompt_tokens": 250_000, "completion_tokens": 2_000, "total_tokens": 252_000,
    "cache_read_input_tokens": 100_000, "cache_creation_input_tokens": 30_000,
    "prompt_tokens_details": {"cached_tokens": 100_000, "cache_creation_tokens": 30_000,
                              "cache_creation_token_details": {"ephemeral_5m_input_tokens": 20_000,
                                                               "ephemeral_1h_input_tokens": 10_000}},
}
CLAUDE_250K = Usage(input_tokens=250_000, output_tokens=2_000, cached_input_tokens=100_000,
                    cache_write_tokens=20_000, cache_write_1h_tokens=10_000)


def test_bedrock_claude_sonnet_4_at_250k(book: PriceBook) -> None:
    # anthropic.claude-sonnet-4-20250514-v1:0 above 200k: input 6e-06, output 2.25e-05, cache read 6e-07,
    # cache write 7.5e-06; the entry has no 1-hour write key at all, so Anthropic's rule (2 × input)
    # gives 2 × 6e-06 = 1.2e-05 above 200k.
    price = priced(book, "bedrock", "anthropic.claude-sonnet-4-20250514-v1:0")
    usage = usage_from_openai(LITELLM_CLAUDE_250K)
    assert usage == CLAUDE_250K
    #   120_000 uncached × 6_000_000  = 720_000_000_000
    # + 100_000 reads    ×   600_000  =  60_000_000_000
    # +  20_000 5m write × 7_500_000  = 150_000_000_000
    # +  10_000 1h write × 12_000_000 = 120_000_000_000
    # +   2_000 output   × 22_500_000 =  45_000_000_000
    #                                 = 1_095_000_000_000 pico = 1_095_000_000 nano
    assert cost_nano(usage, price) == 1_095_000_000


def test_vertex_claude_sonnet_4_5_at_250k(book: PriceBook) -> None:
    # vertex_ai/claude-sonnet-4-5 above 200k: input 6e-06, output 2.25e-05, cache read 6e-07, write 7.5e-06,
    # 1-hour write 1.2e-05 (cache_creation_input_token_cost_above_1hr_above_200k_tokens).
    price = priced(book, "vertex_ai", "claude-sonnet-4-5")
    raw = {"input_tokens": 120_000, "output_tokens": 2_000, "cache_read_input_tokens": 100_000,
           "cache_creation_input_tokens": 30_000,
           "cache_creation": {"ephemeral_5m_input_tokens": 20_000, "ephemeral_1h_input_tokens": 10_000}}
    usage = usage_from_anthropic(raw)
    assert usage == CLAUDE_250K
    # the same sum as the Bedrock row: 1_095_000_000_000 pico
    assert cost_nano(usage, price) == 1_095_000_000
    # below the tier (uncached 20_000 instead of 120_000: 150_000 prompt tokens), the base prices:
    # input 3e-06, read 3e-07, write 3.75e-06, 1h write 6e-06, output 1.5e-05
    #    20_000 × 3_000_000  =  60_000_000_000
    # + 100_000 ×   300_000  =  30_000_000_000
    # +  20_000 × 3_750_000  =  75_000_000_000
    # +  10_000 × 6_000_000  =  60_000_000_000
    # +   2_000 × 15_000_000 =  30_000_000_000
    #                        = 255_000_000_000 pico
    small = usage_from_anthropic({**raw, "input_tokens": 20_000})
    assert small is not None and small.input_tokens == 150_000
    assert cost_nano(small, price) == 255_000_000


def test_gpt_5_4_at_300k_with_200k_cached(book: PriceBook) -> None:
    # gpt-5.4 (the map has the entry itself) above 272k: input 5e-06, cache read 5e-07, output 2.25e-05
    price = priced(book, "openai", "gpt-5.4")
    usage = usage_from_openai({"prompt_tokens": 300_000, "completion_tokens": 5_000, "total_tokens": 305_000,
                               "prompt_tokens_details": {"cached_tokens": 200_000}})
    assert usage == Usage(input_tokens=300_000, output_tokens=5_000, cached_input_tokens=200_000)
    #   100_000 uncached × 5_000_000  = 500_000_000_000
    # + 200_000 cached   ×   500_000  = 100_000_000_000
    # +   5_000 output   × 22_500_000 = 112_500_000_000
    #                                 = 712_500_000_000 pico = 712_500_000 nano
    assert cost_nano(usage, price) == 712_500_000


def test_gpt_5_4_flex_at_300k_with_200k_cached(book: PriceBook) -> None:
    # gpt-5.4 at service_tier flex, above 272k: input 2.5e-06, cache read 2.5e-07, output 1.125e-05
    price = priced(book, "openai", "gpt-5.4")
    usage = usage_from_openai({"prompt_tokens": 300_000, "completion_tokens": 5_000,
                               "prompt_tokens_details": {"cached_tokens": 200_000}}, service_tier="flex")
    assert usage is not None and usage.service_tier == "flex"
    #   100_000 uncached × 2_500_000  = 250_000_000_000
    # + 200_000 cached   ×   250_000  =  50_000_000_000
    # +   5_000 output   × 11_250_000 =  56_250_000_000
    #                                 = 356_250_000_000 pico = 356_250_000 nano
    assert cost_nano(usage, price) == 356_250_000


# --- audio ---------------------------------------------------------------------------------------

def test_gpt_4o_audio_preview_2k_audio_in_1k_audio_out(book: PriceBook) -> None:
    # The bare alias gpt-4o-audio-preview is not in the map; its newest snapshot is:
    # gpt-4o-audio-preview-2025-06-03: input 2.5e-06, audio input 4e-05, output 1e-05, audio output 8e-05.
    assert book.lookup("openai", "gpt-4o-audio-preview") is None
    price = priced(book, "openai", "gpt-4o-audio-preview-2025-06-03")
    usage = usage_from_openai({
        "prompt_tokens": 2_100, "completion_tokens": 1_200, "total_tokens": 3_300,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 2_000, "text_tokens": 100},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 1_000, "text_tokens": 200}})
    assert usage == Usage(input_tokens=2_100, output_tokens=1_200, audio_input_tokens=2_000,
                          audio_output_tokens=1_000)
    #     100 text in   ×  2_500_000 =    250_000_000
    # + 2_000 audio in  × 40_000_000 = 80_000_000_000
    # +   200 text out  × 10_000_000 =  2_000_000_000
    # + 1_000 audio out × 80_000_000 = 80_000_000_000
    #                                = 162_250_000_000 pico = 162_250_000 nano
    assert cost_nano(usage, price) == 162_250_000


def test_gemini_2_5_flash_with_audio_input(book: PriceBook) -> None:
    # gemini/gemini-2.5-flash: input 3e-07, audio input 1e-06, cache read 3e-08, cached audio 1e-07,
    # output 2.5e-06, reasoning 2.5e-06
    price = priced(book, "gemini", "gemini-2.5-flash")
    usage = usage_from_openai({   # litellm's usage for a Gemini answer: thoughts inside completion_tokens
        "prompt_tokens": 10_000, "completion_tokens": 500, "total_tokens": 10_500,
        "prompt_tokens_details": {"audio_tokens": 8_000, "text_tokens": 2_000},
        "completion_tokens_details": {"reasoning_tokens": 300, "text_tokens": 200}})
    assert usage == Usage(input_tokens=10_000, output_tokens=500, reasoning_tokens=300, audio_input_tokens=8_000)
    #   2_000 text in  ×   300_000 =   600_000_000
    # + 8_000 audio in × 1_000_000 = 8_000_000_000
    # +   200 text out × 2_500_000 =   500_000_000
    # +   300 thoughts × 2_500_000 =   750_000_000
    #                              = 9_850_000_000 pico = 9_850_000 nano
    assert cost_nano(usage, price) == 9_850_000
    cached = usage_from_openai({
        "prompt_tokens": 10_000, "completion_tokens": 500,
        "prompt_tokens_details": {"audio_tokens": 8_000, "cached_tokens": 4_000,
                                  "cached_tokens_details": {"audio_tokens": 3_000, "text_tokens": 1_000}}})
    assert cached is not None and (cached.cached_input_tokens, cached.cached_audio_tokens) == (4_000, 3_000)
    #   1_000 cached text  ×    30_000 =        30_000_000
    # + 3_000 cached audio ×   100_000 =       300_000_000
    # + 5_000 fresh audio  × 1_000_000 =     5_000_000_000
    # + 1_000 fresh text   ×   300_000 =       300_000_000
    # +   500 output       × 2_500_000 =     1_250_000_000
    #                                  =     6_880_000_000 pico = 6_880_000 nano
    assert cost_nano(cached, price) == 6_880_000


# --- reasoning -----------------------------------------------------------------------------------

def test_qwen_plus_2025_04_28_with_2k_reasoning_tokens(book: PriceBook) -> None:
    # dashscope/qwen-plus-2025-04-28: input 4e-07, output 1.2e-06, reasoning 4e-06
    price = priced(book, "dashscope", "qwen-plus-2025-04-28")
    usage = usage_from_openai({"prompt_tokens": 1_000, "completion_tokens": 2_500, "total_tokens": 3_500,
                               "completion_tokens_details": {"reasoning_tokens": 2_000}})
    #   1_000 input     ×   400_000 =   400_000_000
    # +   500 text out  × 1_200_000 =   600_000_000
    # + 2_000 reasoning × 4_000_000 = 8_000_000_000
    #                               = 9_000_000_000 pico = 9_000_000 nano
    assert usage is not None and cost_nano(usage, price) == 9_000_000


def test_sonar_deep_research_with_2k_reasoning_tokens(book: PriceBook) -> None:
    # perplexity/sonar-deep-research: input 2e-06, citation 2e-06, output 8e-06, reasoning 3e-06.
    # Perplexity reports reasoning_tokens and citation_tokens at the top of usage; reasoning is part of
    # completion_tokens (total = prompt + completion), citations come beside the prompt.
    price = priced(book, "perplexity", "sonar-deep-research")
    usage = usage_from_openai({"prompt_tokens": 100, "completion_tokens": 3_000, "total_tokens": 3_100,
                               "citation_tokens": 5_000, "reasoning_tokens": 2_000, "num_search_queries": 3})
    assert usage == Usage(input_tokens=100, output_tokens=3_000, reasoning_tokens=2_000, citation_tokens=5_000)
    #     100 prompt    × 2_000_000 =    200_000_000
    # + 5_000 citations × 2_000_000 = 10_000_000_000
    # + 1_000 text out  × 8_000_000 =  8_000_000_000
    # + 2_000 reasoning × 3_000_000 =  6_000_000_000
    #                               = 24_200_000_000 pico = 24_200_000 nano (search fees not included)
    assert cost_nano(usage, price) == 24_200_000


def test_xai_reasoning_outside_completion_tokens(book: PriceBook) -> None:
    # xAI reports reasoning beside completion_tokens: total = prompt + completion + reasoning.
    # xai/grok-4.20-multi-agent-beta-0309: input 1.25e-06, output 2.5e-06; above 200k (from 200k itself
    # for xAI) input 2.5e-06, output 5e-06.
    price = priced(book, "xai", "grok-4.20-multi-agent-beta-0309")
    usage = usage_from_openai({"prompt_tokens": 1_000, "completion_tokens": 50, "total_tokens": 1_350,
                               "completion_tokens_details": {"reasoning_tokens": 300}})
    assert usage == Usage(input_tokens=1_000, output_tokens=350, reasoning_tokens=300)
    # 1_000 × 1_250_000 + 350 × 2_500_000 = 1_250_000_000 + 875_000_000 = 2_125_000_000 pico
    assert cost_nano(usage, price) == 2_125_000
    # exactly 200_000 prompt tokens is already the upper tier on xAI:
    # 200_000 × 2_500_000 + 350 × 5_000_000 = 500_000_000_000 + 1_750_000_000 = 501_750_000_000 pico
    assert cost_nano(Usage(input_tokens=200_000, output_tokens=350, reasoning_tokens=300), price) == 501_750_000


# --- DeepSeek cache fields on an OpenAI-compatible deployment -----------------------------------

def test_deepseek_chat_as_provider_openai(book: PriceBook) -> None:
    # deepseek-chat (found by its bare name for provider openai): input 2.8e-07, cache read 2.8e-08,
    # output 4.2e-07
    price = priced(book, "openai", "deepseek-chat")
    usage = usage_from_openai({"prompt_tokens": 10_000, "completion_tokens": 500, "total_tokens": 10_500,
                               "prompt_cache_hit_tokens": 8_000, "prompt_cache_miss_tokens": 2_000})
    assert usage == Usage(input_tokens=10_000, output_tokens=500, cached_input_tokens=8_000)
    #   2_000 misses × 280_000 = 560_000_000
    # + 8_000 hits   ×  28_000 = 224_000_000
    # +   500 output × 420_000 = 210_000_000
    #                          = 994_000_000 pico = 994_000 nano
    assert cost_nano(usage, price) == 994_000


# --- tier tables and off-peak hours --------------------------------------------------------------

def test_dashscope_tiered_pricing_table(book: PriceBook) -> None:
    # dashscope/qwen-flash tiered_pricing: (0, 256k] input 5e-08 output 4e-07; above 256k input 2.5e-07,
    # output 2e-06; all-or-nothing: every token at the tier the prompt falls in.
    price = priced(book, "dashscope", "qwen-flash")
    # 256_000 × 50_000 + 1_000 × 400_000 = 12_800_000_000 + 400_000_000 = 13_200_000_000 pico
    assert cost_nano(Usage(input_tokens=256_000, output_tokens=1_000), price) == 13_200_000
    # 300_000 × 250_000 + 1_000 × 2_000_000 = 75_000_000_000 + 2_000_000_000 = 77_000_000_000 pico
    assert cost_nano(Usage(input_tokens=300_000, output_tokens=1_000), price) == 77_000_000


def test_deepseek_off_peak_hours(book: PriceBook) -> None:
    # deepseek/deepseek-v4-flash: input 3e-07, cache read 6e-09, output 1.2e-06; off-peak input 1.5e-07,
    # cache read 3e-09, output 6e-07 on weekdays 00:00-01:00, 04:00-06:00, 10:00-24:00 UTC, all weekend.
    price = priced(book, "deepseek", "deepseek-v4-flash")
    usage = Usage(input_tokens=10_000, output_tokens=1_000, cached_input_tokens=6_000)
    # peak:     4_000 × 300_000 + 6_000 × 6_000 + 1_000 × 1_200_000
    #         = 1_200_000_000 + 36_000_000 + 1_200_000_000 = 2_436_000_000 pico
    # off-peak: 4_000 × 150_000 + 6_000 × 3_000 + 1_000 × 600_000
    #         =   600_000_000 + 18_000_000 +   600_000_000 = 1_218_000_000 pico
    wednesday_8am = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)
    wednesday_noon = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    saturday_8am = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)
    wednesday_1am = datetime(2026, 12, 2, 1, 0, tzinfo=UTC)     # the 00:00-01:00 window excludes its end
    assert cost_nano(usage, price, wednesday_8am) == 2_436_000
    assert cost_nano(usage, price, wednesday_1am) == 2_436_000
    assert cost_nano(usage, price, wednesday_noon) == 1_218_000
    assert cost_nano(usage, price, saturday_8am) == 1_218_000


def test_anthropic_one_hour_write_without_map_key_is_twice_input(book: PriceBook) -> None:
    # anthropic.claude-sonnet-4-20250514-v1:0 has no 1-hour key: 2 × 3e-06 = 6e-06 below 200k
    # (litellm would bill it at the 5-minute 3.75e-06; Anthropic bills 2x input for 1-hour writes).
    price = priced(book, "bedrock", "anthropic.claude-sonnet-4-20250514-v1:0")
    usage = Usage(input_tokens=1_000, cache_write_1h_tokens=1_000)
    # 1_000 × 6_000_000 = 6_000_000_000 pico
    assert cost_nano(usage, price) == 6_000_000


def test_text_only_shortcut_agrees_with_the_itemised_sum(book: PriceBook) -> None:
    # gemini/gemini-2.5-flash prices reasoning at the output price (2.5e-06), so the same request with
    # its reasoning tokens itemised (the full sum) and not (the text-only shortcut) must cost the same;
    # likewise audio at a price equal to the text one.
    import random
    rng = random.Random(16)
    flash = priced(book, "gemini", "gemini-2.5-flash")
    same_audio = Price(300_000, 2_500_000, 30_000, 300_000, 300_000, audio_input=300_000)
    for _ in range(500):
        cached, writes = rng.randrange(5_000), rng.randrange(2_000)
        prompt, output = cached + writes + rng.randrange(300_000), rng.randrange(5_000)
        text = Usage(input_tokens=prompt, output_tokens=output, cached_input_tokens=cached, cache_write_tokens=writes)
        thinking = Usage(input_tokens=prompt, output_tokens=output, cached_input_tokens=cached,
                         cache_write_tokens=writes, reasoning_tokens=rng.randrange(output + 1))
        assert cost_nano(thinking, flash) == cost_nano(text, flash)
        listening = Usage(input_tokens=prompt, output_tokens=output, cached_input_tokens=cached,
                          cache_write_tokens=writes, audio_input_tokens=rng.randrange(prompt + 1))
        assert cost_nano(listening, same_audio) == cost_nano(text, same_audio)
        assert cost_nano(listening, flash) >= cost_nano(text, flash)     # flash's audio costs more than text
