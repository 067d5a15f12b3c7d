"""Every Prometheus metric the gateway exports, defined once, and how they are rendered.

Names follow the product contract (prefix ``gateway_``, base units, ``_total``
counters). Counters and histograms are updated on the request path only through
named events on :class:`Metrics` (:meth:`~Metrics.request_done`, :meth:`~Metrics.refused`,
:meth:`~Metrics.budget_refused`, :meth:`~Metrics.upstream_failed`, ...), so label order
and label bounding live here and nowhere else. Finished requests are tallied as plain numbers
and added to the series at each scrape, or within :data:`FLUSH_S` by a timer (:meth:`Metrics.flush`);
with several workers the series live in prometheus-client's multiprocess files
(``PROMETHEUS_MULTIPROC_DIR``, prepared fresh by ``gateway serve``), so a scrape of any worker
returns the sum over all of them.
Gauges describe shared state, not one process (budget limit, spend and soft
limit from the budget store, deployment health from the pipeline): they are
read when ``/metrics`` is scraped and rendered from a per-scrape registry,
never from the multiprocess files, so no worker's stale value can win. Label
values are bounded: model and team names not in the loaded policies become
``other`` (teams past a generous cap), error codes are capped the same way.
"""

from __future__ import annotations

import asyncio
import glob
import os
import re
import shutil
import tempfile
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from gateway.state.ledger import LedgerRecord

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Request, upstream and first-token latency: 0.1 ms up to 10-minute generations.
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Time in the gateway itself: resolves tens of microseconds around the 0.3 ms target.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.002, 0.005,
                    0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
TOKEN_TYPES = ("input", "output", "cached_input", "cache_write", "reasoning")
OTHER = "other"
MAX_RAW_COMBINATIONS = 10_000   # distinct raw (unbounded) label values remembered on the way to a tally
FLUSH_S = 0.5              # the longest a finished request waits to reach the exported series
EXTRA_TEAMS = 200          # teams outside the policies (named by keys) that still get their own label
EXTRA_CODES = 32           # status/error codes beyond the known ones that still get their own label
KNOWN_CODES = frozenset({
    "ok", "error", "client_closed", "internal_error", "invalid_request", "invalid_json", "missing_field",
    "invalid_type", "unsupported_content", "unsupported_capability", "unsupported_parameter",
    "context_length_exceeded", "request_too_large", "model_not_found", "model_not_allowed",
    "invalid_api_key", "rate_limit_exceeded", "budget_exceeded", "upstream_error", "upstream_timeout",
    "upstream_rejected", "content_policy_violation", "service_unavailable", "state_unavailable",
    "no_deployment",
})
_LABEL_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}")


class BoundedValues:
    """A label's values: the preset ones, then the first ``extra`` distinct well-formed others; the rest
    (and anything malformed or too long) become ``other``."""

    def __init__(self, extra: int, preset: Iterable[str] = ()) -> None:
        self._extra = extra
        self._preset: frozenset[str] = frozenset(preset)
        self._seen: set[str] = set()

    def preset(self, values: Iterable[str]) -> None:
        self._preset = frozenset(values)

    def __call__(self, value: str | None) -> str:
        if value is None:
            return OTHER
        if value in self._preset or value in self._seen:
            return value
        if len(self._seen) < self._extra and _LABEL_VALUE.fullmatch(value):
            self._seen.add(value)
            return value
        return OTHER


@dataclass(frozen=True, slots=True)
class BudgetGauge:
    """One team budget as the budget store reports it at scrape time (nano-USD)."""

    team: str
    period: str
    limit_nano: int
    spent_nano: int
    soft_limit_nano: int


class _Observations:
    """Observations of one histogram child not yet added to it: a count per bucket and their sum."""

    __slots__ = ("child", "bounds", "counts", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds: list[float] = child._upper_bounds       # ends with +Inf, as prometheus-client keeps it
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1    # the first bucket whose bound is >= value
        self.total += value

    def flush(self) -> None:
        counts, buckets = self.counts, self.child._buckets
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)
                counts[i] = 0
        self.child._sum.inc(self.total)
        self.total = 0.0


