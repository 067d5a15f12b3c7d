"""The access log and the process's log format: one line per finished request, text or JSON.

:func:`access_line` renders a ledger record as one line: request id, team, key id, the model
asked for, the deployment and provider that answered, status, tokens, exact cost in USD, latency
(and time to first token for a stream), cache result. It never carries a secret or any prompt or
answer text (a ledger record holds neither), and every value that came from a client is quoted,
so a line cannot be split or forged. :class:`AccessLog` writes it to the ``gateway.access`` logger
at info; :func:`logging_config` is the logging setup for ``GATEWAY_LOG_FORMAT`` (``text``, or
``json``: one JSON object per line for every logger, an access line's fields at top level), with
one :class:`StderrLines` handler, which writes access lines in batches: an access line reaches
stderr at most :data:`FLUSH_S` after its request finished (so a SIGKILL can lose the last fraction
of a second of them; the ledger, not the log, is the record of what was spent).
"""

from __future__ import annotations

import logging
import logging.config
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

import orjson

from gateway.money import usd_text
from gateway.state.ledger import LedgerRecord

ACCESS_LOGGER = "gateway.access"
FLUSH_S = 0.2                 # the longest an access line waits in :class:`StderrLines`
BUFFER_CHARS = 64 * 1024      # waiting lines written at once when they reach this size




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
    if text.isascii() and text.isidentifier():   # the common case (the gateway's own ids), without the regex
        return text
    return text if _PLAIN.fullmatch(text) else orjson.dumps(text).decode()


class LineParts:
    """The middle of access lines seen before (team, key, model, deployment, provider, route and status:
    a handful of combinations, on every line), quoted once; at most ``limit`` of them."""

    __slots__ = ("seen", "limit")

    def __init__(self, limit: int = 4096) -> None:
        self.seen: dict[tuple[str | None, ...], str] = {}
        self.limit = limit

    def middle(self, r: LedgerRecord) -> str:
        key = (r.team, r.key_id, r.requested_model, r.deployment, r.provider, r.route, r.status)
        text = self.seen.get(key)
        if text is None:
            text = _middle(r)
            if len(self.seen) >= self.limit:
                self.seen.clear()
            self.seen[key] = text
        return text


def _middle(r: LedgerRecord) -> str:
    return (f"team={_q(r.team)} key_id={_q(r.key_id)} model={_q(r.requested_model)} "
            f"deployment={_q(r.deployment or None)} provider={_q(r.provider or None)} route={_q(r.route)} "
            f"status={_q(r.status)}")


