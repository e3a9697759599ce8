"""How the SDK logs: through the standard library, so the application decides.

A library must not configure logging. Every SDK line goes to one logger,
``edge_bridge.sdk.client`` (:data:`LOGGER_NAME`, named in docs/sdk.md), which has
no handler and no level of its own: the application's logging configuration
decides what is shown and where. Left
unconfigured, Python's last-resort handler writes warnings and errors to
stderr; debug and info lines (each retry, an outage's end) are not shown.
Nothing is ever written to stdout, which belongs to the application.

A line is one event, a fact in snake_case (``sdk_bridge_unavailable``),
followed by its context as ``key=value`` pairs; the record carries the same in
``extra`` (``record.event`` and one attribute per field) for handlers that
render structured logs.

Logging never fails the SDK. A handler that raises (a stdout closed under a
``StreamHandler`` is caught by the standard library, but a handler of the
application's own whose ``emit`` raises is not) would otherwise propagate into
the sender or settling code that logged, and a sender that dies leaves its
records pending, and ``flush`` waiting, forever.
"""

from __future__ import annotations

import logging
from typing import Final

__all__ = ["LOGGER_NAME", "EventLogger"]

LOGGER_NAME: Final = "edge_bridge.sdk.client"
"""The logger of every SDK line, whichever module writes it: one public name for an
application to configure, not the SDK's private module names."""

_RESERVED: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
"""LogRecord's own attributes: ``extra`` may not set them (the standard library raises),
so a field of such a name goes into ``extra`` as ``field_<name>``."""

_CALLER: Final = 3
"""``stacklevel`` naming the SDK code that logged (not this module) in the record:
``Logger.log`` <- ``EventLogger._log`` <- ``EventLogger.warning`` <- caller."""


class EventLogger:
    """One standard-library logger, written to as events with fields; never raises."""

    __slots__ = ("_logger",)

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def debug(self, event: str, **fields: object) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: object) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: object) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: object) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: object) -> None:
        """An error with the exception being handled (call it from an ``except`` block)."""
        self._log(logging.ERROR, event, fields, exc_info=True)

    def _log(self, level: int, event: str, fields: dict[str, object], *,
             exc_info: bool = False) -> None:
        logger = self._logger
        try:
            if not logger.isEnabledFor(level):
                return
            # A template with lazy arguments, the library idiom: a filter sees the
            # event and field names in record.msg, the values stay in record.args.
            template = " ".join([event, *(f"{name}=%r" for name in fields)])
            extra = {f"field_{name}" if name in _RESERVED else name: value
                     for name, value in fields.items()}
            logger.log(level, template, *fields.values(), exc_info=exc_info,
                       extra={"event": event, **extra}, stacklevel=_CALLER)
        except Exception:  # see the module docstring: never fail the SDK
            pass
