"""How the SDK logs: through the standard library, never to stdout, never fatally.

The SDK is a library inside someone else's application: its lines go to the
``edge_bridge.sdk`` loggers, whose level and destination the application's
logging configuration decides; each retry is a debug line; nothing is printed
on the application's stdout; and a log handler that fails cannot stop a record
from settling. The bridge is "unreachable" as a loopback port that refuses
connections; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_bridge.sdk import EdgeClient, SendFailed, SyncEdgeClient
from tests.support import refused_port

ROOT = Path(__file__).resolve().parents[2]
RETRY_TIMEOUT_S = 0.3
"""Long enough for a few retries (backoff starts at 50 ms), short for the test."""
DEADLINE_S = 30.0
"""Generous bound on what takes about a second; the bug was 'never'."""

_APPLICATION = """
import asyncio, sys
from edge_bridge.sdk import EdgeClient, SendFailed, SyncEdgeClient

client_kind, url, retry_timeout_s = sys.argv[1], sys.argv[2], float(sys.argv[3])

async def main() -> None:
    async with EdgeClient(url, retry_timeout_s=retry_timeout_s) as client:
        client.send("telemetry", {"i": 1})
        try:
            await client.flush()
        except SendFailed as failed:
            print("outcome", failed.by_reason, file=sys.stderr)

if client_kind == "async":
    asyncio.run(main())
else:
    with SyncEdgeClient(url, retry_timeout_s=retry_timeout_s) as client:
        client.send("telemetry", {"i": 1})
        try:
            client.flush()
        except SendFailed as failed:
            print("outcome", failed.by_reason, file=sys.stderr)
"""
"""An application that configures no logging, publishes to an unreachable bridge and
reports how its flush ended on stderr."""


def _run_application(client_kind: str, url: str, *,
                     stdout: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    process = subprocess.Popen([sys.executable, "-c", _APPLICATION, client_kind, url,
                                str(RETRY_TIMEOUT_S)],
                               stdout=stdout, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = process.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"the application's flush never returned; its stderr:\n{err}")
    return subprocess.CompletedProcess(process.args, process.returncode, out or "", err)


@pytest.mark.parametrize("client_kind", ["async", "sync"])
def test_with_stdout_closed_an_unreachable_bridge_still_lets_flush_return(
    client_kind: str,
) -> None:
    """An application piped into ``head -1`` (its stdout closed) whose bridge is down:
    ``flush`` returns with ``SendFailed`` once ``retry_timeout_s`` has passed. (The SDK
    printed its retries to stdout, the broken pipe killed the sender, and ``flush``
    waited forever.)"""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone: any write to stdout raises BrokenPipeError
    try:
        with refused_port() as port:
            done = _run_application(client_kind, f"http://127.0.0.1:{port}", stdout=write_end)
    finally:
        os.close(write_end)
    assert done.returncode == 0, done.stderr
    assert "outcome {'unavailable': 1}" in done.stderr


def test_an_application_that_configures_no_logging_sees_the_outage_on_stderr_only(
) -> None:
    """Unconfigured, Python's last-resort handler shows the SDK's warnings on stderr;
    the retries (debug) are not shown, and nothing at all reaches stdout."""
    with refused_port() as port:
        done = _run_application("async", f"http://127.0.0.1:{port}", stdout=subprocess.PIPE)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "sdk_bridge_unavailable" in done.stderr
    assert "sdk_batch_failed" in done.stderr
    assert "sdk_request_retried" not in done.stderr


@pytest.fixture
def sdk_debug(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture the SDK's loggers down to debug, as an application enabling them would."""
    caplog.set_level(logging.DEBUG, logger="edge_bridge.sdk")
    return caplog


async def send_one_through_an_outage() -> EdgeClient:
    """One record sent to a bridge that refuses connections, until ``flush`` gives up
    (``SendFailed``); returns the closed client."""
    with refused_port() as port:
        async with EdgeClient(f"http://127.0.0.1:{port}", linger_ms=0,
                              retry_timeout_s=RETRY_TIMEOUT_S) as client:
            client.send("telemetry", {"i": 1})
            async with asyncio.timeout(DEADLINE_S):
                with pytest.raises(SendFailed):
                    await client.flush()
    return client


