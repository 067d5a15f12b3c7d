"""Every upstream that does not speak OpenAI's API (Anthropic, Gemini, Bedrock, Mistral, ...), through litellm.

litellm translates the OpenAI-shaped body to the provider's API and the answer
back; this module is the only place that touches it. The model string is
``provider/upstream_model`` and the deployment's base URL, key, headers and the
call's timeout are passed per call; litellm's own retries, callbacks and debug
output are off (the gateway does fallbacks, logging and accounting) and its price
map and Anthropic beta-header table are read from the installed package, never
fetched. Only known OpenAI request fields reach litellm, because litellm also
reads control kwargs (``api_base``, ``mock_response``, ...) from the same
namespace; parameters a provider does not support are *not* dropped
(``drop_params`` is off) so the caller sees an ``UpstreamRejected`` naming them
rather than a silently different request. Responses and stream chunks become
plain OpenAI-shaped dicts: litellm's always-null extras are pruned, the final
usage chunk has ``choices: []``, and usage keeps Anthropic's cache fields
(``cache_read_input_tokens``, ``cache_creation_input_tokens``, the 5m/1h split in
``prompt_tokens_details.cache_creation_token_details`` mirrored as the raw
``cache_creation`` mapping). A ``cost`` litellm (or the provider behind it) puts in
usage is never shown to clients as a second, differently computed price: it is
moved to the private ``_upstream_cost`` key, kept for the cost-drift counter and
stripped by the codec. litellm's exceptions become gateway upstream errors here,
in one translator (:class:`litellm_errors`): the client sees the deployment, the
status and a fixed reason; litellm's text (which wraps the provider's raw error body)
goes to the log with secrets redacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import orjson

# litellm reads these when imported / on first use: never fetch its price map or beta-header table.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS", "True")

import litellm

from gateway.errors import UpstreamError, UpstreamRejected, UpstreamTimeout
from gateway.policy import Deployment
from gateway.providers.base import Call, error_for_status, upstream_kind, upstream_message
from gateway.providers.redaction import identifier, redact, secrets_of
from gateway.usage import UPSTREAM_COST_KEY

log = logging.getLogger("gateway")

litellm.suppress_debug_info = True
litellm.drop_params = False
litellm.turn_off_message_logging = True
litellm.disable_streaming_logging = True
litellm.success_callback = []
litellm.failure_callback = []
litellm.callbacks = []

# Fields of OpenAI's request bodies that may reach litellm, per endpoint; "model", "stream" and
# "stream_options" are set here, and anything else is refused before litellm sees it.
_SHARED = frozenset({"user", "temperature", "top_p", "n", "stop", "max_tokens", "presence_penalty",
                     "frequency_penalty", "logit_bias", "logprobs", "seed", "top_k"})
_FIELDS = {
    "chat": _SHARED | {
        "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
        "parallel_tool_calls", "functions", "function_call", "reasoning_effort", "verbosity", "modalities",
        "audio", "prediction", "service_tier", "store", "prompt_cache_key", "safety_identifier",
        "web_search_options", "thinking"},
    "completions": _SHARED | {"prompt", "suffix", "echo", "best_of"},
    "embeddings": frozenset({"input", "dimensions", "encoding_format", "user"}),
}
_GATEWAY_FIELDS = frozenset({"model", "stream", "stream_options"})
# Keys litellm adds to messages, deltas and chunks that are null when unused; OpenAI omits them.
_NULL_EXTRAS = frozenset({"provider_specific_fields", "citations", "thinking_blocks", "reasoning_content",
                          "function_call", "audio", "tool_calls", "role", "annotations", "images"})
_PREFIX = re.compile(r"^(?:litellm\.\w+:\s*)+")
_QUOTED = re.compile(r"'([A-Za-z_][A-Za-z0-9_]{0,47})'")


class LiteLLMProvider:
    """The provider for every deployment whose ``provider`` is not OpenAI-compatible."""

    async def complete(self, call: Call) -> dict[str, Any]:
        kwargs = _kwargs(call)
        # litellm's own timeout bounds each read; the call's deadline bounds the whole call
        with litellm_errors(call.deployment):
            async with asyncio.timeout(call.timeout_s):
                if call.endpoint == "embeddings":
                    response = await litellm.aembedding(**kwargs)
                elif call.endpoint == "completions":
                    response = await litellm.atext_completion(**kwargs)
                else:
                    response = await litellm.acompletion(**kwargs)
        return _clean(_plain(response, call.deployment))

    async def stream(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        if call.endpoint == "embeddings":
            raise UpstreamRejected("embeddings cannot be streamed", code="invalid_request", param="stream")
        kwargs = _kwargs(call)
        kwargs["stream"] = True
        kwargs["stream_options"] = {"include_usage": True}
        deployment, text = call.deployment, call.endpoint == "completions"
        chunks: Any = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + call.timeout_s     # the call's deadline holds until the first chunk
        try:
            with litellm_errors(deployment):
                async with asyncio.timeout_at(deadline):
                    if text:
                        chunks = await litellm.atext_completion(**kwargs)
                    else:
                        chunks = await litellm.acompletion(**kwargs)
                iterator = chunks.__aiter__()
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):   # then an idle limit between chunks
                            chunk = await iterator.__anext__()
                    except StopAsyncIteration:
                        return
                    deadline = loop.time() + call.timeout_s
                    yield _chunk(_plain(chunk, deployment), text)
        finally:
            close = getattr(chunks, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):    # closing a broken stream must not mask the outcome
                    await close()

    async def aclose(self) -> None:
        return None


def _kwargs(call: Call) -> dict[str, Any]:
    d = call.deployment
    allowed = _FIELDS.get(call.endpoint, _FIELDS["chat"])
    kwargs: dict[str, Any] = {}
    for key, value in call.body.items():
        if key in _GATEWAY_FIELDS:
            continue
        if key not in allowed:
            raise UpstreamRejected(
                f"deployment {d.id} ({d.provider}) does not accept the parameter {key!r}",
                code="unsupported_parameter", param=key)
        kwargs[key] = value
    kwargs.update(model=f"{d.provider}/{d.upstream_model}", timeout=call.timeout_s, num_retries=0, max_retries=0)
    if call.endpoint == "chat":
        # litellm 1.106.2 imports its MCP gateway (and the optional `mcp` package) for any request with
        # `tools`, to look for its proxy-only MCP tool type; that flag is its own way to skip the detour.
        kwargs["_skip_mcp_handler"] = True
    if d.api_base:
        kwargs["api_base"] = d.api_base
    if d.api_key:
        kwargs["api_key"] = d.api_key
    if d.headers:
        kwargs["extra_headers"] = dict(d.headers)
    return kwargs


def _plain(obj: Any, deployment: Deployment) -> dict[str, Any]:
    """A litellm response object as a plain JSON-able dict."""
    data = obj.model_dump() if hasattr(obj, "model_dump") else obj
    if not isinstance(data, dict):
        raise UpstreamError(f"deployment {deployment.id}: litellm returned an unexpected {type(obj).__name__}")
    return data


def _prune(obj: Any) -> None:
    if not isinstance(obj, dict):
        return
    for key in [k for k, v in obj.items() if k in _NULL_EXTRAS and _empty(v)]:
        del obj[key]


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and all(v is None for v in value.values()))


def _clean(body: dict[str, Any]) -> dict[str, Any]:
    _prune(body)
    for choice in body.get("choices") or ():
        if isinstance(choice, dict):
            _prune(choice)
            _prune(choice.get("message"))
            _prune(choice.get("delta"))
    usage = body.get("usage")
    if isinstance(usage, dict):
        body["usage"] = _usage(usage)
    elif "usage" in body and usage is None:
        del body["usage"]
    return body


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Usage with null extras dropped, the cache-write TTL split also under Anthropic's own key, and
    litellm's own ``cost`` moved out of the client's sight to ``_upstream_cost``."""
    out = {k: v for k, v in usage.items() if v is not None}
    if "cost" in out:
        out[UPSTREAM_COST_KEY] = out.pop("cost")
    details = out.get("prompt_tokens_details")
    tiers = details.get("cache_creation_token_details") if isinstance(details, dict) else None
    if isinstance(tiers, dict) and "cache_creation" not in out:
        five, hour = tiers.get("ephemeral_5m_input_tokens"), tiers.get("ephemeral_1h_input_tokens")
        if five is not None or hour is not None:
            out["cache_creation"] = {"ephemeral_5m_input_tokens": five or 0, "ephemeral_1h_input_tokens": hour or 0}
    return out


