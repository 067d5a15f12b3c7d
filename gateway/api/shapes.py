"""A request of any inbound API in the shape routing reads: chat completions for Messages and Responses.

``gateway route --endpoint messages|responses`` and policy test cases with ``endpoint: messages``
or ``endpoint: responses`` are routed as the edge would route them: on the body the API's codec
translates them to (the translation's dropped features do not matter to routing).
"""

from __future__ import annotations

from typing import Any

from gateway.api.anthropic.translate import messages_to_chat
from gateway.api.responses.to_chat import responses_to_chat

INBOUND = ("chat", "completions", "embeddings", "messages", "responses")


def routing_shape(endpoint: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(the endpoint routing sees, the body it reads) for a request to ``endpoint``."""
    if endpoint == "messages":
        return "chat", messages_to_chat(body)[0]
    if endpoint == "responses":
        return "chat", responses_to_chat(body)[0]
    return endpoint, body