async def test_an_unreachable_bridge_logs_retries_at_debug_and_writes_nothing_to_stdout(
    sdk_debug: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    """Every retry is one debug record ``sdk_request_retried`` on an ``edge_bridge.sdk``
    logger, with its context as ``key=value`` in the message and as record attributes;
    the outage's start is one warning; stdout stays empty."""
    client = await send_one_through_an_outage()
    assert capfd.readouterr().out == ""
    retried = [r for r in sdk_debug.records if getattr(r, "event", None) == "sdk_request_retried"]
    assert len(retried) >= 2  # RETRY_TIMEOUT_S allows several
    for record in retried:
        assert record.levelno == logging.DEBUG
        assert record.name == "edge_bridge.sdk.client"
        assert record.getMessage().startswith(
            f"sdk_request_retried producer={client.producer_id!r} stream='telemetry' ")
        assert record.stream == "telemetry"  # type: ignore[attr-defined]  # from extra
        assert record.attempt >= 1  # type: ignore[attr-defined]
        assert "refused" in record.reason.lower()  # type: ignore[attr-defined]
    assert {r.attempt for r in retried} == set(range(1, len(retried) + 1))  # type: ignore[attr-defined]
    down = [r for r in sdk_debug.records if getattr(r, "event", None) == "sdk_bridge_unavailable"]
    assert [(r.name, r.levelno) for r in down] == [("edge_bridge.sdk.client", logging.WARNING)]


async def test_at_info_level_an_outage_logs_its_warning_but_not_its_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What ``logging.basicConfig(level=logging.INFO)`` shows of an outage: the warning
    and the failed batch, and none of the retries."""
    caplog.set_level(logging.INFO)
    await send_one_through_an_outage()
    sdk = [(r.event, r.levelname) for r in caplog.records  # type: ignore[attr-defined]
           if r.name.startswith("edge_bridge.sdk")]
    assert sdk == [("sdk_bridge_unavailable", "WARNING"), ("sdk_batch_failed", "ERROR")]


class _FailingHandler(logging.Handler):
    """An application's handler that raises from ``emit`` (the standard library's
    own handlers catch their errors; nothing makes a third-party one do so)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.calls = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.calls += 1
        raise OSError(32, "Broken pipe")


@pytest.fixture
def failing_handler() -> Iterator[_FailingHandler]:
    logger = logging.getLogger("edge_bridge.sdk")
    handler = _FailingHandler()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_a_log_handler_that_raises_does_not_stop_an_edge_client_settling(
    failing_handler: _FailingHandler,
) -> None:
    """Every SDK log line raises in the handler: ``flush`` still returns (SendFailed
    once the retries run out) and ``close`` still fails what is pending and returns."""
    with refused_port() as port:
        client = EdgeClient(f"http://127.0.0.1:{port}", linger_ms=0,
                            retry_timeout_s=RETRY_TIMEOUT_S, close_timeout_s=0.1)
        async with asyncio.timeout(DEADLINE_S):
            async with client:
                client.send("telemetry", {"i": 1})
                with pytest.raises(SendFailed):
                    await client.flush()
                late = client.publish("telemetry", {"i": 2})
            assert isinstance(late.exception(), Exception)
    assert failing_handler.calls >= 3  # retries, the outage, the failed batch
    assert client.stats.records_failed == 2


def test_a_log_handler_that_raises_does_not_stop_a_sync_client_settling(
    failing_handler: _FailingHandler,
) -> None:
    """The same for ``SyncEdgeClient``, whose client logs from its loop thread."""
    with refused_port() as port, SyncEdgeClient(
            f"http://127.0.0.1:{port}", linger_ms=0, retry_timeout_s=RETRY_TIMEOUT_S,
            close_timeout_s=0.1) as client:
        client.send("telemetry", {"i": 1})
        with pytest.raises(SendFailed):
            client.flush(timeout=DEADLINE_S)
    assert failing_handler.calls >= 3
    assert client.stats.records_failed == 1


def test_a_field_named_like_a_log_record_attribute_is_kept_not_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``extra`` may not set LogRecord's own attributes (the standard library raises,
    and the SDK swallows logging errors): such a field is renamed, the line still logged."""
    from edge_bridge.sdk._log import LOGGER_NAME, EventLogger

    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        EventLogger(LOGGER_NAME).info("sdk_fact", name="n", module="m", records=3)
    [record] = caplog.records
    assert record.getMessage() == "sdk_fact name='n' module='m' records=3"
    assert (record.field_name, record.field_module, record.records) == ("n", "m", 3)  # type: ignore[attr-defined]
