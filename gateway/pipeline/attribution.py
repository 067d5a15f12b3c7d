"""Who and what a request is for, beyond its team and key: end user, tags, session, agent.

Read once per request from its headers and the codec's end-user field, validated (a clear 400 for
a bad value, never a label), and written on the ledger record; reports break spend down by them.
The end user is the header ``x-gateway-user`` or else the body's own (OpenAI's ``user``, Anthropic's
``metadata.user_id``); tags come from ``x-gateway-tags: a,b``; the session from
``x-gateway-session`` or a client's own session header (Claude Code's ``x-claude-code-session-id``);
the agent and its parent from Claude Code's sub-agent headers. None of these becomes a metrics label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.errors import InvalidRequest

MAX_ID = 256          # characters of a user, session or agent id
MAX_TAGS = 10
_TAG = re.compile(r"[A-Za-z0-9_.:/@+-]{1,64}")
USER_HEADER, TAGS_HEADER, SESSION_HEADER = "x-gateway-user", "x-gateway-tags", "x-gateway-session"
CLIENT_SESSION_HEADERS = ("x-claude-code-session-id",)
AGENT_HEADER, PARENT_AGENT_HEADER = "x-claude-code-agent-id", "x-claude-code-parent-agent-id"


@dataclass(frozen=True, slots=True)
class Attribution:
    user: str | None = None
    tags: tuple[str, ...] = ()
    session: str | None = None
    agent: str | None = None
    parent_agent: str | None = None


NOBODY = Attribution()


def _id(value: object, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_ID or not value.isprintable():
        raise InvalidRequest(f"{what} must be a printable string of at most {MAX_ID} characters.",
                             code="invalid_value", param=what)
    return value


_HEADERS = frozenset({USER_HEADER, TAGS_HEADER, SESSION_HEADER, AGENT_HEADER, PARENT_AGENT_HEADER,
                      *CLIENT_SESSION_HEADERS})


def attribution(headers: dict[str, str], body_user: object = None) -> Attribution:
    """The request's attribution (lower-cased header names); a 400 naming the bad value's source."""
    if headers.keys().isdisjoint(_HEADERS):   # the common case: at most the body's own end user
        return NOBODY if body_user is None else Attribution(_id(body_user if isinstance(body_user, str) else None,
                                                                "user"))
    user = _id(headers[USER_HEADER], USER_HEADER) if USER_HEADER in headers else \
        _id(body_user if isinstance(body_user, str) else None, "user")
    tags: tuple[str, ...] = ()
    raw_tags = headers.get(TAGS_HEADER)
    if raw_tags:
        parts = [t.strip() for t in raw_tags.split(",") if t.strip()]
        if len(parts) > MAX_TAGS or not all(_TAG.fullmatch(t) for t in parts):
            raise InvalidRequest(f"{TAGS_HEADER} takes at most {MAX_TAGS} comma-separated tags of 1 to 64 "
                                 "letters, digits and _.:/@+- each.", code="invalid_value", param=TAGS_HEADER)
        tags = tuple(dict.fromkeys(parts))
    session = _id(headers.get(SESSION_HEADER), SESSION_HEADER)
    for name in CLIENT_SESSION_HEADERS:
        session = session or _id(headers.get(name), name)
    return Attribution(user, tags, session, _id(headers.get(AGENT_HEADER), AGENT_HEADER),
                       _id(headers.get(PARENT_AGENT_HEADER), PARENT_AGENT_HEADER))
