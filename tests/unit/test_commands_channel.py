"""The bridge's control channel without NATS: what it remembers in control.sqlite3 and
what it queues in its status outbox, across redeliveries, replays and restarts."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from broker.protocol.command_specs import BridgeConfigure
from broker.protocol.commands import (
    CommandSigner,
    generate_key_pair,
    load_private_key,
    new_envelope,
)
from broker.protocol.events import CommandStatusReport, decode_event
from broker.protocol.topology import Topology
from broker.settings import ControlSettings
from edge_bridge.commanding import ControlChannel


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        private, self.public = generate_key_pair(tmp / "keys")
        self.signer = CommandSigner(load_private_key(private), issuer="test")
        self.applied: list[BridgeConfigure] = []

    async def configure(self, change: BridgeConfigure) -> dict[str, Any]:
        self.applied.append(change)
        return {"linger_ms": change.linger_ms}

    def channel(self) -> ControlChannel:
        return ControlChannel(
            edge_id="edge-1", topology=Topology(), directory=self.tmp / "buffer",
            settings=ControlSettings(public_key_file=self.public), registry=CollectorRegistry(),
            configure=self.configure,
        )

    def command(self, linger_ms: float = 5, **overrides: Any) -> tuple[str, bytes]:
        fields: dict[str, Any] = {"edge": "edge-1", "kind": "bridge.configure",
                                  "spec": {"linger_ms": linger_ms}, "ttl_s": 60,
                                  "issuer": "test"}
        fields.update(overrides)
        env = new_envelope(**fields)
        return env.id, self.signer.sign(env)[0]


async def outbox(channel: ControlChannel) -> list[CommandStatusReport]:
    events = [decode_event(data) for _, data in await channel.store.outbox(100)]
    assert all(isinstance(e, CommandStatusReport) for e in events)
    return events  # type: ignore[return-value]


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


async def test_a_command_is_applied_once_and_reported_delivered_then_applied(h: Harness) -> None:
    command_id, data = h.command()
    async with h.channel() as channel:
        assert await channel.handle(data, stream_seq=1) == "applied"
        events = await outbox(channel)
    assert [(e.command_id, e.status) for e in events] == [(command_id, "delivered"),
                                                          (command_id, "applied")]
    assert events[1].result == {"linger_ms": 5.0}
    assert len(h.applied) == 1


async def test_a_redelivery_is_not_applied_again_but_reported_again_identically(
        h: Harness) -> None:
    """Same message (same stream sequence), even after a restart: the stored outcome is
    re-reported with its original time, so the cloud stores it once."""
    _, data = h.command()
    async with h.channel() as channel:
        await channel.handle(data, stream_seq=1)
        assert await channel.handle(data, stream_seq=1) == "redelivered"
    async with h.channel() as channel:  # a restart
        assert await channel.handle(data, stream_seq=1) == "redelivered"
        events = await outbox(channel)
    assert [e.status for e in events] == ["delivered", "applied", "applied", "applied"]
    assert len({e.reported_at for e in events[1:]}) == 1
    assert len(h.applied) == 1


async def test_the_same_id_in_another_message_is_a_replay(h: Harness) -> None:
    command_id, data = h.command()
    async with h.channel() as channel:
        await channel.handle(data, stream_seq=1)
        assert await channel.handle(data, stream_seq=7) == "rejected"
        replay = (await outbox(channel))[-1]
    assert (replay.command_id, replay.code) == (command_id, "replay")
    assert "already received" in replay.reason
    assert len(h.applied) == 1


async def test_a_forgery_is_reported_but_does_not_burn_the_real_commands_id(
        h: Harness) -> None:
    """A message with a real command's id but a rogue signature is refused and not
    remembered: the real command, arriving later, still applies."""
    command_id, real = h.command()
    rogue = CommandSigner(Ed25519PrivateKey.generate(), issuer="mallory")
    env = new_envelope(edge="edge-1", kind="bridge.configure", spec={"linger_ms": 1},
                       ttl_s=60, issuer="mallory", command_id=command_id)
    async with h.channel() as channel:
        assert await channel.handle(rogue.sign(env)[0], stream_seq=1) == "rejected"
        assert await channel.store.lookup(command_id) is None
        assert await channel.handle(real, stream_seq=2) == "applied"
        events = await outbox(channel)
    assert [(e.status, e.code) for e in events] == [
        ("rejected", "unknown_key"), ("delivered", ""), ("applied", "")]


async def test_a_command_interrupted_mid_apply_is_applied_again_after_a_restart(
        h: Harness) -> None:
    """Found `applying` (the bridge died inside apply): every kind converges, so it is
    applied again - and reported once more as applied, without a second `delivered`."""
    command_id, data = h.command()

    async def crash(change: BridgeConfigure) -> dict[str, Any]:
        raise KeyboardInterrupt  # stands in for SIGKILL mid-apply

    async with h.channel() as channel:
        channel.appliers._configure = crash
        with pytest.raises(KeyboardInterrupt):
            await channel.handle(data, stream_seq=3)
        assert (await channel.store.lookup(command_id)).state == "applying"  # type: ignore[union-attr]
    async with h.channel() as channel:
        assert await channel.handle(data, stream_seq=3) == "applied"
        events = await outbox(channel)
    assert [e.status for e in events] == ["delivered", "applied"]
    assert len(h.applied) == 1


async def test_an_expired_command_is_remembered_and_reported_expired(h: Harness) -> None:
    command_id, data = h.command(ttl_s=0.001, now=1.0)
    async with h.channel() as channel:
        assert await channel.handle(data, stream_seq=1) == "expired"
        assert (await channel.store.lookup(command_id)).state == "expired"  # type: ignore[union-attr]
        [event] = await outbox(channel)
    assert event.code == "expired" and h.applied == []


def test_a_bridge_that_takes_commands_does_not_import_kubernetes_until_it_needs_it(
        tmp_path: Path) -> None:
    """The official client is heavy; an idle bridge (or one only taking bridge.configure)
    never imports it."""
    _, public = generate_key_pair(tmp_path / "keys")
    script = textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        from broker.settings import BridgeSettings, ControlSettings, NatsSettings
        from edge_bridge.bridge import Bridge

        async def main():
            settings = BridgeSettings(buffer_dir=Path({str(tmp_path / 'b')!r}), port=0,
                                      control=ControlSettings(public_key_file=Path({str(public)!r})))
            async with Bridge(settings, NatsSettings()) as bridge:
                assert bridge.control is not None
        asyncio.run(main())
        assert "kubernetes" not in sys.modules, "kubernetes imported eagerly"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "ok"
