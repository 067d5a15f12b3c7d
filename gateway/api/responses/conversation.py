"""How ``previous_response_id`` is honoured, and what is kept of a finished response.

With the earlier response's :class:`~gateway.state.responses_store.StoredResponse` in hand,
:func:`native_body` decides what a deployment that speaks Responses gets: the request as is
when that deployment holds the earlier response itself (affinity), else the request with
the conversation inlined (earlier items first, their ids dropped since that deployment never
issued them) and no ``previous_response_id``. A chat-only deployment gets the same history
through :func:`~gateway.api.responses.to_chat.responses_to_chat`'s ``history_items``
(:meth:`StoredResponse.history`). :func:`stored_record` is what the store keeps once the
response is final: the full conversation input (so any deployment can continue it, also after
a fallback) and the response. The errors a client sees for an unknown or foreign id are here too.
"""

from __future__ import annotations

from typing import Any

from gateway.api.responses.items import request_input_items, with_item_ids
from gateway.errors import InvalidRequest, NotFound
from gateway.state.responses_store import StoredResponse


def previous_not_found(response_id: str) -> InvalidRequest:
    """OpenAI's answer for a ``previous_response_id`` it does not know (or another team's)."""
    return InvalidRequest(f"Previous response with id '{response_id}' not found.",
                          code="previous_response_not_found", param="previous_response_id")


def response_not_found(response_id: str) -> NotFound:
    """404 for ``GET``/``DELETE /v1/responses/{id}`` of an unknown, expired or foreign id."""
    return NotFound(f"No response found with id '{response_id}'.", code="not_found", param="response_id")


def holds_state(prior: StoredResponse, deployment_id: str) -> bool:
    """Whether ``deployment_id`` keeps the earlier response itself, so the id can be forwarded."""
    return prior.upstream_state and prior.deployment == deployment_id


def native_body(body: dict[str, Any], prior: StoredResponse | None, deployment_id: str) -> dict[str, Any]:
    """The body for a Responses-speaking deployment (``body`` itself when nothing changes)."""
    if prior is None or holds_state(prior, deployment_id):
        return body
    return inlined(body, prior)


def inlined(body: dict[str, Any], prior: StoredResponse) -> dict[str, Any]:
    """``body`` with the conversation so far in its ``input`` (earlier items first, without the ids the
    gateway gave them) and no ``previous_response_id``: what a deployment without the earlier response
    gets, and what the response cache keys on."""
    history = [{k: v for k, v in item.items() if k != "id"} for item in prior.history()]
    rebuilt = {k: v for k, v in body.items() if k != "previous_response_id"}
    rebuilt["input"] = history + request_input_items(body)
    return rebuilt


def stored_record(body: dict[str, Any], prior: StoredResponse | None, response: dict[str, Any], *, team: str,
                  deployment_id: str, upstream_state: bool) -> StoredResponse:
    """The record of a final ``response`` to ``body``: its input is the whole conversation so far.
    ``upstream_state``: the deployment keeps this response itself under its id (never for an answer
    from the response cache, whose id the gateway made)."""
    items = with_item_ids((prior.history() if prior is not None else []) + request_input_items(body))
    return StoredResponse(id=str(response.get("id")), team=team, deployment=deployment_id,
                          model=str(body.get("model")), input_items=items, response=response,
                          upstream_state=upstream_state)
