"""``edgesync edges add`` right after its own reload: nats-server may refuse the admin's
connection for a moment ('Authorization Violation') while it applies the new
authorization, so the control consumer's creation retries that refusal for a few
seconds (broker/cli/edges.py); without a reload, and for any other error, it fails at
once. The refusal is made real here: the admin's seed file holds a key the server
does not know until the test puts the right one back, once the server has refused it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats.errors
import pytest

from broker.cli import edges
from broker.connecting import connect_options
from broker.durable_files import write_private
from broker.identities import new_user_seed
from broker.protocol.permissions import inbox_prefix
from broker.protocol.topology import Topology
from broker.runtime.secured_nats import SecuredNats
from broker.settings import NatsSettings
from tests.support import until

T = Topology()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[SecuredNats]:
    async with SecuredNats(tmp_path / "state", T, log_file=tmp_path / "nats.log") as s:
        s.identities.add_edge("e1")
        await s.server.reload()
        yield s


def _refusals(log_file: Path) -> int:
    text = log_file.read_text(errors="replace").lower() if log_file.exists() else ""
    return text.count("authorization violation") + text.count("authentication error")


async def _has_consumer(server: SecuredNats, edge: str) -> bool:
    settings = server.settings_for("admin")
    nc = await nats.connect(settings.url, allow_reconnect=False, connect_timeout=3,
                            **connect_options(settings, inbox_prefix=inbox_prefix(T, "admin")))
    try:
        info = await nc.jetstream(timeout=5).consumer_info(T.control_stream,
                                                           T.control_durable(edge))
        return bool(info.name == T.control_durable(edge))
    finally:
        await nc.close()


def _refused_admin(server: SecuredNats) -> tuple[NatsSettings, bytes]:
    """The admin's settings, its seed file now holding a key the server does not know,
    and the right seed (to put back)."""
    admin = server.settings_for("admin")
    assert admin.credentials_file is not None
    good = admin.credentials_file.read_bytes()
    write_private(admin.credentials_file, new_user_seed())
    return admin, good


async def test_a_refusal_right_after_the_reload_is_retried_until_it_passes(
    server: SecuredNats, tmp_path: Path,
) -> None:
    admin, good = _refused_admin(server)
    assert admin.credentials_file is not None
    before = _refusals(tmp_path / "nats.log")
    creating = asyncio.create_task(
        edges._create_control_consumer(admin, T, "e1", just_reloaded=True))
    try:
        await until(lambda: _refusals(tmp_path / "nats.log") > before, timeout=10,
                    message="the server never refused the unknown admin key")
        assert not creating.done(), creating  # refused, and still retrying
        write_private(admin.credentials_file, good)  # the "reload" has settled
        await asyncio.wait_for(creating, timeout=10)
    finally:
        creating.cancel()
    assert await _has_consumer(server, "e1")


async def test_without_a_reload_a_refusal_fails_at_once(server: SecuredNats) -> None:
    admin, _ = _refused_admin(server)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await asyncio.wait_for(
            edges._create_control_consumer(admin, T, "e1", just_reloaded=False), timeout=10)


async def test_a_refusal_that_lasts_past_the_settle_time_fails(
    server: SecuredNats, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(edges, "_RELOAD_SETTLE_S", 0.5)
    admin, _ = _refused_admin(server)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await asyncio.wait_for(
            edges._create_control_consumer(admin, T, "e1", just_reloaded=True), timeout=10)
