"""A request of the operator API waits a bounded time for one of its PostgreSQL
connections: when PostgreSQL stalls and every connection is busy, the next request is
answered 503 with a JSON body and Retry-After (``api.pool_acquire_timeout_s``) instead
of queueing without end, and the API serves again once PostgreSQL does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from broker.pg_connecting import connected
from broker.runtime.embedded_nats import EmbeddedNats
from tests.helpers import until
from tests.integration.control_harness import ControlPlane, control_plane
from tests.support import database_setting

WAIT_S = 0.5


@pytest.fixture
async def plane(tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
                ) -> AsyncIterator[ControlPlane]:
    async with control_plane(tmp_path, nats_server.url, pg_dsn, pool_size=1,
                             pool_acquire_timeout_s=WAIT_S) as plane:
        yield plane


async def test_a_request_that_cannot_get_a_connection_in_time_is_answered_503(
        plane: ControlPlane) -> None:
    async with connected(plane.pg_dsn) as locker, connected(plane.pg_dsn) as watcher:
        lock = locker.transaction()
        await lock.start()
        try:
            # PostgreSQL stalls on `edges`: the API's one connection waits in the
            # first request's query (the command timeout is 30 s).
            await locker.execute("LOCK TABLE edges IN ACCESS EXCLUSIVE MODE")
            first = asyncio.create_task(plane.http.get("/v1/edges"))

            async def first_waits_on_the_lock() -> bool:
                # Not on `locker`: in its transaction the statistics are a snapshot.
                return bool(await watcher.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query ILIKE '%edges%'"))

            await until(first_waits_on_the_lock, timeout=10,
                        message="the API never blocked on edges")
            started = time.monotonic()
            second = await plane.http.get("/v1/edges")
            waited = time.monotonic() - started
        finally:
            await lock.rollback()
        assert second.status_code == 503, second.text
        assert second.json()["error"] == "unavailable"
        assert "database unavailable" in second.json()["message"]
        assert int(second.headers["Retry-After"]) >= 1
        assert WAIT_S * 0.9 <= waited < 8, waited
        # The first request either had the connection (200 once the lock goes) or lost
        # it to one of the API's own loops blocked the same way (503): either is right.
        assert (await asyncio.wait_for(first, timeout=10)).status_code in (200, 503)
    assert (await plane.http.get("/v1/edges")).status_code == 200  # served again


async def test_a_lock_not_granted_within_lock_timeout_is_answered_503_busy(
        plane: ControlPlane) -> None:
    """A ``lock_timeout`` on the API's session and a maintenance lock on ``edges``: the
    request fails with 55P03, which is no server error (500) but a busy database to
    retry (503, JSON, Retry-After)."""
    # The API's one connection reconnects with the timeout.
    async with (connected(plane.pg_dsn) as locker,
                database_setting(locker, "lock_timeout", "100ms"), locker.transaction()):
        await locker.execute("LOCK TABLE edges IN ACCESS EXCLUSIVE MODE")
        busy = await _answer_mentioning(plane, "database busy")
    assert busy.status_code == 503, busy.text
    assert busy.json()["error"] == "unavailable"
    assert busy.json()["message"].startswith("database busy; retry"), busy.text
    assert int(busy.headers["Retry-After"]) >= 1
    await until(lambda: _served(plane), timeout=10, message="the API did not serve again")


async def _served(plane: ControlPlane) -> bool:
    return (await plane.http.get("/v1/edges")).status_code == 200


async def _answer_mentioning(plane: ControlPlane, text: str) -> httpx.Response:
    """``GET /v1/edges`` until its answer mentions ``text`` (the first ones may meet a
    connection a DBA's setting ended), at most 20 times: the last answer."""
    for _ in range(20):
        answer = await plane.http.get("/v1/edges")
        if text in answer.text:
            break
    return answer


async def test_a_query_canceled_by_statement_timeout_says_so(plane: ControlPlane) -> None:
    """A ``statement_timeout`` the query outlasts (here: waiting on a maintenance lock on
    ``edges``) is 503 with Retry-After, as before, but says what happened and what to
    do: it is a limit of the database, not an outage."""
    async with (connected(plane.pg_dsn) as locker,
                database_setting(locker, "statement_timeout", "200ms"), locker.transaction()):
        await locker.execute("SET LOCAL statement_timeout = 0")
        await locker.execute("LOCK TABLE edges IN ACCESS EXCLUSIVE MODE")
        canceled = await _answer_mentioning(plane, "canceled the query")
    assert canceled.status_code == 503, canceled.text
    assert "statement_timeout" in canceled.json()["message"], canceled.text
    assert "ask for less" in canceled.json()["message"], canceled.text
    assert int(canceled.headers["Retry-After"]) >= 1
    await until(lambda: _served(plane), timeout=10, message="the API did not serve again")
