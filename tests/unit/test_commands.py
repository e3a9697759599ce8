"""The command envelope: canonical encoding, Ed25519 signatures, key files, and the
edge's gate (signature, addressing, expiry, kinds, specs, allow-list)."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.errors import ConfigError
from broker.protocol import command_specs
from broker.protocol.commands import (
    CommandEnvelope,
    CommandRejected,
    CommandSigner,
    SignedCommand,
    canonical_bytes,
    generate_key_pair,
    key_id,
    load_private_key,
    load_public_keys,
    new_envelope,
    open_command,
)
from broker.settings import ControlSettings
from edge_bridge.admission import CommandGate

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def envelope(**overrides: object) -> CommandEnvelope:
    fields: dict[str, object] = {
        "edge": "edge-1", "kind": "deployment.scale",
        "spec": {"namespace": "prod", "name": "web", "replicas": 3},
        "ttl_s": 60.0, "issuer": "test", "now": NOW,
    }
    fields.update(overrides)
    return new_envelope(**fields)  # type: ignore[arg-type]


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_canonical_encoding_is_sorted_compact_utf8_and_stable() -> None:
    """The signed bytes are one fixed spelling: keys sorted at every level, no spaces."""
    env = envelope(spec={"b": 1, "a": {"z": "é", "y": 1.5}})
    data = canonical_bytes(env)
    assert data.startswith(b'{"edge":"edge-1","expires_at":')
    assert b'"spec":{"a":{"y":1.5,"z":"\xc3\xa9"},"b":1}' in data
    assert b" " not in data.replace(b'"issuer":"test"', b"")
    assert canonical_bytes(msgspec.json.decode(data, type=CommandEnvelope)) == data


def test_a_signed_command_opens_with_the_trusted_key(key: Ed25519PrivateKey) -> None:
    """Sign then open: the same envelope, and the digest is SHA-256 of the payload."""
    env = envelope()
    data, digest = CommandSigner(key, issuer="test").sign(env)
    opened = open_command(data, [key.public_key()])
    assert opened.envelope == env
    assert opened.digest == digest == hashlib.sha256(canonical_bytes(env)).hexdigest()


def test_a_signature_by_an_untrusted_key_is_rejected_naming_the_key(
        key: Ed25519PrivateKey) -> None:
    """A key the edge does not trust: ``unknown_key``, and the claimed id is kept."""
    env = envelope()
    data, _ = CommandSigner(Ed25519PrivateKey.generate(), issuer="x").sign(env)
    with pytest.raises(CommandRejected) as info:
        open_command(data, [key.public_key()])
    assert info.value.code == "unknown_key"
    assert info.value.command_id == env.id


def test_a_tampered_payload_fails_the_signature(key: Ed25519PrivateKey) -> None:
    """Changing one byte of the spec (replicas 3 -> 9) breaks the signature."""
    data, _ = CommandSigner(key, issuer="test").sign(envelope())
    signed = msgspec.msgpack.decode(data, type=SignedCommand)
    forged = msgspec.msgpack.encode(SignedCommand(
        v=signed.v, key_id=signed.key_id, payload=signed.payload.replace(b'"replicas":3',
                                                                         b'"replicas":9'),
        sig=signed.sig))
    with pytest.raises(CommandRejected) as info:
        open_command(forged, [key.public_key()])
    assert info.value.code == "bad_signature"


def test_a_validly_signed_but_non_canonical_payload_is_rejected(key: Ed25519PrivateKey) -> None:
    """Even the key holder cannot give one signature two spellings."""
    payload = canonical_bytes(envelope()).replace(b'{"edge"', b'{ "edge"')
    data = msgspec.msgpack.encode(SignedCommand(
        v=1, key_id=key_id(key.public_key()), payload=payload, sig=key.sign(payload)))
    with pytest.raises(CommandRejected) as info:
        open_command(data, [key.public_key()])
    assert info.value.code == "non_canonical"


@pytest.mark.parametrize("data", [b"", b"\x81\xa1v\x01", b"not msgpack at all", b"\xc1" * 10])
def test_garbage_is_malformed_not_a_crash(key: Ed25519PrivateKey, data: bytes) -> None:
    with pytest.raises(CommandRejected) as info:
        open_command(data, [key.public_key()])
    assert info.value.code == "malformed"
    assert info.value.command_id == ""


def test_key_files_round_trip_and_the_private_key_is_owner_only(tmp_path: Path) -> None:
    """`edgesync keys generate` writes PEM files; the private one is mode 0600."""
    private, public = generate_key_pair(tmp_path / "keys")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    loaded = load_private_key(private)
    [trusted] = load_public_keys(public)
    assert key_id(trusted) == key_id(loaded.public_key())
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_key_pair(tmp_path / "keys")


def test_a_public_key_file_may_hold_several_keys_for_rotation(tmp_path: Path) -> None:
    _, old = generate_key_pair(tmp_path, "old")
    _, new = generate_key_pair(tmp_path, "new")
    both = tmp_path / "trusted.pub"
    both.write_bytes(old.read_bytes() + new.read_bytes())
    assert len(load_public_keys(both)) == 2


def test_bad_key_files_are_config_errors_naming_the_file(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("hello")
    with pytest.raises(ConfigError, match=r"bogus\.pem"):
        load_public_keys(bogus)
    with pytest.raises(ConfigError, match=r"bogus\.pem"):
        load_private_key(bogus)
    with pytest.raises(ConfigError, match="missing"):
        load_private_key(tmp_path / "missing.key")


# -- the edge's gate ------------------------------------------------------------------


def gate(key: Ed25519PrivateKey, **control: object) -> CommandGate:
    fields: dict[str, object] = {"allowed_namespaces": ["prod"]}
    fields.update(control)
    return CommandGate(edge_id="edge-1", trusted_keys=[key.public_key()],
                       settings=ControlSettings(**fields))  # type: ignore[arg-type]


def refusal(key: Ed25519PrivateKey, env: CommandEnvelope, now: float = NOW + 1,
            **control: object) -> str:
    g = gate(key, **control)
    data, _ = CommandSigner(key, issuer="test").sign(env)
    with pytest.raises(CommandRejected) as info:
        g.admit(g.open(data), now=now)
    return info.value.code


def test_the_gate_admits_a_valid_allowed_command(key: Ed25519PrivateKey) -> None:
    g = gate(key)
    data, _ = CommandSigner(key, issuer="test").sign(envelope())
    spec = g.admit(g.open(data), now=NOW + 1)
    assert isinstance(spec, command_specs.DeploymentScale) and spec.replicas == 3


def test_the_gate_refuses_another_edges_command(key: Ed25519PrivateKey) -> None:
    assert refusal(key, envelope(edge="edge-2")) == "wrong_edge"


def test_the_gate_refuses_expired_and_far_future_commands(key: Ed25519PrivateKey) -> None:
    assert refusal(key, envelope(ttl_s=10), now=NOW + 10) == "expired"
    assert refusal(key, envelope(now=NOW + 3600), now=NOW) == "not_yet_valid"


@pytest.mark.parametrize(("spec", "control"), [
    ({"namespace": "kube-system", "name": "web", "replicas": 1}, {}),
    ({"namespace": "prod", "name": "db", "replicas": 1}, {"allowed_deployments": ["prod/web*"]}),
    ({"namespace": "prod", "name": "web", "replicas": 1}, {"allowed_kinds": ["bridge.configure"]}),
    ({"namespace": "prod", "name": "web", "replicas": 1}, {"allowed_namespaces": []}),
])
def test_the_allow_list_refuses_namespaces_deployments_and_kinds(
        key: Ed25519PrivateKey, spec: dict[str, object], control: dict[str, object]) -> None:
    assert refusal(key, envelope(spec=spec), **control) == "not_allowed"


def test_an_invalid_signed_spec_is_refused_not_applied(key: Ed25519PrivateKey) -> None:
    """The edge re-validates: a spec the API would have refused is refused here too."""
    bad = envelope(spec={"namespace": "prod", "name": "web", "replicas": -1})
    assert refusal(key, bad) == "invalid_spec"
    assert refusal(key, envelope(kind="deployment.delete")) in ("not_allowed", "unknown_kind")


def test_control_settings_default_kinds_are_exactly_the_known_kinds() -> None:
    assert tuple(ControlSettings().allowed_kinds) == command_specs.KINDS
