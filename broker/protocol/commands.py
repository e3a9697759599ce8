"""Control commands on the wire: the envelope, its canonical encoding and Ed25519 signing.

An operator's command travels from the cloud API to one edge bridge as a
:class:`SignedCommand` on ``<prefix>.ctl.<edge>``::

    SignedCommand (MessagePack)      {v, key_id, payload, sig}
      payload = canonical JSON of    CommandEnvelope {v, id, edge, kind, spec,
                                                      issued_at, expires_at, issuer}
      sig     = Ed25519(private key, payload)

The signature covers the exact payload bytes, and the verifier checks those
bytes, never a re-encoding; it then also requires the payload to *be* the
canonical encoding of what it decodes to (sorted keys, no whitespace, UTF-8),
so one signature has exactly one meaning (no duplicate keys, no alternative
spellings). ``digest`` (SHA-256 of the payload) names one signed command
unambiguously: the cloud stores it, and a status report about a command only
updates the command whose digest it carries.

The cloud holds the private key (``edgesync keys generate`` writes a pair of
PEM files); each bridge holds the public key(s) it trusts, so rotating keys is
"trust old and new, then switch the signer, then drop the old".

Verification here covers what needs no local state: signature, canonical form,
decoding. Expiry, edge, replay and allow-list checks are the bridge's
(:mod:`edge_bridge.admission`), because they need its clock, id and memory.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.durable_files import write_atomically
from broker.errors import CommandRejected, ConfigError
from broker.protocol.tokens import validate_token

__all__ = [
    "COMMAND_ID",
    "ENVELOPE_VERSION",
    "IDEMPOTENCY_KEY_MAX",
    "MAX_COMMAND_BYTES",
    "CommandEnvelope",
    "CommandSigner",
    "OpenedCommand",
    "SignedCommand",
    "canonical_bytes",
    "generate_key_pair",
    "iso_time",
    "key_id",
    "load_private_key",
    "load_public_keys",
    "new_envelope",
    "open_command",
]

ENVELOPE_VERSION: Final = 1
MAX_COMMAND_BYTES: Final = 256 * 1024
"""Largest signed command (or desired state) an edge accepts; specs are small, this bounds
what a forger can make an edge parse. The cloud refuses to sign anything larger, well
under nats-server's 1 MiB message limit."""
IDEMPOTENCY_KEY_MAX: Final = 200
"""Longest idempotency key an operator may give a command (API and console alike)."""
COMMAND_ID: Final = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
"""What a command id looks like: a lower-case canonical UUID (``new_envelope`` makes them)."""


class CommandEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What an operator asked one edge to do, and for how long the request stands."""

    v: int
    id: str
    """A UUID (lower-case, hyphenated); the edge applies each id at most once."""
    edge: str
    kind: str
    """``deployment.scale``, ``bridge.configure``, ... (see :mod:`.command_specs`)."""
    spec: dict[str, Any]
    issued_at: float
    """Unix seconds (millisecond precision), the issuer's clock."""
    expires_at: float
    """Unix seconds; the edge never applies the command at or after this time."""
    issuer: str
    """Who signed it (the API's configured issuer name)."""


