"""Logging set-up: the noise nobody can act on stays out, everything else gets through."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

from broker.logs import configure_logging


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """configure_logging is process-wide: put structlog and the root logger back after,
    so later tests do not log into this test's captured (then closed) stderr."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    asyncio_filters = logging.getLogger("asyncio").filters[:]
    try:
        yield
    finally:
        structlog.configure(**config)
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("asyncio").filters[:] = asyncio_filters


def test_asyncios_ssl_eof_note_is_dropped_and_other_asyncio_warnings_are_kept(
    capsys: pytest.CaptureFixture[str], restored_logging: None,
) -> None:
    """nats-py over TLS makes asyncio warn at every connection; that line is filtered,
    a real asyncio warning is not."""
    configure_logging("info", "json")
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.warning("returning true from eof_received() has no effect when using ssl")
    asyncio_logger.warning("Task was destroyed but it is pending!")
    err = capsys.readouterr().err
    assert "eof_received" not in err
    assert "Task was destroyed but it is pending!" in err
