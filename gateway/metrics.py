"""Every Prometheus metric the gateway exports, defined once, and the one place that updates them.

Names follow the product contract (prefix ``gateway_``, base units, ``_total``
counters). Label values are bounded: model names not in the loaded policies
become ``other``. Each app owns its own registry, so tests and several apps in
one process never share counters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets: sub-millisecond gateway overhead up to minute-long generations.
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.002, 0.005,
                    0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
TOKEN_TYPES = ("input", "output", "cached_input", "cache_write", "reasoning")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
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
        self.budget_limit = Gauge("gateway_budget_limit_usd", "Budget limit.", ["team", "period"], registry=r)
        self.budget_spent = Gauge("gateway_budget_spent_usd", "Budget spent.", ["team", "period"], registry=r)
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
        self.deployment_healthy = Gauge("gateway_deployment_healthy", "1 when a deployment is usable.",
                                        ["model", "provider"], registry=r)
        self._known_models: frozenset[str] = frozenset()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, memoised: label lookups are the costly part on the hot path."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def set_known_models(self, names: Iterable[str]) -> None:
        self._known_models = frozenset(names)

    def model_label(self, name: str) -> str:
        return name if name in self._known_models else "other"

    def render(self) -> bytes:
        return generate_latest(self.registry)
