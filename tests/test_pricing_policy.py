"""Policy price overrides with the per-kind keys, and the worst-case rates a budget hold needs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.policy import load_policies
from gateway.policy.yamlsource import PolicyError
from gateway.pricing import Price, PriceBook, Usage, cost_nano, price_from_spec


def test_reasoning_and_audio_prices_in_a_policy(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text(textwrap.dedent("""\
        models:
          voice:
            deployments:
              - provider: openai
                model: my-voice-model
                price: {input_per_mtok: 2.5, output_per_mtok: 10, reasoning_per_mtok: 12,
                        audio_input_per_mtok: 40, audio_output_per_mtok: 80}
        """))
    spec = load_policies(str(tmp_path)).model("voice")
    assert spec is not None
    d = spec.deployments[0]
    assert d.price_source == "policy"
    # per million tokens → pico per token: 2.5 → 2_500_000, 10 → 10_000_000, 12 → 12_000_000,
    # 40 → 40_000_000, 80 → 80_000_000
    assert (d.price.input, d.price.output, d.price.reasoning, d.price.audio_input, d.price.audio_output) == (
        2_500_000, 10_000_000, 12_000_000, 40_000_000, 80_000_000)
    usage = Usage(input_tokens=1_100, output_tokens=900, reasoning_tokens=400, audio_input_tokens=1_000,
                  audio_output_tokens=300)
    #     100 text in   ×  2_500_000 =    250_000_000
    # + 1_000 audio in  × 40_000_000 = 40_000_000_000
    # +   200 text out  × 10_000_000 =  2_000_000_000
    # +   400 reasoning × 12_000_000 =  4_800_000_000
    # +   300 audio out × 80_000_000 = 24_000_000_000
    #                                = 71_050_000_000 pico = 71_050_000 nano
    assert cost_nano(usage, d.price) == 71_050_000


def test_unknown_and_bad_price_keys_are_policy_errors(tmp_path: Path) -> None:
    for price, needle in (("{input_per_mtok: 1, output_per_mtok: 2, video_per_mtok: 3}", "video_per_mtok"),
                          ("{input_per_mtok: 1, output_per_mtok: 2, reasoning_per_mtok: -1}", "reasoning_per_mtok")):
        (tmp_path / "models.yaml").write_text(textwrap.dedent(f"""\
            models:
              m:
                deployments:
                  - provider: openai
                    model: x
                    price: {price}
            """))
        with pytest.raises(PolicyError, match=needle):
            load_policies(str(tmp_path))
    with pytest.raises(ValueError, match="reasoning_per_mtok"):
        price_from_spec({"input_per_mtok": 1, "output_per_mtok": 2, "reasoning_per_mtok": "lots"})


def test_worst_case_rates_follow_the_tier_and_the_dearest_kind() -> None:
    book = PriceBook.bundled()
    # dashscope/qwen-plus-2025-04-28: output 1.2e-06 but reasoning 4e-06 → a hold must use 4_000_000
    qwen = book.lookup("dashscope", "qwen-plus-2025-04-28")
    assert qwen is not None and qwen.max_output_rate() == 4_000_000 and qwen.max_input_rate() == 400_000
    # deepseek/deepseek-v4-flash: off-peak is cheaper, so a hold uses the peak rates (3e-07, 1.2e-06)
    flash = book.lookup("deepseek", "deepseek-v4-flash")
    assert flash is not None and flash.hold_rates(1_000) == (300_000, 1_200_000)
    # gpt-5.4: input 2.5e-06 up to 272k prompt tokens, 5e-06 above; output 1.5e-05 / 2.25e-05
    gpt = book.lookup("openai", "gpt-5.4")
    assert gpt is not None
    assert (gpt.at(272_000).max_input_rate(), gpt.at(272_000).max_output_rate()) == (2_500_000, 15_000_000)
    assert (gpt.at(272_001).max_input_rate(), gpt.at(272_001).max_output_rate()) == (5_000_000, 22_500_000)
    assert gpt.hold_rates(272_000) == (2_500_000, 15_000_000)
    assert gpt.hold_rates(272_001) == (5_000_000, 22_500_000)
    # at priority (input 5e-06, output 3e-05 below 272k) and flex (1.25e-06, 7.5e-06); "default" is standard
    assert gpt.hold_rates(1_000, "priority") == (5_000_000, 30_000_000)
    assert gpt.hold_rates(1_000, "flex") == (1_250_000, 7_500_000)
    assert gpt.hold_rates(1_000, "default") == gpt.hold_rates(1_000) == (2_500_000, 15_000_000)
    # gpt-5.4 has no priority long-context prices: above 272k the long-context ones (5e-06, 2.25e-05)
    # stand, as litellm reads the map; the dearest rates anywhere are priority's 5e-06 in, 3e-05 out
    assert gpt.hold_rates(300_000, "priority") == (5_000_000, 22_500_000)
    worst = gpt.worst()
    assert (worst.max_input_rate(), worst.max_output_rate()) == (5_000_000, 30_000_000)
    # claude-sonnet-4-5: the 1-hour cache write (6e-06) is the dearest way to send a prompt token
    claude = book.lookup("anthropic", "claude-sonnet-4-5")
    assert claude is not None and claude.max_input_rate() == 6_000_000
    # a flat price is its own worst case
    flat = Price(1, 2, 1, 1, 1)
    assert flat.worst() is flat and flat.at(10**9) is flat
