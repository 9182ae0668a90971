"""Logging setup: human text lines, or one JSON object per line for a log shipper.

``server.log_format = "json"`` gives each line ``time`` (ISO 8601 UTC),
``level``, ``logger``, ``event`` (the message), and, inside a call, its
``call_sid`` and ``business``. Those two come from a context variable set when
the call's ``start`` arrives (``set_call``): Trio copies the context into every
task a call's nursery starts, so each of the call's log lines carries them
without any call site passing them.

httpx logs one INFO line per request (each LLM turn); that is noise at a
hundred calls, so its logger starts at WARNING.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys

__all__ = ["JsonFormatter", "set_call", "setup_logging"]

_CALL: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("agentd_call", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Third-party loggers that are chatty at INFO.
QUIET_LOGGERS = ("httpx", "httpcore")


def set_call(call_sid: str, business: str) -> None:
    """Tag the log lines of the current task, and of tasks it starts later, with this call."""
    _CALL.set((call_sid, business))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, event, call_sid, business (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        line = {"time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "level": record.levelname, "logger": record.name, "event": record.getMessage()}
        call = _CALL.get()
        if call is not None:
            line["call_sid"], line["business"] = call
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Configure the root logger once: to stderr, in `log_format` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
