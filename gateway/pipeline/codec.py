"""What an inbound API must provide to ride the pipeline: the codec interface.

The pipeline depends on this interface only; the codecs themselves live at the edge
(:mod:`gateway.api`) and depend on the pipeline, never the reverse.


A codec owns one wire format as clients speak it: it decodes a request body into the
pipeline's typed :class:`~gateway.pipeline.request.Request`, builds the body of an upstream
call for a deployment (as sent, or translated to the chat shape a deployment speaks), reads
the usage out of an upstream reply, encodes the JSON reply and the SSE events back with the
gateway's cost, and renders errors in its API's envelope. Budgets, routing, pricing and the
ledger never see a wire format: a new inbound API is a new codec (see
:mod:`gateway.api.openai_codec` for OpenAI's chat, completions and embeddings).
"""

from __future__ import annotations

from typing import Any, Protocol

from gateway.errors import GatewayError
from gateway.policy import Deployment
from gateway.pricing import Usage

from .request import Inbound, Request


class Stateless:
    """For codecs whose requests refer to nothing earlier: nothing to load, nothing to keep."""

    stateful = False   # the lifecycle skips load and keep
    async def load(self, req: Request, team: str) -> None:
        return None

    async def keep(self, req: Request, team: str, deployment: Deployment, answer: dict[str, Any] | None) -> None:
        return None


class StreamEncoder(Protocol):
    """One stream's relay: upstream chunks in, the client's SSE bytes out."""

    def feed(self, chunk: dict[str, Any]) -> bytes | None:
        """The bytes to send for one upstream chunk (None: nothing now, e.g. a usage chunk held back)."""
        ...

    def usage(self) -> Usage | None:
        """The usage the upstream reported so far (None: none yet)."""
        ...

    def upstream_cost(self) -> int | None:
        """What the upstream said the request cost, in nano-USD (None: it did not say)."""
        ...

    def output_tokens(self, model: str) -> int:
        """The gateway's count of the output delivered so far (when the upstream reports no usage)."""
        ...

    def close(self, usage: Usage, cost_nano: int) -> bytes:
        """The closing events of a finished stream, with the request's cost."""
        ...

    def error(self, exc: GatewayError, usage: Usage | None, cost_nano: int) -> bytes:
        """The closing events of a stream that failed after its first byte."""
        ...

    def answer(self) -> dict[str, Any] | None:
        """The whole answer the stream spelled, for the response cache (None: not assembled or incomplete)."""
        ...


class Codec(Protocol):
    endpoint: str
    stateful: bool     # it loads earlier turns and keeps answers (else load and keep are never called)

    async def load(self, req: Request, team: str) -> None:
        """Load what the request refers to (an earlier turn), for the caller's team only."""
        ...

    async def keep(self, req: Request, team: str, deployment: Deployment, answer: dict[str, Any] | None) -> None:
        """Keep what a later request may refer to (this answer), after a successful reply."""
        ...

    def decode(self, raw: bytes) -> Any:
        """The body as data (a 400 in the API's envelope for malformed input)."""
        ...

    def validate(self, inbound: Inbound) -> Request:
        """The typed request (after authentication, so a caller without a key learns nothing more)."""
        ...

    def wire(self, req: Request, deployment: Deployment) -> str:
        """The wire format a call to ``deployment`` is made in: the request's own API, or chat."""
        ...

    def call_body(self, req: Request, deployment: Deployment) -> tuple[str, dict[str, Any]]:
        """(wire format, body) of the upstream call to ``deployment``, model and output cap not yet set."""
        ...

    def cap_output(self, wire: str, body: dict[str, Any], cap: int, deployment: Deployment) -> None: ...

    def reply_usage(self, wire: str, body: dict[str, Any]) -> Usage | None: ...

    def upstream_cost(self, wire: str, body: dict[str, Any]) -> int | None:
        """What the upstream said the request cost, in nano-USD (None: it did not say)."""
        ...

    def estimate_output(self, wire: str, body: dict[str, Any], model: str) -> int: ...

    def encode_reply(self, req: Request, wire: str, body: dict[str, Any], usage: Usage, cost_nano: int,
                     deployment: Deployment) -> tuple[bytes, dict[str, Any]]:
        """(the reply's bytes, the answer in the client's shape, for the response cache)."""
        ...

    def stream(self, req: Request, wire: str, deployment: Deployment, assemble: bool) -> StreamEncoder:
        """The relay of one stream; ``assemble``: also keep the whole answer for the response cache."""
        ...

    def replay(self, req: Request, answer: dict[str, Any]) -> tuple[list[bytes], dict[str, Any]]:
        """A cached answer: (one JSON body, or the SSE events of a stream; the answer as the client gets
        it, which a stateful codec keeps as it keeps any answer)."""
        ...

    def error_body(self, exc: GatewayError) -> bytes: ...

    def error_headers(self, exc: GatewayError) -> list[tuple[bytes, bytes]]:
        """Content type and the error's own headers (``retry-after``, ...)."""
        ...