def _chunk(chunk: dict[str, Any], text: bool) -> dict[str, Any]:
    chunk = _clean(chunk)
    choices = chunk.get("choices")
    if isinstance(choices, list):
        if "usage" in chunk and all(_blank_choice(c) for c in choices):
            chunk["choices"] = []           # OpenAI's usage chunk carries no choices
        elif text:
            for choice in choices:
                if isinstance(choice, dict) and choice.get("text") is None:
                    choice["text"] = ""
    return chunk


def _blank_choice(choice: Any) -> bool:
    if not isinstance(choice, dict) or choice.get("finish_reason") is not None:
        return False
    delta = choice.get("delta")
    return not (choice.get("text") or (isinstance(delta, dict) and any(v is not None for v in delta.values())))


def _message(exc: Exception) -> str:
    """The provider's own message out of a litellm exception's text (which wraps the raw error body)."""
    text = str(getattr(exc, "message", None) or exc or type(exc).__name__).split("\n", 1)[0]
    text = _PREFIX.sub("", text)
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            payload = orjson.loads(text[start:end + 1])
        except orjson.JSONDecodeError:
            payload = None
        if isinstance(payload, dict):
            return upstream_message(payload, text)[0]
    text = text.split(" To drop these", 1)[0].split(". Handle with `litellm.", 1)[0]
    return text[:500] or type(exc).__name__


