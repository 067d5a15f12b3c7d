"""The OpenAI Responses API as an inbound wire format (the "responses" codec's parts).

Validation of what the gateway reads from a Responses request (:mod:`.validation`),
translation to chat completions for deployments that only speak chat and back
(:mod:`.to_chat`, :mod:`.from_chat`), Responses streaming events made from chat
chunks and watched on the native path (:mod:`.stream`), and the helpers for
stored items and the ``input_items`` listing (:mod:`.items`), and how
``previous_response_id`` reaches a deployment (:mod:`.conversation`). Nothing here does
I/O; the conversation store is :mod:`gateway.state.responses_store`.
"""

from __future__ import annotations

from gateway.api.responses.conversation import (
    holds_state,
    native_body,
    previous_not_found,
    response_not_found,
    stored_record,
)
from gateway.api.responses.from_chat import chat_to_response, new_response_id, responses_usage_from_chat
from gateway.api.responses.items import input_items_page, request_input_items, with_item_ids
from gateway.api.responses.stream import ChatToResponsesStream, ResponsesStreamTap, encode_event
from gateway.api.responses.to_chat import responses_to_chat
from gateway.api.responses.validation import validate_responses

__all__ = [
    "ChatToResponsesStream",
    "ResponsesStreamTap",
    "chat_to_response",
    "encode_event",
    "holds_state",
    "native_body",
    "previous_not_found",
    "response_not_found",
    "stored_record",
    "input_items_page",
    "new_response_id",
    "request_input_items",
    "responses_to_chat",
    "responses_usage_from_chat",
    "validate_responses",
    "with_item_ids",
]
