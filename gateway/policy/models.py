"""The ``models`` section: public model names, their aliases and their deployments.

A model is what clients put in ``"model"``; it maps to one or more deployments,
each naming a provider, the upstream model, where to reach it, its key (by
environment variable), weight, context window, capabilities and price. Prices
are resolved here, once, when policies load: the request path only reads them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway.errors import UpstreamError
from gateway.policy.reader import Fields
from gateway.policy.yamlsource import Located, PolicyError
from gateway.pricing import Price, PriceBook, resolve_price

OPENAI_COMPATIBLE = frozenset({"openai", "vllm", "ollama", "llamacpp", "openai_compatible"})
SELF_HOSTED_KINDS = frozenset({"vllm", "ollama", "llamacpp"})
CAPABILITIES = frozenset({"chat", "completions", "embeddings", "tools", "vision", "json"})
WIRE_APIS = frozenset({"chat", "completions", "embeddings", "messages", "responses"})   # inbound wire formats
PRICE_KEYS = frozenset({
    "input_per_mtok", "output_per_mtok", "cache_read_per_mtok", "cache_write_per_mtok",
    "cache_write_1h_per_mtok", "gpu_hour_usd", "input_tokens_per_second", "output_tokens_per_second",
    "reasoning_per_mtok", "audio_input_per_mtok", "audio_output_per_mtok",
})
_PROVIDER_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class SimulatedSpec:
    """Behaviour of the built-in simulated provider for one deployment."""

    latency_ms: float = 0.0        # non-streaming: time before the answer
    ttft_ms: float = 0.0           # streaming: time before the first chunk
    tokens_per_second: float = 0.0  # streaming pace after the first chunk; 0 = as fast as possible
    output_tokens: int = 16        # answer length (capped by max_tokens)
    failure_rate: float = 0.0      # fraction of requests that fail, deterministic sequence
    failure_status: int = 503      # HTTP status of an injected failure
    fail_after_tokens: int = 0     # >0: streams break after this many tokens (an injected cut)
    prompt_cache: bool = False     # report cached_tokens for prompt prefixes seen before (like OpenAI's)


@dataclass(frozen=True, slots=True)
class Deployment:
    id: str
    model: str
    provider: str
    upstream_model: str
    api_base: str | None
    api_key: str | None
    api_key_env: str | None
    weight: float
    context_window: int | None
    max_output_tokens: int | None
    capabilities: frozenset[str]
    price: Price
    price_source: str
    timeout_s: float | None
    headers: tuple[tuple[str, str], ...]
    simulated: SimulatedSpec | None
    self_hosted: bool
    apis: frozenset[str] = frozenset({"chat", "completions", "embeddings"})   # wire formats spoken natively

    @property
    def openai_compatible(self) -> bool:
        return self.provider in OPENAI_COMPATIBLE

    def speaks(self, wire: str) -> bool:
        """Whether a request in wire format ``wire`` can be sent as is (else it is translated to chat)."""
        return wire in self.apis


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    deployments: tuple[Deployment, ...]
    aliases: tuple[str, ...]
    description: str


def parse_models(section: Any, book: PriceBook, env: dict[str, str] | None = None) -> dict[str, ModelSpec]:
    """Validate a ``models:`` mapping; returns the models keyed by name *and* alias."""
    env = dict(os.environ) if env is None else env
    if not isinstance(section, Located):
        raise PolicyError(getattr(section, "file", "<policies>"), getattr(section, "line", 1),
                          "models", "must be a mapping of model names")
    out: dict[str, ModelSpec] = {}
    for name, body in section.items():
        fields = Fields(body, f"models.{name}", section.position(name))
        description = fields.take_str("description", "")
        aliases = fields.take_str_list("aliases", [])
        raw_deployments = fields.take_list("deployments")
        if not raw_deployments:
            raise fields.error("deployments", "at least one deployment is required")
        deployments = tuple(
            _parse_deployment(item, f"models.{name}.deployments[{i}]", raw_deployments.position(i),
                              name, book, env)
            for i, item in enumerate(raw_deployments)
        )
        fields.finish()
        _unique_ids(deployments, fields)
        spec = ModelSpec(name=name, deployments=deployments, aliases=tuple(aliases), description=description)
        for key in (name, *aliases):
            if key in out:
                raise fields.error("aliases" if key != name else name, f"model name {key!r} is defined twice")
            out[key] = spec
    return out


def _unique_ids(deployments: tuple[Deployment, ...], fields: Fields) -> None:
    seen: set[str] = set()
    for d in deployments:
        if d.id in seen:
            raise fields.error("deployments", f"two deployments share the id {d.id!r}; give one a `name`")
        seen.add(d.id)


def _parse_deployment(data: Any, path: str, where: tuple[str, int], model: str, book: PriceBook,
                      env: dict[str, str]) -> Deployment:
    f = Fields(data, path, where)
    provider = f.take_str("provider")
    if not _PROVIDER_RE.match(provider):
        raise f.error("provider", f"not a provider name: {provider!r}")
    upstream = f.take_str("model", model)
    name = f.take_str("name", f"{provider}/{upstream}")
    api_base = f.take_str("api_base", None)
    api_key_env = f.take_str("api_key_env", None)
    weight = f.take_number("weight", 1.0, minimum=0.0)
    context_window = f.take_int("context_window", None, minimum=1)
    max_output = f.take_int("max_output_tokens", None, minimum=1)
    caps = f.take_str_list("capabilities", None, allowed=CAPABILITIES)
    timeout_s = f.take_number("timeout_s", None, minimum=0.001)
    headers = f.take_str_map("headers", {})
    self_hosted = f.take_bool("self_hosted", provider in SELF_HOSTED_KINDS)
    price_data = f.take_mapping("price")
    sim_data = f.take_mapping("simulated")
    apis = f.take_str_list("apis", None, allowed=WIRE_APIS)
    f.finish()

    if provider in OPENAI_COMPATIBLE and not api_base:
        if provider == "openai":
            api_base = "https://api.openai.com/v1"
        else:
            raise f.error("api_base", f"provider {provider!r} needs an api_base (the server's /v1 URL)")
    if api_base is not None and not api_base.startswith(("http://", "https://")):
        raise f.error("api_base", f"must be an http:// or https:// URL, got {api_base!r}")
    if provider != "simulated" and sim_data is not None:
        raise f.error("simulated", "only deployments with provider: simulated take this section")
    api_key = env.get(api_key_env) if api_key_env else None

    price_spec: dict[str, Any] | None = None
    if price_data is not None:
        unknown = [k for k in price_data if k not in PRICE_KEYS]
        if unknown:
            raise price_data.error(f"{path}.price.{unknown[0]}", "unknown key")
        for k, v in price_data.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise price_data.error(f"{path}.price.{k}", f"must be a non-negative number, got {v!r}")
        price_spec = dict(price_data)
    try:
        price, source = resolve_price(price_spec, provider, upstream, book)
    except ValueError as exc:
        raise f.error("price", str(exc)) from None

    if context_window is None and provider != "simulated":
        context_window = book.context_window(provider, upstream)
    if max_output is None and provider != "simulated":
        max_output = book.max_output_tokens(provider, upstream)
    if provider == "simulated":
        context_window = context_window or 128_000
        max_output = max_output or 16_384
    capabilities = frozenset(caps) if caps is not None else _default_capabilities(upstream)
    simulated = _parse_simulated(sim_data, f"{path}.simulated", f.data.position("simulated")) \
        if provider == "simulated" else None
    return Deployment(
        id=name, model=model, provider=provider, upstream_model=upstream, api_base=api_base,
        api_key=api_key, api_key_env=api_key_env, weight=float(weight), context_window=context_window,
        max_output_tokens=max_output, capabilities=capabilities, price=price, price_source=source,
        timeout_s=float(timeout_s) if timeout_s is not None else None,
        headers=tuple(headers.items()), simulated=simulated, self_hosted=self_hosted,
        apis=frozenset(apis) if apis is not None else _default_apis(provider),
    )


def missing_credential(deployment: Deployment) -> str | None:
    """The environment variable a deployment's key is read from (``api_key_env``) when it was unset or
    empty as the policies loaded; None when nothing is missing. The request path answers such a
    deployment with :func:`credential_error` instead of calling it; ``gateway serve`` warns at start
    and ``/health/ready`` lists them."""
    return deployment.api_key_env if deployment.api_key_env and not deployment.api_key else None


def missing_credentials(deployments: Iterable[Deployment]) -> list[tuple[str, str]]:
    """(deployment id, variable) for every deployment whose key variable is unset."""
    return [(d.id, var) for d in deployments if (var := missing_credential(d)) is not None]


def credential_error(deployment: Deployment) -> UpstreamError | None:
    """The error for a call to a deployment whose key variable is unset (None when its key is there):
    an upstream failure of kind ``auth`` (so a route falls back to another candidate as it would on a
    401), code ``missing_credentials``, naming the variable; nothing is sent upstream."""
    var = missing_credential(deployment)
    if var is None:
        return None
    return UpstreamError(f"deployment {deployment.id} has no API key: the environment variable {var} "
                         f"(its api_key_env) is not set where the gateway runs; set it and restart the gateway",
                         failure="auth", code="missing_credentials")


def _default_apis(provider: str) -> frozenset[str]:
    """Native wire formats: OpenAI's own API also speaks Responses, Anthropic's speaks Messages (its chat
    goes through litellm's provider layer); any other server is asked in chat format unless ``apis`` says more."""
    if provider == "openai":
        return frozenset({"chat", "completions", "embeddings", "responses"})
    if provider == "anthropic":
        return frozenset({"messages"})
    return frozenset({"chat", "completions", "embeddings"})


def _default_capabilities(upstream_model: str) -> frozenset[str]:
    if "embed" in upstream_model:
        return frozenset({"embeddings"})
    return frozenset({"chat", "completions", "tools", "vision", "json"})


def _parse_simulated(data: Located | None, path: str, where: tuple[str, int]) -> SimulatedSpec:
    if data is None:
        return SimulatedSpec()
    f = Fields(data, path, where)
    spec = SimulatedSpec(
        latency_ms=float(f.take_number("latency_ms", 0.0, minimum=0)),
        ttft_ms=float(f.take_number("ttft_ms", 0.0, minimum=0)),
        tokens_per_second=float(f.take_number("tokens_per_second", 0.0, minimum=0)),
        output_tokens=f.take_int("output_tokens", 16, minimum=1),
        failure_rate=float(f.take_number("failure_rate", 0.0, minimum=0, maximum=1)),
        failure_status=f.take_int("failure_status", 503, minimum=400),
        fail_after_tokens=f.take_int("fail_after_tokens", 0, minimum=0),
        prompt_cache=bool(f.take_bool("prompt_cache", False)),
    )
    f.finish()
    return spec
