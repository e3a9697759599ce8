"""Logging set-up, done once by each entry point (never at import time).

Production logs are JSON lines with ISO UTC timestamps and contextvars merged
in; ``console`` is for people at a terminal. Standard-library loggers (uvicorn,
asyncio, nats) are routed through the same renderer.

Context is bound once, not repeated at every call: a service binds its fields
through contextvars (the bridge its ``edge``; see
:meth:`broker.service.Service.bound_log_context`), and every line logged while
it opens, serves or closes, in any of its tasks, carries them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure_logging", "set_level"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is when a line is written, not the object it was
    when logging was configured (a test runner, or an embedding program, may swap it and
    close the old one)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_STDERR: Any = _CurrentStderr()


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog and the standard library logging for this process."""
    numeric = _LEVELS.get(level.lower(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        # A traceback without the frames' local variables: rich's default printed them,
        # and with them a request's bearer token and the secrets of its body (an
        # uncaught error in the API wrote both to `edgesync up`'s log).
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(),
                                           exception_formatter=structlog.dev.plain_traceback)
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_STDERR),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(_STDERR)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        # A library's exception (uvicorn's "Exception in ASGI application") as the
        # traceback's text: in JSON it was the repr of the exc_info tuple, no traceback.
        processor=renderer, foreign_pre_chain=[*shared, structlog.processors.format_exc_info]
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO) if numeric > logging.DEBUG else numeric)
    for noisy in ("uvicorn.access", "nats", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _SslEofNote) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_SslEofNote())


class _SslEofNote(logging.Filter):
    """Drops asyncio's "returning true from eof_received() has no effect when using
    ssl": nats-py's protocol returns True on every TLS connection (to half-close), and
    asyncio warns each time. It is not a fault; left in, every TLS connect of
    ``edgesync up`` would print a warning an operator cannot act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


def set_level(level: str) -> None:
    """Change the log level live (``bridge.configure``)."""
    numeric = _LEVELS.get(level.lower(), logging.INFO)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(numeric))
    logging.getLogger().setLevel(numeric)
