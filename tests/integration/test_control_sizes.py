"""Commands and desired states an edge could never take are refused at the API, and one
that cannot be published does not hold back the others.

An edge refuses a signed message over ``MAX_COMMAND_BYTES`` unread (so it could not even
report on it), and past nats-server's 1 MiB limit the publish itself fails: before, the
API took such a command (its body limit is 1 MiB), and its republish loop, oldest first,
stopped at the first failure, so every later command to every edge stayed unpublished
until the big one expired (up to 7 days)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.pg_connecting import connected
from broker.protocol.commands import MAX_COMMAND_BYTES
from broker.runtime.embedded_nats import EmbeddedNats
from tests.integration.control_harness import ControlPlane, control_plane
from tests.integration.harness import running_bridge
from tests.support.waiting import until


@pytest.fixture
async def plane(tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
                ) -> AsyncIterator[ControlPlane]:
    async with control_plane(tmp_path, nats_server.url, pg_dsn) as the_plane, \
            running_bridge(the_plane.bridge_settings("edge-1"), nats_server.url):
        await the_plane.wait_edge("edge-1")
        yield the_plane


async def commands_stored(dsn: str) -> int:
    async with connected(dsn) as conn:
        return int(await conn.fetchval("SELECT count(*) FROM commands"))


async def test_a_command_an_edge_would_refuse_for_its_size_is_413(plane: ControlPlane) -> None:
    before = await commands_stored(plane.pg_dsn)
    big = await plane.http.post("/v1/edges/edge-1/commands", json={
        "kind": "configmap.patch",
        "spec": {"namespace": "prod", "name": "cfg", "data": {"k": "v" * MAX_COMMAND_BYTES}}})
    assert big.status_code == 413, big.text
    assert big.json()["error"] == "request_too_large"
    assert f"at most {MAX_COMMAND_BYTES}" in big.json()["message"]
    assert await commands_stored(plane.pg_dsn) == before
    small = await plane.issue("edge-1", "bridge.configure", {"linger_ms": 7})
    await plane.wait_status(small, ("applied",))


async def test_a_command_that_cannot_be_published_holds_back_no_other(
    plane: ControlPlane,
) -> None:
    """A pending row that can never be published (here one over nats-server's message
    limit, as an older API stored them), oldest of all: the republish round goes past it."""
    small = await plane.issue("edge-1", "bridge.configure", {"linger_ms": 9})
    await plane.wait_status(small, ("applied",))
    async with connected(plane.pg_dsn) as conn:
        await conn.execute(
            "INSERT INTO commands (id, edge_id, kind, spec, issuer, digest, signed, issued_at,"
            " expires_at) VALUES ($1, 'edge-1', 'bridge.configure', '{}', 'test', 'x', $2,"
            " now() - interval '1 minute', now() + interval '1 hour')",
            uuid.uuid4(), b"x" * (1100 * 1024))
        # The small command as it stands when its first publish failed: pending, unpublished.
        await conn.execute("UPDATE commands SET published_at = NULL, status = 'pending'"
                           " WHERE id = $1", uuid.UUID(small))

        async def republished() -> bool:
            return await conn.fetchval(
                "SELECT published_at IS NOT NULL FROM commands WHERE id = $1",
                uuid.UUID(small)) is True

        await until(republished, timeout=15, message="the small command stayed unpublished")
        # The row that can never go is failed, with the reason, not retried for days.
        big = await conn.fetchrow("SELECT status, code, reason FROM commands"
                                  " WHERE octet_length(signed) > $1", MAX_COMMAND_BYTES)
        assert (big["status"], big["code"]) == ("failed", "too_large")
        assert f"at most {MAX_COMMAND_BYTES}" in big["reason"]


async def test_a_desired_document_an_edge_would_refuse_for_its_size_is_413(
    plane: ControlPlane,
) -> None:
    big = await plane.http.post("/v1/desired/edges/edge-1", json={"document": {
        "configmaps": {"prod/c": {"k": "v" * MAX_COMMAND_BYTES}}}})
    assert big.status_code == 413, big.text
    assert big.json()["error"] == "request_too_large"