def access_line(record: LedgerRecord, json_format: bool, parts: LineParts | None = None, head: str = "") -> str:
    """One request as one log line: ``key=value`` pairs (the fields of :func:`access_fields`), or a JSON object.
    ``parts`` remembers the quoted middle of lines seen before; ``head`` goes before a text line."""
    if json_format:
        return orjson.dumps(access_fields(record)).decode()
    r = record
    # "%g" % x: a third faster than f"{x:g}" on this path, the same text
    ttft = "-" if r.ttft_ms is None else "%g" % r.ttft_ms  # noqa: UP031
    return (f"{head}request_id={_q(r.request_id)} {_middle(r) if parts is None else parts.middle(r)} "
            f"input_tokens={r.input_tokens} output_tokens={r.output_tokens} "
            f"cached_tokens={r.cached_input_tokens} cost_usd={usd_text(r.cost_nano)} "
            f"latency_ms={'%g' % r.latency_ms} "  # noqa: UP031
            f"ttft_ms={ttft} stream={'true' if r.stream else 'false'} cache={r.cache} "   # the gateway's own word
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
        """At info, when that level is on. When the only handler on the way is the process's
        :class:`StderrLines` (what :func:`logging_config` sets up), the line goes to it directly, with no
        log record; otherwise a log record goes to the handlers directly: no caller lookup (``logging``
        would walk the stack for every line), and the line is rendered once, by the formatter that writes it."""
        log = self.logger
        if not log.isEnabledFor(logging.INFO):
            return
        sink = _only_handler(log)
        if sink is not None:
            sink.access(record)
        else:
            log.handle(log.makeRecord(log.name, logging.INFO, "access_log", 0, AccessMessage(record), (), None))


def _only_handler(log: logging.Logger) -> StderrLines | None:
    """The :class:`StderrLines` that every line of ``log`` goes to and nothing else sees, if there is one."""
    found: StderrLines | None = None
    logger: logging.Logger | None = log
    while logger is not None:
        for handler in logger.handlers:
            if found is not None or type(handler) is not StderrLines or logger.filters or handler.filters:
                return None
            found = handler
        if not logger.propagate:
            break
        logger = logger.parent
    return found


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

    def stamp(self, created: float) -> str:
        """``created`` as ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (milliseconds truncated, as ``logging``'s ``msecs``)."""
        return f"{self.utc(created)}.{int((created - int(created)) * 1000):03d}Z"


_MS = tuple(f"{ms:03d}" for ms in range(1000))   # a line's milliseconds, made once


class TextFormatter(logging.Formatter):
    """``<UTC time> <LEVEL> <logger>: <message>``."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = _SecondCache()
        self.parts = LineParts()
        self.head_ms, self.head = -1, ""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.clock.stamp(record.created)} {record.levelname} {record.name}: " \
               f"{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line

    def format_access(self, record: LedgerRecord, created: float) -> str:
        """What :meth:`format` makes of an access log record, without one (the line's head is made once per
        millisecond: requests come several per millisecond)."""
        ms = int(created * 1000)
        if ms != self.head_ms:
            self.head_ms = ms
            self.head = f"{self.clock.utc(created)}.{_MS[ms % 1000]}Z INFO {ACCESS_LOGGER}: "
        return access_line(record, False, self.parts, self.head)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger and message, or an access line's own fields."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = _SecondCache()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": self.clock.stamp(record.created),
                               "level": record.levelname.lower(), "logger": record.name}
        if isinstance(record.msg, AccessMessage):
            out.update(access_fields(record.msg.record))
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()

    def format_access(self, record: LedgerRecord, created: float) -> str:
        """What :meth:`format` makes of an access log record, without one."""
        out = {"ts": self.clock.stamp(created), "level": "info", "logger": ACCESS_LOGGER}
        out.update(access_fields(record))
        return orjson.dumps(out, default=str).decode()


class StderrLines(logging.StreamHandler):  # type: ignore[type-arg]
    """The process's log handler (stderr). Access lines, one per request, wait in memory and are written
    together, every ``flush_s`` (:data:`FLUSH_S`) or at :data:`BUFFER_CHARS`, by one background thread, instead of one
    write and flush each; any other line writes those waiting first and then itself at once, so lines
    keep their order. A clean exit (``logging.shutdown``) writes what waits."""

    def __init__(self, stream: TextIO | None = None, flush_s: float = FLUSH_S) -> None:
        super().__init__(stream)
        self.flush_s = flush_s
        self._waiting: deque[str] = deque()   # appended without the lock (atomic), drained under it
        self._chars = 0                       # about how many characters wait (a threshold, not an account)
        self._flusher: threading.Thread | None = None
        self._rendered_by: logging.Formatter | None = None
        self._render: Callable[[LedgerRecord, float], str] | None = None

    def access(self, record: LedgerRecord) -> None:
        """Queue ``record``'s access line (rendered by this handler's formatter)."""
        fmt = self.formatter
        if fmt is not self._rendered_by:   # the formatter's own access renderer, looked up once per formatter
            self._rendered_by = fmt
            self._render = fmt.format_access if isinstance(fmt, TextFormatter | JsonFormatter) else None
        created = time.time()
        if self._render is not None:
            line = self._render(record, created)
        else:
            line = self.format(logging.makeLogRecord({"name": ACCESS_LOGGER, "levelno": logging.INFO,
                                                      "levelname": "INFO", "msg": AccessMessage(record),
                                                      "created": created}))
        self._waiting.append(line)
        self._chars += len(line)
        if self._chars >= BUFFER_CHARS:
            self.acquire()
            try:
                self._write_waiting()
            finally:
                self.release()
        elif self._flusher is None:
            self._start_flusher()

    def emit(self, record: logging.LogRecord) -> None:   # called with the lock held
        if isinstance(record.msg, AccessMessage):
            try:
                self._queue(self.format(record))
            except Exception:
                self.handleError(record)
            return
        self._write_waiting()
        super().emit(record)

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_waiting()
            super().flush()
        finally:
            self.release()

    def _queue(self, line: str) -> None:   # called with the lock held
        self._waiting.append(line)
        self._chars += len(line)
        if self._chars >= BUFFER_CHARS:
            self._write_waiting()
        elif self._flusher is None:
            self._start_flusher()

    def _start_flusher(self) -> None:
        self._flusher = threading.Thread(target=self._flush_every, name="access-log", daemon=True)
        self._flusher.start()

    def _write_waiting(self) -> None:   # called with the lock held
        waiting = self._waiting
        if not waiting:
            return
        self._chars = 0
        lines = [waiting.popleft() for _ in range(len(waiting))]   # what a request thread adds meanwhile waits
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except Exception:   # stderr gone (closed pipe): logging never takes a request down
            pass

    def _flush_every(self) -> None:
        while True:
            time.sleep(self.flush_s)
            if self._waiting:
                self.acquire()
                try:
                    self._write_waiting()
                finally:
                    self.release()


def logging_config(level: str, log_format: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for this process and every worker (uvicorn applies it in each):
    one stderr handler on the root in ``text`` or ``json``, uvicorn's loggers going through it, the
    access log (``gateway.access``) on whenever the level lets info through."""
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"text": {"()": f"{__name__}.TextFormatter"}, "json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"stderr": {"class": f"{__name__}.StderrLines", "stream": "ext://sys.stderr",
                                "formatter": "json" if log_format == "json" else "text"}},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error")},
    }


def configure_logging(level: str, log_format: str) -> None:
    """Apply :func:`logging_config` to this process."""
    logging.config.dictConfig(logging_config(level, log_format))