class RequestTally:
    """What finished requests of one (team, model, provider, route, status, cache, stream) added since the
    last flush, as plain numbers: a request costs a few additions here instead of a dozen locked updates of
    prometheus-client values. :meth:`flush` adds them to the labelled children: the request counter and
    duration histograms; upstream and first-token latency, tokens by kind and cost on first use (so no
    empty series appear)."""

    __slots__ = ("requests", "overhead", "duration", "upstream", "ttft", "input", "output", "cached_input",
                 "cache_write", "reasoning", "cost_nano", "dirty", "_requests", "_metrics", "_labels")

    def __init__(self, m: Metrics, team: str, model: str, provider: str, route: str, status: str, cache: str,
                 stream: bool) -> None:
        self._requests = m.child(m.requests, team, model, provider, route, status, cache)
        self.requests = 0
        self.overhead = _Observations(m.child(m.overhead, route))
        self.duration = _Observations(m.child(m.request_duration, team, model, provider,
                                              "true" if stream else "false"))
        self.upstream: _Observations | None = None
        self.ttft: _Observations | None = None
        self.input = self.output = self.cached_input = self.cache_write = self.reasoning = 0   # TOKEN_TYPES
        self.cost_nano = 0
        self.dirty = False
        self._metrics = m
        self._labels = (team, model, provider)

    def observe_upstream(self, seconds: float) -> None:
        if self.upstream is None:
            m, (_, model, provider) = self._metrics, self._labels
            self.upstream = _Observations(m.child(m.upstream_duration, model, provider))
        self.upstream.observe(seconds)

    def observe_ttft(self, seconds: float) -> None:
        if self.ttft is None:
            m, (_, model, provider) = self._metrics, self._labels
            self.ttft = _Observations(m.child(m.ttft, model, provider))
        self.ttft.observe(seconds)

    def flush(self) -> None:
        """Add what was tallied to the prometheus-client children, and start again from zero."""
        self.dirty = False
        m, (team, model, provider) = self._metrics, self._labels
        self._requests.inc(self.requests)
        self.requests = 0
        for observations in (self.overhead, self.duration, self.upstream, self.ttft):
            if observations is not None:
                observations.flush()
        for kind in TOKEN_TYPES:
            n = getattr(self, kind)
            if n:
                m.child(m.tokens, team, model, provider, kind).inc(n)
                setattr(self, kind, 0)
        if self.cost_nano:
            m.child(m.cost, team, model, provider).inc(self.cost_nano / 1e9)
            self.cost_nano = 0


