"""Logging set-up: the noise nobody can act on stays out, everything else gets through."""

from __future__ import annotations

import logging

import pytest

from broker.logs import configure_logging


def test_asyncios_ssl_eof_note_is_dropped_and_other_asyncio_warnings_are_kept(
    capsys: pytest.CaptureFixture[str],
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