class SignedCommand(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The message on ``<prefix>.ctl.<edge>``: a canonical envelope and its signature."""

    v: int
    key_id: str
    """:func:`key_id` of the signing key, so the edge picks the right trusted key."""
    payload: bytes
    sig: bytes


@dataclass(frozen=True, slots=True)
class OpenedCommand:
    """A signed command whose signature and encoding checked out."""

    envelope: CommandEnvelope
    digest: str
    """SHA-256 hex of the signed payload."""


_canonical = msgspec.json.Encoder(order="sorted")
_envelope_decoder = msgspec.json.Decoder(CommandEnvelope)
_signed_encoder = msgspec.msgpack.Encoder()
_signed_decoder = msgspec.msgpack.Decoder(SignedCommand)


class _Claimed(msgspec.Struct):
    """Just enough of an envelope to say which command a rejection is about."""

    id: str = ""


_claimed_decoder = msgspec.json.Decoder(_Claimed)


def canonical_bytes(envelope: CommandEnvelope) -> bytes:
    """The one byte string that is signed for ``envelope``: JSON, keys sorted, compact, UTF-8."""
    return _canonical.encode(envelope)


def new_envelope(
    *,
    edge: str,
    kind: str,
    spec: dict[str, Any],
    ttl_s: float,
    issuer: str,
    now: float | None = None,
    command_id: str | None = None,
) -> CommandEnvelope:
    """A fresh envelope with a random id, issued now and expiring ``ttl_s`` later."""
    issued = round(time.time() if now is None else now, 3)
    return CommandEnvelope(
        v=ENVELOPE_VERSION,
        id=command_id or str(uuid.uuid4()),
        edge=validate_token("edge id", edge),
        kind=kind,
        spec=spec,
        issued_at=issued,
        expires_at=round(issued + ttl_s, 3),
        issuer=issuer,
    )


def iso_time(ts: float) -> str:
    """A command time (Unix seconds) as ISO 8601 UTC with milliseconds, ``...Z``: how
    refusals quote ``issued_at`` / ``expires_at`` and how a restart is stamped."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short stable name of a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class CommandSigner:
    """Signs envelopes with the cloud's private key."""

    def __init__(self, private_key: Ed25519PrivateKey, *, issuer: str) -> None:
        self._key = private_key
        self.issuer = issuer
        self.key_id = key_id(private_key.public_key())

    @classmethod
    def from_file(cls, path: Path, *, issuer: str) -> CommandSigner:
        return cls(load_private_key(path), issuer=issuer)

    def sign(self, envelope: CommandEnvelope) -> tuple[bytes, str]:
        """Returns the wire message and the digest of its payload."""
        payload = canonical_bytes(envelope)
        message = SignedCommand(
            v=ENVELOPE_VERSION, key_id=self.key_id, payload=payload, sig=self._key.sign(payload)
        )
        return _signed_encoder.encode(message), hashlib.sha256(payload).hexdigest()


def open_command(data: bytes, trusted: Sequence[Ed25519PublicKey]) -> OpenedCommand:
    """Verify and decode one message from the control subject.

    Args:
        data: the message body as received.
        trusted: the public keys whose signatures are accepted.

    Returns:
        The envelope and the digest of its payload.

    Raises:
        CommandRejected: ``malformed``, ``unknown_key``, ``bad_signature`` or
            ``non_canonical``; carries the id the payload claims when readable.
    """
    if len(data) > MAX_COMMAND_BYTES:
        raise CommandRejected("malformed", f"command message of {len(data)} bytes is too large")
    try:
        signed = _signed_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CommandRejected("malformed", f"not a signed command: {exc}") from exc
    digest = hashlib.sha256(signed.payload).hexdigest()
    claimed = _claimed_id(signed.payload)
    if signed.v != ENVELOPE_VERSION:
        raise CommandRejected("malformed", f"unsupported command version {signed.v}",
                              command_id=claimed, digest=digest)
    keys = {key_id(k): k for k in trusted}
    key = keys.get(signed.key_id)
    if key is None:
        raise CommandRejected(
            "unknown_key", f"signed with key {signed.key_id!r}, which this edge does not trust",
            command_id=claimed, digest=digest,
        )
    try:
        key.verify(signed.sig, signed.payload)
    except InvalidSignature:
        raise CommandRejected(
            "bad_signature", f"signature does not verify with trusted key {signed.key_id!r}",
            command_id=claimed, digest=digest,
        ) from None
    try:
        envelope = _envelope_decoder.decode(signed.payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CommandRejected("malformed", f"malformed envelope: {exc}", command_id=claimed,
                              digest=digest) from exc
    if canonical_bytes(envelope) != signed.payload:
        raise CommandRejected("non_canonical", "payload is not in canonical form",
                              command_id=claimed, digest=digest)
    if envelope.v != ENVELOPE_VERSION or not COMMAND_ID.match(envelope.id):
        raise CommandRejected("malformed", "envelope version or id is invalid",
                              command_id=claimed, digest=digest)
    return OpenedCommand(envelope=envelope, digest=digest)


def _claimed_id(payload: bytes) -> str:
    """The id an (unverified) payload claims, if it is a well-formed UUID; else ``""``."""
    try:
        claimed = _claimed_decoder.decode(payload).id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""
    return claimed if isinstance(claimed, str) and COMMAND_ID.match(claimed) else ""


# -- key files ---------------------------------------------------------------------


def generate_key_pair(directory: Path, name: str = "edgesync", *, force: bool = False
                      ) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair as ``<name>.key`` (PKCS#8 PEM, mode 0600) and
    ``<name>.pub`` (SubjectPublicKeyInfo PEM) in ``directory``.

    Raises:
        ConfigError: a file exists and ``force`` is false.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    if not force:
        for path in (private_path, public_path):
            if path.exists():
                raise ConfigError(f"{path} exists; refusing to overwrite a key (use --force)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_atomically(private_path, private_pem, mode=0o600)
    write_atomically(public_path, public_pem)
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from a PEM file.

    Raises:
        ConfigError: unreadable, not PEM, or not an Ed25519 key (names the path).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read private key {path}: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


_PEM_BLOCK = re.compile(
    rb"-----BEGIN PUBLIC KEY-----\s.*?-----END PUBLIC KEY-----", re.DOTALL
)


def load_public_keys(path: Path) -> list[Ed25519PublicKey]:
    """Load the trusted Ed25519 public keys from a file of one or more PEM blocks.

    Several blocks let an edge trust the old and the new key during a rotation.

    Raises:
        ConfigError: unreadable, no PEM block, or a block that is not Ed25519.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read public key file {path}: {exc}") from exc
    keys: list[Ed25519PublicKey] = []
    for block in _PEM_BLOCK.findall(data):
        try:
            key = serialization.load_pem_public_key(block)
        except ValueError as exc:
            raise ConfigError(f"{path}: invalid PEM public key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{path}: a {type(key).__name__} is not an Ed25519 key")
        keys.append(key)
    if not keys:
        raise ConfigError(f"{path} holds no PEM public key")
    return keys
