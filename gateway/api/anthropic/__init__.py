"""The Anthropic Messages API codec: validation, translation, stream events and errors.

This package owns everything the gateway needs to speak the Messages API at its
edge and to translate between it and chat completions; it does no I/O. Its
modules: :mod:`.validation` (request checks), :mod:`.translate` (whole bodies,
both directions), :mod:`.stream` (stream translators and SSE framing),
:mod:`.replay` (a stream folded into its Message, a cached Message replayed),
:mod:`.errors` (Anthropic's error envelope) and :mod:`.count` (token estimate).
The native upstream client lives in :mod:`gateway.providers.anthropic`.
"""

from gateway.api.anthropic.count import count_tokens_estimate
from gateway.api.anthropic.errors import error_body, error_event, error_headers
from gateway.api.anthropic.stream import ChatToMessagesStream, MessagesToChatStream, encode_event
from gateway.api.anthropic.translate import (
    chat_to_messages,
    chat_to_messages_reply,
    messages_reply_to_chat,
    messages_to_chat,
)
from gateway.api.anthropic.validation import validate_messages

__all__ = [
    "ChatToMessagesStream",
    "MessagesToChatStream",
    "chat_to_messages",
    "chat_to_messages_reply",
    "count_tokens_estimate",
    "encode_event",
    "error_body",
    "error_event",
    "error_headers",
    "messages_reply_to_chat",
    "messages_to_chat",
    "validate_messages",
]
