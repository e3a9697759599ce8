"""What the edge refuses: forged signatures, another edge's command, expired commands,
replays of an applied id, and allow-list violations - each reported with a reason,
none of them touching the cluster.

The forgeries are what an attacker with publish rights on NATS could send: messages
put straight on ``es.ctl.edge-1``, some with ids of real commands.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import nats
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.pg_connecting import connected
from broker.protocol.commands import CommandSigner, SignedCommand, load_private_key, new_envelope
from broker.runtime.embedded_nats import EmbeddedNats
from tests.helpers import until
from tests.integration.control_harness import (
    CONFIGMAPS,
    DEPLOYMENTS,
    ControlPlane,
    control_plane,
    kube_emulator,
)
from tests.integration.harness import running_bridge

WEB = {"namespace": "prod", "name": "web"}


async def reports(dsn: str, command_id: str) -> list[dict[str, Any]]:
    """The status reports the cloud received about an id (whether or not it has a row)."""
    async with connected(dsn) as conn:
        rows = await conn.fetch("SELECT edge_id, status, code, reason, effective"
                                " FROM command_events WHERE command_id = $1 ORDER BY id",
                                command_id)
    return [dict(r) for r in rows]


async def wait_report(plane: ControlPlane, command_id: str, status: str
                      ) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        return next((r for r in await reports(plane.pg_dsn, command_id)
                     if r["status"] == status), None)
    result: dict[str, Any] = await until(found, timeout=15, interval=0.05,
                                         message=f"no {status} report for {command_id}")
    return result


async def test_forged_misaddressed_expired_replayed_and_disallowed_commands_are_refused(
        tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str) -> None:
    """Each refusal is reported with a reason code and text; the command rows the cloud
    issued show it; the emulator's objects keep their version."""
    async with (
        kube_emulator(tmp_path) as kube,
        control_plane(tmp_path, nats_server.url, pg_dsn, kubeconfig=kube.kubeconfig) as plane,
        running_bridge(plane.bridge_settings(), nats_server.url),
    ):
        await plane.wait_edge("edge-1")
        # A legitimate command first, to replay later.
        original = await plane.issue("edge-1", "deployment.scale", {**WEB, "replicas": 3})
        assert (await plane.wait_status(original))["result"]["replicas"] == 3
        versions = {
            "web": kube.versions(DEPLOYMENTS, "prod", "web"),
            "coredns": kube.versions(DEPLOYMENTS, "kube-system", "coredns"),
            "settings": kube.versions(CONFIGMAPS, "prod", "settings"),
        }
        async with connected(pg_dsn) as conn:
            signed_original = await conn.fetchval(
                "SELECT signed FROM commands WHERE id = $1::uuid", original)
        good_key = load_private_key(plane.private_key)
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        subject = "es.ctl.edge-1"

        # 1. Signed by a key the edge does not trust (a rogue or stale cloud): the row
        #    the rogue issuer created ends `rejected`.
        rogue = CommandSigner(Ed25519PrivateKey.generate(), issuer="mallory")
        forged_row, _ = await plane.api.issue("edge-1", "deployment.scale",
                                              {**WEB, "replicas": 0}, signer=rogue)
        forged = await plane.wait_status(str(forged_row["id"]), ("rejected",))
        assert forged["code"] == "unknown_key"
        assert "does not trust" in forged["reason"]

        # 2. A real signature over a tampered payload.
        env = new_envelope(edge="edge-1", kind="deployment.scale",
                           spec={**WEB, "replicas": 1}, ttl_s=60, issuer="cloud")
        data, _ = CommandSigner(good_key, issuer="cloud").sign(env)
        msg = msgspec.msgpack.decode(data, type=SignedCommand)
        tampered = SignedCommand(v=1, key_id=msg.key_id, sig=msg.sig,
                                 payload=msg.payload.replace(b'"replicas":1', b'"replicas":9'))
        await js.publish(subject, msgspec.msgpack.encode(tampered))
        report = await wait_report(plane, env.id, "rejected")
        assert report["code"] == "bad_signature" and not report["effective"]

        # 3. Another edge's authentic command, replayed onto edge-1's subject: the command
        #    (edge-2's) is not changed by edge-1's report.
        other_row, _ = await plane.api.issue("edge-2", "deployment.scale",
                                             {**WEB, "replicas": 7})
        await js.publish(subject, bytes(other_row["signed"]))
        report = await wait_report(plane, str(other_row["id"]), "rejected")
        assert report["edge_id"] == "edge-1" and report["code"] == "wrong_edge"
        assert "addressed to edge 'edge-2'" in report["reason"]
        assert (await plane.command(str(other_row["id"])))["status"] == "pending"

        # 4. Authentic and addressed to edge-1, but expired before it arrived.
        stale = new_envelope(edge="edge-1", kind="deployment.scale",
                             spec={**WEB, "replicas": 1}, ttl_s=30, issuer="cloud",
                             now=time.time() - 60)
        await js.publish(subject, CommandSigner(good_key, issuer="cloud").sign(stale)[0])
        report = await wait_report(plane, stale.id, "expired")
        assert report["code"] == "expired" and "expired at" in report["reason"]

        # 5. The applied command's exact message, published again: a replay.
        await js.publish(subject, bytes(signed_original))
        report = await wait_report(plane, original, "rejected")
        assert report["code"] == "replay" and not report["effective"]
        replayed = await plane.command(original)
        assert replayed["status"] == "applied"  # the outcome stands
        assert [h["status"] for h in replayed["history"]] == ["delivered", "applied",
                                                              "rejected"]

        # 6. Allow-list: a namespace, then a kind, the edge does not allow.
        denied_ns = await plane.issue("edge-1", "deployment.restart",
                                      {"namespace": "kube-system", "name": "coredns"})
        denied = await plane.wait_status(denied_ns, ("rejected",))
        assert denied["code"] == "not_allowed"
        assert "namespace 'kube-system' is not allowed" in denied["reason"]
        await nc.close()

    assert {
        "web": kube.versions(DEPLOYMENTS, "prod", "web"),
        "coredns": kube.versions(DEPLOYMENTS, "kube-system", "coredns"),
        "settings": kube.versions(CONFIGMAPS, "prod", "settings"),
    } == versions
    assert kube.writes("prod", "web") == 1  # the original scale, once


async def test_a_kind_the_edge_does_not_allow_is_rejected(
        tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str) -> None:
    """An edge that only takes bridge.configure refuses a ConfigMap patch, naming its list."""
    async with (
        kube_emulator(tmp_path) as kube,
        control_plane(tmp_path, nats_server.url, pg_dsn, kubeconfig=kube.kubeconfig) as plane,
        running_bridge(plane.bridge_settings(allowed_kinds=["bridge.configure"]),
                       nats_server.url),
    ):
        await plane.wait_edge("edge-1")
        command_id = await plane.issue("edge-1", "configmap.patch", {
            "namespace": "prod", "name": "settings", "data": {"color": "red"}})
        refused = await plane.wait_status(command_id, ("rejected",))
        assert refused["reason"] == (
            "kind 'configmap.patch' is not allowed on this edge (allowed: bridge.configure)")
        assert kube.obj(CONFIGMAPS, "prod", "settings")["data"]["color"] == "blue"
        assert kube.versions(CONFIGMAPS, "prod", "settings") == 1