class Metrics:
    def __init__(self, multiproc_dir: str | None = None) -> None:
        """``multiproc_dir``: render the sum over every worker's files in it (several workers)."""
        self.multiproc_dir = multiproc_dir
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gateway_requests", "Proxied requests.",
                                ["team", "model", "provider", "route", "status", "cache"], registry=r)
        self.tokens = Counter("gateway_tokens", "Tokens by type.",
                              ["team", "model", "provider", "type"], registry=r)
        self.cost = Counter("gateway_cost_usd", "Spend in USD.", ["team", "model", "provider"], registry=r)
        self.savings = Counter("gateway_savings_usd", "Savings in USD by source.", ["team", "source"],
                               registry=r)
        self.request_duration = Histogram(
            "gateway_request_duration_seconds", "Time from request to last byte.",
            ["team", "model", "provider", "stream"], buckets=DURATION_BUCKETS, registry=r)
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds", "Time spent waiting on the upstream.",
            ["model", "provider"], buckets=DURATION_BUCKETS, registry=r)
        self.ttft = Histogram("gateway_time_to_first_token_seconds", "Time to the first streamed token.",
                              ["model", "provider"], buckets=DURATION_BUCKETS, registry=r)
        self.overhead = Histogram("gateway_overhead_seconds", "Time spent in the gateway itself.",
                                  ["route"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.budget_rejections = Counter("gateway_budget_rejections", "Requests refused by a budget.",
                                         ["team"], registry=r)
        self.rate_limited = Counter("gateway_rate_limited", "Requests refused by a rate limit.",
                                    ["team"], registry=r)
        self.cache_requests = Counter("gateway_cache_requests", "Response cache lookups.",
                                      ["team", "result"], registry=r)
        self.compression_saved = Counter("gateway_compression_tokens_saved", "Tokens removed by compression.",
                                         ["team", "strategy"], registry=r)
        self.fallbacks = Counter("gateway_fallbacks", "Fallbacks to another deployment.",
                                 ["from_model", "to_model", "reason"], registry=r)
        self.upstream_errors = Counter("gateway_upstream_errors", "Upstream failures.",
                                       ["provider", "model", "error"], registry=r)
        self.budget_overrun = Counter(
            "gateway_budget_overrun_usd", "What requests cost beyond the hold they were admitted with (the upstream "
            "billed more than the worst case the gateway estimated); settled in full, so later requests see it.",
            ["team"], registry=r)
        self.token_counts = Counter("gateway_token_counts", "Token-count requests (never charged), by who counted.",
                                    ["team", "source"], registry=r)
        self.cost_drift_usd = Counter(
            "gateway_cost_drift_usd", "Absolute difference between the gateway's price of a request and the "
            "cost the upstream reported for it (OpenRouter, litellm, xAI).", ["provider", "model"], registry=r)
        self.budget_notifications = Counter(
            "gateway_budget_notifications", "Budget threshold notifications: claimed (this process sends it), "
            "delivered, failed (an attempt; retried), dropped.", ["scope", "result"], registry=r)
        self._known_models: frozenset[str] = frozenset()
        self.team_label = BoundedValues(EXTRA_TEAMS)
        self.code_label = BoundedValues(EXTRA_CODES, KNOWN_CODES)
        self.provider_label = BoundedValues(EXTRA_CODES)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._requests: dict[tuple[str, str, str, str, str, str, bool], RequestTally] = {}
        self._by_raw: dict[tuple[str, str, str, str, str, str, bool], RequestTally] = {}   # unbounded values
        self._dirty: list[RequestTally] = []        # tallies holding requests not yet flushed
        self._flush_loop: asyncio.AbstractEventLoop | None = None   # where the next flush is scheduled
        self._debt: dict[tuple[str, str], int] = {}   # negative savings carried forward, nano-USD

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, memoised: label lookups are the costly part on the hot path."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def for_request(self, team: str, model: str, provider: str, route: str, status: str, cache: str,
                    stream: bool) -> RequestTally:
        """The tally one finished request adds to, one per label combination."""
        key = (team, model, provider, route, status, cache, stream)
        found = self._requests.get(key)
        if found is None:
            found = self._requests[key] = RequestTally(self, team, model, provider, route, status, cache, stream)
        return found

    def flush(self) -> None:
        """Add every tally to the exported series (a scrape does this first; so does a timer, within
        :data:`FLUSH_S` of a request, for the other workers' scrapes; and the shutdown)."""
        self._flush_loop = None
        dirty, self._dirty = self._dirty, []
        for tally in dirty:
            tally.flush()

    def _flush_soon(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:          # no event loop (a script, a test): at once
            self.flush()
            return
        if self._flush_loop is not loop:
            self._flush_loop = loop
            loop.call_later(FLUSH_S, self.flush)

    # ------------------------------------------------------------------ named events
    def request_done(self, r: LedgerRecord, upstream_s: float, cache_looked_up: bool,
                     compressed: tuple[tuple[str, int], ...] = ()) -> None:
        """A request finished (served, failed or refused after routing): every per-request series, from its
        ledger record, the time it waited on upstreams, whether the response cache was asked, and the tokens
        compression removed by strategy."""
        served = bool(r.deployment)
        raw = (r.team, r.model if served else r.requested_model, r.provider, r.route, r.status, r.cache, r.stream)
        c = self._by_raw.get(raw)
        if c is None:   # a new combination of values: bounded into labels once
            c = self.for_request(self.team_label(r.team), self.model_label(raw[1]), r.provider or "none", r.route,
                                 self.code_label(r.status), r.cache, r.stream)
            if len(self._by_raw) < MAX_RAW_COMBINATIONS:
                self._by_raw[raw] = c
        c.requests += 1
        if cache_looked_up:
            self.child(self.cache_requests, self.team_label(r.team), r.cache).inc()
        for strategy, tokens in compressed:
            self.child(self.compression_saved, self.team_label(r.team), strategy).inc(tokens)
        duration = r.latency_ms / 1000
        c.overhead.observe(max(0.0, duration - upstream_s))
        c.duration.observe(duration)
        if r.savings:
            team = self.team_label(r.team)
            for source, nano in r.savings.items():
                self.saved(team, source, nano)
        if served and r.cache != "hit":
            c.observe_upstream(upstream_s)
            if r.ttft_ms is not None:
                c.observe_ttft(r.ttft_ms / 1000)
        c.input += r.input_tokens
        c.output += r.output_tokens
        c.cached_input += r.cached_input_tokens
        c.cache_write += r.cache_write_tokens
        c.reasoning += r.reasoning_tokens
        c.cost_nano += r.cost_nano
        if not c.dirty:
            c.dirty = True
            self._dirty.append(c)
        if self._flush_loop is None:
            self._flush_soon()

    def refused(self, team: str | None, model: str | None, status: str) -> None:
        """A request refused before any plan was made (bad JSON, bad key, unknown model, ...)."""
        self.child(self.requests, self.team_label(team) if team is not None else "none",
                   self.model_label(model) if model is not None else OTHER, "none", "none",
                   self.code_label(status), "bypass").inc()

    def overran(self, team: str, nano: int) -> None:
        """A request cost ``nano`` more than its hold."""
        self.child(self.budget_overrun, self.team_label(team)).inc(nano / 1e9)

    def tokens_counted(self, team: str, source: str) -> None:
        """A token-count request answered, by the upstream or by the gateway's estimate."""
        self.child(self.token_counts, self.team_label(team), source).inc()

    def budget_notified(self, scope: str, result: str) -> None:
        """A budget notification claimed, delivered, failed (one attempt) or dropped; ``scope`` is bounded."""
        self.child(self.budget_notifications, scope if scope in ("team", "key", "user", "tag", "session") else "other",
                   result).inc()

    def budget_refused(self, team: str) -> None:
        self.child(self.budget_rejections, self.team_label(team)).inc()

    def rate_limit_refused(self, team: str) -> None:
        self.child(self.rate_limited, self.team_label(team)).inc()

    def upstream_failed(self, provider: str, model: str, failure: str) -> None:
        self.child(self.upstream_errors, provider, self.model_label(model), failure).inc()

    def fell_back(self, from_model: str, to_model: str, reason: str) -> None:
        self.child(self.fallbacks, self.model_label(from_model), self.model_label(to_model), reason).inc()

    def saved(self, team: str, source: str, nano: int) -> None:
        """Savings of one request from one source; negative ones are carried as debt against later ones
        (a counter only grows), so the counter's total equals the ledger's positive net."""
        key = (team, source)
        debt = self._debt.get(key, 0)
        if nano < 0:
            self._debt[key] = debt - nano
            return
        paid = min(debt, nano)
        if paid:
            self._debt[key] = debt - paid
        if nano > paid:
            self.child(self.savings, team, source).inc((nano - paid) / 1e9)

    def savings_debt(self, team: str, source: str) -> int:
        return self._debt.get((team, source), 0)

    def cost_drift(self, provider: str, model: str, ours_nano: int, upstream_nano: int | None) -> int:
        """Count how far the gateway's cost of a request is from the upstream's own (nano-USD, either
        way) when the upstream reported one; returns that difference (0 when none or equal)."""
        if upstream_nano is None or upstream_nano == ours_nano:
            return 0
        drift = abs(ours_nano - upstream_nano)
        self.child(self.cost_drift_usd, self.provider_label(provider), self.model_label(model)).inc(drift / 1e9)
        return drift

    def set_known_models(self, names: Iterable[str]) -> None:
        self._known_models = frozenset(names)
        self._by_raw.clear()

    def set_known_teams(self, names: Iterable[str]) -> None:
        self.team_label.preset(names)
        self._by_raw.clear()

    def model_label(self, name: str) -> str:
        return name if name in self._known_models else OTHER

    def render(self, budgets: Iterable[BudgetGauge] = (),
               health: Mapping[tuple[str, str, str], bool] | None = None) -> bytes:
        """The exposition text: counters and histograms (every worker's, summed, in multiprocess
        mode), then the state gauges from this scrape's readings."""
        self.flush()
        if self.multiproc_dir is not None:
            merged = CollectorRegistry()
            MultiProcessCollector(merged, path=self.multiproc_dir)
            text = generate_latest(merged)
        else:
            text = generate_latest(self.registry)
        scrape = CollectorRegistry()
        scrape.register(_StateGauges(list(budgets), self._health_by_model(health or {})))
        return text + generate_latest(scrape)

    def _health_by_model(self, health: Mapping[tuple[str, str, str], bool]) -> dict[tuple[str, str], int]:
        """Per (model, provider), as SPEC labels it: 1 when every deployment there is healthy, else 0."""
        out: dict[tuple[str, str], int] = {}
        for (model, provider, _deployment), healthy in health.items():
            key = (self.model_label(model), provider)
            out[key] = min(out.get(key, 1), 1 if healthy else 0)
        return out


class _StateGauges:
    """A collector for one scrape: the budget gauges and deployment health it was handed."""

    def __init__(self, budgets: list[BudgetGauge], health: dict[tuple[str, str], int]) -> None:
        self.budgets, self.health = budgets, health

    def collect(self) -> Iterator[GaugeMetricFamily]:
        limit = GaugeMetricFamily("gateway_budget_limit_usd", "Budget limit for the current period.",
                                  labels=["team", "period"])
        spent = GaugeMetricFamily("gateway_budget_spent_usd", "Settled spend in the current period.",
                                  labels=["team", "period"])
        soft = GaugeMetricFamily("gateway_budget_soft_limit_usd",
                                 "Spend at which the team's soft alert fires (limit x soft_alert).",
                                 labels=["team", "period"])
        for b in self.budgets:
            limit.add_metric([b.team, b.period], b.limit_nano / 1e9)
            spent.add_metric([b.team, b.period], b.spent_nano / 1e9)
            soft.add_metric([b.team, b.period], b.soft_limit_nano / 1e9)
        healthy = GaugeMetricFamily("gateway_deployment_healthy",
                                    "1 when every deployment of the model on the provider is usable.",
                                    labels=["model", "provider"])
        for (model, provider), value in sorted(self.health.items()):
            healthy.add_metric([model, provider], value)
        yield from (limit, spent, soft, healthy)


@contextmanager
def multiprocess_dir(path: str | None) -> Iterator[str]:
    """A clean directory for the workers' metric files: ``path`` emptied of old ``*.db`` files (left in
    place afterwards), or a new temporary one (removed afterwards). Counters start from zero either way,
    so a previous run's counts never leak into this one."""
    if path is None:
        created = tempfile.mkdtemp(prefix="gateway-metrics-")
        try:
            yield created
        finally:
            shutil.rmtree(created, ignore_errors=True)
        return
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")):
        os.remove(stale)
    yield path
