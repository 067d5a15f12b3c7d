"""A deployment's price and the arithmetic that turns one request's usage into money.

This module owns :class:`Price` (integer pico-USD per token: text input and
output, cache reads and both cache-write tiers, and where the provider prices
them apart, reasoning, audio, image, video and citation tokens; long-context
tiers chosen by the request's prompt size; DeepSeek-style off-peak rates chosen
by the time of the request; flex/priority service-tier prices chosen by the tier
the upstream reports) and :func:`cost_pico`/:func:`cost_nano`: the exact
pico-USD cost of a request, rounded half-up once to nano-USD. Where a price has
no rate of its own for a kind of token (``None``), that token costs the text rate
of the same tier: audio input as input, reasoning as output, and so on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ClassVar

from gateway.money import pico_to_nano
from gateway.offpeak import OffPeak
from gateway.usage import SERVICE_TIERS, Usage


@dataclass(frozen=True, slots=True)
class Price:
    """Integer pico-USD (1e-12 USD) per token.

    ``tiers`` are the long-context prices, ascending by threshold: the last one
    whose threshold the request's prompt (every prompt token, cached ones
    included) exceeds prices every token of the request; at or above it when
    ``inclusive_tiers`` (xAI bills the higher tier from the threshold itself).
    ``off_peak`` is the price while an off-peak window is open.
    """

    input: int
    output: int
    cache_read: int
    cache_write: int
    cache_write_1h: int
    reasoning: int | None = None
    audio_input: int | None = None
    audio_output: int | None = None
    audio_cache_read: int | None = None
    image_input: int | None = None
    image_output: int | None = None
    image_cache_read: int | None = None
    video_input: int | None = None
    video_output: int | None = None
    citation: int | None = None
    tiers: tuple[tuple[int, Price], ...] = ()
    inclusive_tiers: bool = False
    off_peak: tuple[OffPeak, Price] | None = None   # (schedule, price while it is open); drops tiers
    service_tiers: tuple[tuple[str, Price], ...] = ()   # (flex/priority/..., the price at that tier)
    # (dearest prompt-token rate, dearest completion-token rate) of these flat rates: made once, read per hold
    max_rates: tuple[int, int] = field(init=False, repr=False, compare=False)
    ZERO: ClassVar[Price]

    def __post_init__(self) -> None:
        prompt = (self.input, self.cache_write, self.cache_write_1h, self.audio_input, self.image_input,
                  self.video_input)
        completion = (self.output, self.reasoning, self.audio_output, self.image_output, self.video_output)
        object.__setattr__(self, "max_rates", (max(r for r in prompt if r is not None),
                                               max(r for r in completion if r is not None)))

    def at(self, prompt_tokens: int) -> Price:
        """The rates (this price's own, or one of its tiers') that bill a request of ``prompt_tokens``."""
        chosen = self
        for threshold, tier in self.tiers:
            if prompt_tokens > threshold or (self.inclusive_tiers and prompt_tokens == threshold):
                chosen = tier
        return chosen

    def served_at(self, tier: str | None) -> Price:
        """The price at service tier ``tier`` (flex, priority, ...); the standard one when it has none."""
        if tier is not None:
            for name, price in self.service_tiers:
                if name == tier:
                    return price
        return self

    def when(self, moment: datetime | None) -> Price:
        """The price at ``moment`` (UTC; now when None): the off-peak price inside its windows."""
        if self.off_peak is None:
            return self
        windows, cheaper = self.off_peak
        return cheaper if windows.open_at(moment or datetime.now(UTC)) else self

    def max_input_rate(self) -> int:
        """The dearest rate any prompt token of this flat price can cost (a worst-case hold)."""
        return self.max_rates[0]

    def max_output_rate(self) -> int:
        """The dearest rate any completion token of this flat price can cost (a worst-case hold)."""
        return self.max_rates[1]

    def hold_rates(self, prompt_tokens: int, service_tier: object = None) -> tuple[int, int]:
        """(input, output) pico-USD per token a worst-case hold should use for a request of
        ``prompt_tokens`` asking for ``service_tier`` (a request body's value, e.g. "priority"): the
        tier the prompt selects, the dearest kind of token, peak or off-peak, whichever is dearer."""
        if not self.tiers and self.off_peak is None and (service_tier is None or not self.service_tiers):
            return self.max_rates      # a flat price (the common case)
        base = self.served_at(SERVICE_TIERS.get(service_tier) if isinstance(service_tier, str) else None)
        options = [base.at(prompt_tokens)]
        if base.off_peak is not None:
            options.append(base.off_peak[1].at(prompt_tokens))
        return max(p.max_input_rate() for p in options), max(p.max_output_rate() for p in options)

    def worst(self) -> Price:
        """The dearest of all this price's rates (every tier, off-peak and service-tier variant), by
        input and then output rate."""
        candidates: list[Price] = []
        for variant in (self, *(p for _, p in self.service_tiers)):
            candidates += [variant.at(0), *(t for _, t in variant.tiers)]
            if variant.off_peak is not None:
                candidates.append(variant.off_peak[1])
        return max(candidates, key=lambda p: (p.max_input_rate(), p.max_output_rate()))


Price.ZERO = FREE = Price(0, 0, 0, 0, 0)


def _rate(specific: int | None, fallback: int) -> int:
    return fallback if specific is None else specific


def cost_pico(usage: Usage, price: Price, when: datetime | None = None) -> int:
    """The exact cost of ``usage`` in pico-USD at the tier its prompt size selects."""
    if usage.service_tier is not None and price.service_tiers:
        price = price.served_at(usage.service_tier)
    p = price.when(when).at(usage.input_tokens) if (price.off_peak or price.tiers) else price
    if not (usage.audio_input_tokens or usage.image_input_tokens or usage.video_input_tokens
            or usage.audio_output_tokens or usage.image_output_tokens or usage.citation_tokens
            or (usage.reasoning_tokens and p.reasoning is not None)):     # text only: the hot path
        return (usage.uncached_input_tokens * p.input + usage.cached_input_tokens * p.cache_read
                + usage.cache_write_tokens * p.cache_write + usage.cache_write_1h_tokens * p.cache_write_1h
                + usage.output_tokens * p.output)
    cached = usage.cached_input_tokens
    cached_audio = min(usage.cached_audio_tokens, cached)
    cached_image = min(usage.cached_image_tokens, cached - cached_audio)
    fresh = usage.uncached_input_tokens
    audio = min(max(0, usage.audio_input_tokens - cached_audio), fresh)
    image = min(max(0, usage.image_input_tokens - cached_image), fresh - audio)
    video = min(usage.video_input_tokens, fresh - audio - image)
    reasoning = min(usage.reasoning_tokens, usage.output_tokens)
    audio_out = min(usage.audio_output_tokens, usage.output_tokens - reasoning)
    image_out = min(usage.image_output_tokens, usage.output_tokens - reasoning - audio_out)
    text_out = usage.output_tokens - reasoning - audio_out - image_out
    return ((fresh - audio - image - video) * p.input
            + audio * _rate(p.audio_input, p.input)
            + image * _rate(p.image_input, p.input)
            + video * _rate(p.video_input, p.input)
            + (cached - cached_audio - cached_image) * p.cache_read
            + cached_audio * _rate(p.audio_cache_read, p.cache_read)
            + cached_image * _rate(p.image_cache_read, p.cache_read)
            + usage.cache_write_tokens * p.cache_write
            + usage.cache_write_1h_tokens * p.cache_write_1h
            + usage.citation_tokens * _rate(p.citation, p.input)
            + text_out * p.output
            + reasoning * _rate(p.reasoning, p.output)
            + audio_out * _rate(p.audio_output, p.output)
            + image_out * _rate(p.image_output, p.output))


def cost_nano(usage: Usage, price: Price, when: datetime | None = None) -> int:
    """The request's cost in nano-USD: exact pico cost, rounded half-up once."""
    return pico_to_nano(cost_pico(usage, price, when))
