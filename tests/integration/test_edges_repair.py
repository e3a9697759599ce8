"""``edgesync edges repair``: after JetStream lost its state (a store wiped or put back
from an older copy) only the admin may make an edge's control consumer again (the
ingest recreates the streams, an edge may only pull); ``repair`` creates each one
that is missing, over one connection, and leaves those that exist alone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.js.errors import NotFoundError
from typer.testing import CliRunner

from broker.cli.edges import edges_app
from broker.connecting import connect_options
from broker.protocol.permissions import inbox_prefix
from broker.protocol.topology import Topology
from broker.runtime.secured_nats import SecuredNats, restore_control_consumers

T = Topology()
EDGES = ("e1", "e2", "e3")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[SecuredNats]:
    async with SecuredNats(tmp_path / "state", T, log_file=tmp_path / "nats.log") as s:
        for edge in EDGES:
            s.identities.add_edge(edge)
        await s.server.reload()
        yield s


async def _admin_js(server: SecuredNats) -> tuple[nats.NATS, nats.js.JetStreamContext]:
    settings = server.settings_for("admin")
    nc = await nats.connect(settings.url, allow_reconnect=False, connect_timeout=3,
                            **connect_options(settings, inbox_prefix=inbox_prefix(T, "admin")))
    return nc, nc.jetstream(timeout=5)


async def _consumers(server: SecuredNats) -> dict[str, object]:
    """Each edge's control consumer's creation time, None where it is missing."""
    nc, js = await _admin_js(server)
    try:
        found: dict[str, object] = {}
        for edge in EDGES:
            try:
                found[edge] = (await js.consumer_info(T.control_stream,
                                                      T.control_durable(edge))).created
            except NotFoundError:
                found[edge] = None
        return found
    finally:
        await nc.close()


async def test_repair_creates_only_the_missing_consumers(server: SecuredNats) -> None:
    admin = server.settings_for("admin")
    assert await restore_control_consumers(admin, T, EDGES) == list(EDGES)
    before = await _consumers(server)
    assert all(before.values())
    nc, js = await _admin_js(server)
    try:
        await js.delete_consumer(T.control_stream, T.control_durable("e2"))
    finally:
        await nc.close()
    assert await restore_control_consumers(admin, T, EDGES) == ["e2"]
    after = await _consumers(server)
    assert after["e2"] is not None
    assert after["e1"] == before["e1"] and after["e3"] == before["e3"]  # left alone
    assert await restore_control_consumers(admin, T, EDGES) == []


async def test_repair_makes_the_control_stream_and_every_consumer_after_a_wipe(
    server: SecuredNats,
) -> None:
    admin = server.settings_for("admin")
    await restore_control_consumers(admin, T, EDGES)
    nc, js = await _admin_js(server)
    try:
        await js.delete_stream(T.control_stream)  # what a wiped store leaves
    finally:
        await nc.close()
    assert await restore_control_consumers(admin, T, EDGES) == list(EDGES)
    assert all((await _consumers(server)).values())


async def test_edges_repair_command_reports_what_it_created(
    server: SecuredNats, tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    admin = server.settings_for("admin")
    (state / "runtime.json").write_text(json.dumps(
        {"nats_url": admin.url, "nats_ca_file": str(admin.ca_file)}))
    runner = CliRunner()
    # The CLI runs its own event loop: from a worker thread, not inside this test's.
    first = await asyncio.to_thread(runner.invoke, edges_app,
                                    ["repair", "--state-dir", str(state)])
    assert first.exit_code == 0, first.output
    assert "created 3 missing control consumer(s): e1, e2, e3" in first.output
    assert all((await _consumers(server)).values())
    again = await asyncio.to_thread(runner.invoke, edges_app,
                                    ["repair", "--state-dir", str(state)])
    assert again.exit_code == 0, again.output
    assert "created" not in again.output
    assert "3 of 3 edges' control consumers were in place" in again.output


def test_edges_repair_without_an_auth_directory_says_where_to_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(edges_app, ["repair", "--state-dir", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "--state-dir" in result.output
    assert not (tmp_path / "none").exists()  # nothing minted on the spot
