"""The access log and the process's log format: one line per finished request, text or JSON.

:func:`access_line` renders a ledger record as one line: request id, team, key id, the model
asked for, the deployment and provider that answered, status, tokens, exact cost in USD, latency
(and time to first token for a stream), cache result. It never carries a secret or any prompt or
answer text (a ledger record holds neither), and every value that came from a client is quoted,
so a line cannot be split or forged. :class:`AccessLog` writes it to the ``gateway.access`` logger
at info; :func:`logging_config` is the logging setup for ``GATEWAY_LOG_FORMAT`` (``text``, or
``json``: one JSON object per line for every logger, an access line's fields at top level).
"""

from __future__ import annotations

import logging
import logging.config
import re
import time
from typing import Any

import orjson

from gateway.money import usd_text
from gateway.state.ledger import LedgerRecord

ACCESS_LOGGER = "gateway.access"




def access_fields(record: LedgerRecord) -> dict[str, Any]:
    """The fields of one access line, in order."""
    fields: dict[str, Any] = {
        "request_id": record.request_id, "team": record.team, "key_id": record.key_id,
        "model": record.requested_model, "deployment": record.deployment or None,
        "provider": record.provider or None, "route": record.route, "status": record.status,
        "input_tokens": record.input_tokens, "output_tokens": record.output_tokens,
        "cached_tokens": record.cached_input_tokens, "cost_usd": usd_text(record.cost_nano),
        "latency_ms": record.latency_ms, "ttft_ms": record.ttft_ms, "stream": record.stream,
        "cache": record.cache, "estimated": record.estimated,
    }
    return fields


_PLAIN = re.compile(r"[A-Za-z0-9_./:@+-]+")


def _q(text: str | None) -> str:
    """A text value: as is when plain, else JSON-quoted (no newline, no space, no fake ``key=``); None as -."""
    if text is None:
        return "-"
    return text if _PLAIN.fullmatch(text) else orjson.dumps(text).decode()


def access_line(record: LedgerRecord, json_format: bool) -> str:
    """One request as one log line: ``key=value`` pairs (the fields of :func:`access_fields`), or a JSON object."""
    if json_format:
        return orjson.dumps(access_fields(record)).decode()
    r = record
    ttft = "-" if r.ttft_ms is None else f"{r.ttft_ms:g}"
    return (f"request_id={_q(r.request_id)} team={_q(r.team)} key_id={_q(r.key_id)} model={_q(r.requested_model)} "
            f"deployment={_q(r.deployment or None)} provider={_q(r.provider or None)} route={_q(r.route)} "
            f"status={_q(r.status)} input_tokens={r.input_tokens} output_tokens={r.output_tokens} "
            f"cached_tokens={r.cached_input_tokens} cost_usd={usd_text(r.cost_nano)} latency_ms={r.latency_ms:g} "
            f"ttft_ms={ttft} stream={'true' if r.stream else 'false'} cache={_q(r.cache)} "
            f"estimated={'true' if r.estimated else 'false'}")


class AccessMessage:
    """A log record's message for one request: rendered only by the formatter that writes it (the text
    line for text, the fields for :class:`JsonFormatter`), so nothing is built twice or for nobody."""

    __slots__ = ("record",)

    def __init__(self, record: LedgerRecord) -> None:
        self.record = record

    def __str__(self) -> str:
        return access_line(self.record, False)


class AccessLog:
    """Writes access lines to the ``gateway.access`` logger (looked up once): make one per process, call
    :meth:`write` once per finished request."""

    __slots__ = ("logger",)

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    def write(self, record: LedgerRecord) -> None:
        """At info, when that level is on. The log record goes to the handlers directly: no caller lookup
        (``logging`` would walk the stack for every line), and the line is rendered once, by the formatter
        that writes it."""
        log = self.logger
        if log.isEnabledFor(logging.INFO):
            log.handle(log.makeRecord(log.name, logging.INFO, "access_log", 0, AccessMessage(record), (), None))


def log_request(record: LedgerRecord, logger: logging.Logger | None = None) -> None:
    """:meth:`AccessLog.write` without keeping an :class:`AccessLog`."""
    AccessLog(logger).write(record)


class _SecondCache:
    """The formatted UTC second of the last record (log lines come many per second)."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second, self.text = -1, ""

    def utc(self, created: float) -> str:
        second = int(created)
        if second != self.second:
            self.second, self.text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self.text


class TextFormatter(logging.Formatter):
    """``<UTC time> <LEVEL> <logger>: <message>``."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = _SecondCache()

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.clock.utc(record.created)}.{int(record.msecs):03d}Z {record.levelname} {record.name}: " \
               f"{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger and message, or an access line's own fields."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = _SecondCache()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": f"{self.clock.utc(record.created)}.{int(record.msecs):03d}Z",
                               "level": record.levelname.lower(), "logger": record.name}
        if isinstance(record.msg, AccessMessage):
            out.update(access_fields(record.msg.record))
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def logging_config(level: str, log_format: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for this process and every worker (uvicorn applies it in each):
    one stderr handler on the root in ``text`` or ``json``, uvicorn's loggers going through it, the
    access log (``gateway.access``) on whenever the level lets info through."""
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"text": {"()": f"{__name__}.TextFormatter"}, "json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "json" if log_format == "json" else "text"}},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error")},
    }


def configure_logging(level: str, log_format: str) -> None:
    """Apply :func:`logging_config` to this process."""
    logging.config.dictConfig(logging_config(level, log_format))