class litellm_errors:  # noqa: N801  (a context manager used like a function: ``with litellm_errors(...)``)
    """The one translator of litellm's exceptions (and timeouts) into the gateway's upstream errors;
    the gateway's own errors pass through untouched."""

    __slots__ = ("deployment",)

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if isinstance(exc, Exception) and not isinstance(exc, UpstreamError):
            raise _translate(exc, self.deployment) from None


def _translate(exc: Exception, deployment: Deployment) -> UpstreamError:
    """litellm's exception tree mapped onto the gateway's, via the one status rule in ``error_for_status``
    (which logs the provider's text, redacted); errors without a status are logged here."""
    if isinstance(exc, UpstreamError):
        return exc
    message = _message(exc)
    where = f"deployment {deployment.id}"
    if isinstance(exc, litellm.ContextWindowExceededError):
        return error_for_status(400, message, deployment, code="context_length_exceeded", param="messages")
    if isinstance(exc, litellm.UnsupportedParamsError):   # litellm's own words about the request's fields
        names = list(dict.fromkeys(n for n in _QUOTED.findall(message) if identifier(n, secrets_of(deployment))))
        log.warning("%s: %s", where, redact(message, secrets_of(deployment)))
        listed = f" {', '.join(names[:5])}" if names else "s it was sent"
        return UpstreamRejected(f"{where} ({deployment.provider}) does not accept the parameter{listed}",
                                code="unsupported_parameter", param=names[0] if names else None)
    if isinstance(exc, litellm.ContentPolicyViolationError):
        return error_for_status(400, message, deployment, code="content_policy_violation")
    headers: Any = getattr(exc, "litellm_response_headers", None)
    retry_after = headers.get("retry-after") if hasattr(headers, "get") else None
    status: Any = None
    if isinstance(exc, litellm.RateLimitError):
        status = 429
    elif isinstance(exc, litellm.BadRequestError):
        status = 400
    elif isinstance(exc, litellm.AuthenticationError):
        status = 401
    elif isinstance(exc, litellm.PermissionDeniedError):
        status = 403
    elif not isinstance(exc, (litellm.Timeout, TimeoutError, litellm.APIConnectionError)):
        status = getattr(exc, "status_code", None)
    if isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599:
        return error_for_status(status, message, deployment, kind=_kind(exc),
                                retry_after=retry_after if isinstance(retry_after, str) else None)
    log.warning("%s failed (%s): %s", where, type(exc).__name__, redact(message, secrets_of(deployment)))
    if isinstance(exc, (litellm.Timeout, TimeoutError)):
        return UpstreamTimeout(f"{where} timed out")
    if isinstance(exc, litellm.APIConnectionError):   # also litellm's catch-all for unexpected failures
        return UpstreamError(f"{where} failed (connection error or broken answer)", failure="connection")
    return UpstreamError(f"{where} failed ({type(exc).__name__})")


def _kind(exc: Exception) -> str | None:
    """The provider's error type (``overloaded_error``, ...) out of the raw body litellm wraps, if any."""
    text = str(getattr(exc, "message", None) or exc or "")
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            return upstream_kind(orjson.loads(text[start:end + 1]))
        except orjson.JSONDecodeError:
            return None
    return None
