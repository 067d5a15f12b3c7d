"""Baseline cost and savings: how one request's price splits into what each lever saved.

The baseline is what the requested model's first (baseline) deployment would have charged for the
*uncompressed* prompt with no provider prompt caching, no cache hit and no routing change. From
the baseline down to the actual cost, each step is priced once, exactly, in nano-USD:

    B0 = uncompressed prompt, uncached, baseline deployment        (the baseline)
    B1 = sent (compressed) prompt, uncached, baseline deployment   compression  = B0 - B1
    B2 = sent prompt, uncached, deployment actually used           routing      = B1 - B2
    A  = sent prompt with its cache reads/writes, that deployment  prompt_cache = B2 - A

so every record's savings add up to exactly ``baseline - cost``. A summary call made for
compression is a record of its own with a baseline of 0 (it would not exist without compression)
and a ``compression`` saving of minus its cost, so a team's ``compression`` total is what
compression removed minus what its summaries cost. A prompt-cache write costs more than an
uncached read, so ``prompt_cache`` is negative on a request that only writes the cache. A
response-cache hit costs 0 and saves its whole baseline (``cache``).

:class:`SavingsMeter` feeds ``gateway_savings_usd_total``, which as a counter can only grow: a
negative saving is carried per team and source as a debt that later savings of that source pay
off before the counter moves. So the counter equals the ledger's net sum whenever that net has
been non-negative since the process started, and never goes backwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.pricing import Price, Usage, cost_nano

SOURCES = ("routing", "cache", "compression", "prompt_cache")


@dataclass(slots=True)
class Accounting:   # a value: never changed once made (not frozen: a frozen one costs ~3x to make)
    cost_nano: int
    baseline_nano: int
    savings: dict[str, int]


def uncached(usage: Usage, input_tokens: int | None = None) -> Usage:
    """The same usage with every prompt token priced as plain input (optionally another prompt size)."""
    return usage.uncached(input_tokens)


def account(usage: Usage, price: Price, baseline: Price, *, removed_tokens: int = 0,
            overhead: bool = False) -> Accounting:
    """Cost, baseline and savings of one priced request (see the module docstring for the steps).

    ``removed_tokens``: prompt tokens compression took out; ``overhead``: this request is a
    compression's summary call."""
    actual = cost_nano(usage, price)
    if overhead:
        return Accounting(actual, 0, {"compression": -actual} if actual else {})
    cached = usage.cached_input_tokens or usage.cache_write_tokens or usage.cache_write_1h_tokens
    plain = uncached(usage) if cached else usage
    b2 = cost_nano(plain, price) if cached else actual
    b1 = b2 if baseline is price else cost_nano(plain, baseline)
    b0 = cost_nano(uncached(usage, usage.input_tokens + removed_tokens), baseline) if removed_tokens > 0 else b1
    savings: dict[str, int] = {}
    if b1 != b2:
        savings["routing"] = b1 - b2
    if b2 != actual:
        savings["prompt_cache"] = b2 - actual
    if b0 != b1:
        savings["compression"] = b0 - b1
    return Accounting(actual, b0, savings)


def hit_accounting(input_tokens: int, output_tokens: int, baseline: Price) -> Accounting:
    """A response-cache hit: free, and it saves what the answer would have cost uncached."""
    b0 = cost_nano(Usage(input_tokens=input_tokens, output_tokens=output_tokens), baseline)
    return Accounting(0, b0, {"cache": b0} if b0 else {})


class SavingsMeter:
    """Adds savings to the ``gateway_savings_usd_total`` counter through the metrics' ``saved`` event,
    which carries negative ones as debt (see :meth:`gateway.metrics.Metrics.saved`)."""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics

    def add(self, team: str, savings: dict[str, int]) -> None:
        for source, nano in savings.items():
            self.metrics.saved(team, source, nano)

    def debt(self, team: str, source: str) -> int:
        return int(self.metrics.savings_debt(team, source))
