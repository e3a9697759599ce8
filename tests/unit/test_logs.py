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


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_a_logged_traceback_carries_no_local_variables(
    capsys: pytest.CaptureFixture[str], restored_logging: None, fmt: str,
) -> None:
    """An uncaught error's traceback (uvicorn logs one per failed request) names the
    frames, not their local variables: rich's console traceback printed them, and with
    them a request's bearer token and the secrets of its body. In JSON it is the
    traceback's text (it was the repr of the exc_info tuple, no frames at all)."""
    configure_logging("info", fmt)

    def handle(authorization: str) -> None:
        env = {"DB_PASSWORD": "hunter2-s3cr3t"}  # noqa: F841  # a local, as in a handler
        raise ValueError("Out of range float values are not JSON compliant")

    token = "Bearer " + "eso_secret_token"  # the traceback shows `handle(token)`
    try:
        handle(token)
    except ValueError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    err = capsys.readouterr().err
    assert "Out of range float values are not JSON compliant" in err
    assert "in handle" in err  # the frame is named
    assert "hunter2-s3cr3t" not in err
    assert "eso_secret_token" not in err
