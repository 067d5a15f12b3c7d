"""The access log and the process's log format: one line per finished request, text or JSON.

:func:`access_line` renders a ledger record as one line: request id, team, key id, the model
asked for, the deployment and provider that answered, status, tokens, exact cost in USD, latency
(and time to first token for a stream), cache result. It never carries a secret or any prompt or
answer text (a ledger record holds neither), and every value that came from a client is quoted,
so a line cannot be split or forged. :func:`log_request` writes it to the ``gateway.access`` logger
at info; :func:`logging_config` is the logging setup for ``GATEWAY_LOG_FORMAT`` (``text``, or
``json``: one JSON object per line for every logger, an access line's fields at top level).
"""

from __future__ import annotations

import logging
import logging.config
import time
from typing import Any

import orjson

from gateway.state.ledger import LedgerRecord

ACCESS_LOGGER = "gateway.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def usd(nano: int) -> str:
    """Integer nano-USD as an exact decimal string."""
    sign, nano = ("-", -nano) if nano < 0 else ("", nano)
    whole, frac = divmod(nano, 1_000_000_000)
    return sign + (f"{whole}.{frac:09d}".rstrip("0").rstrip(".") if frac else f"{whole}")


def access_fields(record: LedgerRecord) -> dict[str, Any]:
    """The fields of one access line, in order."""
    fields: dict[str, Any] = {
        "request_id": record.request_id, "team": record.team, "key_id": record.key_id,
        "model": record.requested_model, "deployment": record.deployment or None,
        "provider": record.provider or None, "route": record.route, "status": record.status,
        "input_tokens": record.input_tokens, "output_tokens": record.output_tokens,
        "cached_tokens": record.cached_input_tokens, "cost_usd": usd(record.cost_nano),
        "latency_ms": record.latency_ms, "ttft_ms": record.ttft_ms, "stream": record.stream,
        "cache": record.cache, "estimated": record.estimated,
    }
    return fields


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"{value:g}" if isinstance(value, float) else str(value)
    text = str(value)
    plain = text and all(c.isalnum() or c in "-_./:@+" for c in text)
    return text if plain else orjson.dumps(text).decode()   # quoted and escaped: no newline, no fake field


def access_line(record: LedgerRecord, json_format: bool) -> str:
    """One request as one log line: ``key=value`` pairs, or a JSON object."""
    fields = access_fields(record)
    if json_format:
        return orjson.dumps(fields).decode()
    return " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())


def log_request(record: LedgerRecord, logger: logging.Logger | None = None) -> None:
    """Write the access line of a finished request (at info on ``gateway.access``; nothing when that is off).

    The text line is the message; the JSON formatter of :func:`configure_logging` writes the fields instead."""
    log = logger or logging.getLogger(ACCESS_LOGGER)
    if log.isEnabledFor(logging.INFO):
        log.info("%s", access_line(record, False), extra={"access": access_fields(record)})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger and message, or an access line's own fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            out.update(access)
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
        "formatters": {"text": {"format": TEXT_FORMAT}, "json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "json" if log_format == "json" else "text"}},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error")},
    }


def configure_logging(level: str, log_format: str) -> None:
    """Apply :func:`logging_config` to this process."""
    logging.config.dictConfig(logging_config(level, log_format))
