"""Savings accounting, priced by hand: how a request's cost splits into routing, prompt_cache,
compression and cache savings (integers in nano-USD), and the counter's debt rule."""

from __future__ import annotations

from gateway.metrics import Metrics
from gateway.pricing import Price, Usage
from gateway.savings.accounting import SavingsMeter, account, hit_accounting

# pico-USD per token: $3 in, $15 out, $0.30 cache read, $3.75 5-minute write, $6 1-hour write per Mtok
SONNET = Price(input=3_000_000, output=15_000_000, cache_read=300_000, cache_write=3_750_000,
               cache_write_1h=6_000_000)
CHEAP = Price(input=150_000, output=600_000, cache_read=75_000, cache_write=150_000, cache_write_1h=150_000)


def test_prompt_cache_reads_and_writes_against_the_uncached_price() -> None:
    # 5000 prompt tokens: 1000 uncached, 3000 read, 600 written (5 min), 400 written (1 h); 200 out
    usage = Usage(input_tokens=5000, output_tokens=200, cached_input_tokens=3000, cache_write_tokens=600,
                  cache_write_1h_tokens=400)
    a = account(usage, SONNET, SONNET)
    # 1000*3000 + 3000*300 + 600*3750 + 400*6000 + 200*15000 nano = 3.0M + 0.9M + 2.25M + 2.4M + 3.0M
    assert a.cost_nano == 11_550_000
    assert a.baseline_nano == 5000 * 3000 + 200 * 15000 == 18_000_000
    assert a.savings == {"prompt_cache": 6_450_000}
    writes_only = Usage(input_tokens=2000, output_tokens=0, cache_write_tokens=2000)
    assert account(writes_only, SONNET, SONNET).savings == {"prompt_cache": 6_000_000 - 7_500_000}


def test_routing_compression_and_prompt_cache_add_up_to_baseline_minus_cost() -> None:
    # routed to the cheap deployment, 1000 prompt tokens sent (400 of them cache reads) after
    # compression removed 3000; 100 out
    usage = Usage(input_tokens=1000, output_tokens=100, cached_input_tokens=400)
    a = account(usage, CHEAP, SONNET, removed_tokens=3000)
    b0 = 4000 * 3000 + 100 * 15000                 # uncompressed, uncached, at the requested model: 13.5M
    b1 = 1000 * 3000 + 100 * 15000                 # compressed, uncached, requested model: 4.5M
    b2 = 1000 * 150 + 100 * 600                    # compressed, uncached, cheap deployment: 210,000
    cost = 600 * 150 + 400 * 75 + 100 * 600        # what was charged: 180,000
    assert (a.baseline_nano, a.cost_nano) == (b0, cost) == (13_500_000, 180_000)
    assert a.savings == {"compression": b0 - b1, "routing": b1 - b2, "prompt_cache": b2 - cost}
    assert sum(a.savings.values()) == a.baseline_nano - a.cost_nano


def test_rounding_happens_once_per_price_point() -> None:
    # 7 uncached x 150 pico + 3 read x 15 pico = 1095 pico -> 1 nano; all 10 uncached = 1500 pico -> 2 nano
    price = Price(input=150, output=0, cache_read=15, cache_write=150, cache_write_1h=150)
    a = account(Usage(input_tokens=10, output_tokens=0, cached_input_tokens=3), price, price)
    assert (a.cost_nano, a.baseline_nano, a.savings) == (1, 2, {"prompt_cache": 1})


def test_summary_calls_and_hits() -> None:
    summary = account(Usage(input_tokens=800, output_tokens=50), CHEAP, CHEAP, overhead=True)
    assert (summary.cost_nano, summary.baseline_nano) == (800 * 150 + 50 * 600, 0)
    assert summary.savings == {"compression": -150_000}
    hit = hit_accounting(1200, 80, SONNET)
    assert (hit.cost_nano, hit.baseline_nano, hit.savings) == (0, 4_800_000, {"cache": 4_800_000})
    assert hit_accounting(0, 0, SONNET).savings == {}


def test_meter_carries_negative_savings_as_debt() -> None:
    metrics = Metrics()
    meter = SavingsMeter(metrics)

    def counter() -> float:
        return float(metrics.savings.labels("t", "prompt_cache")._value.get())

    meter.add("t", {"prompt_cache": -1_000})
    assert counter() == 0 and meter.debt("t", "prompt_cache") == 1_000
    meter.add("t", {"prompt_cache": 600})
    assert counter() == 0 and meter.debt("t", "prompt_cache") == 400
    meter.add("t", {"prompt_cache": 1_400, "cache": 5})
    assert round(counter() * 1e9) == 1_000 and meter.debt("t", "prompt_cache") == 0
    assert round(metrics.savings.labels("t", "cache")._value.get() * 1e9) == 5
