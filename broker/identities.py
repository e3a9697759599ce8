"""NATS identities: one nkey per edge and per cloud service, and the server's
authorization file generated from them.

An *auth directory* (``.edgesync/nats-auth`` under ``edgesync up``) holds:

- ``identities.json``: who exists — name, role, edge id and **public** nkey.
  No secret is in it.
- ``creds/<name>.nk``: each identity's nkey seed (mode 0600), the file a client
  passes as ``EDGESYNC_NATS__CREDENTIALS_FILE``. Hand an edge its file and
  nothing else.
- ``auth.conf``: the ``authorization { users = [...] }`` block for nats-server,
  rendered from ``identities.json`` and :mod:`broker.protocol.permissions`.
  Include it from the server configuration (``include "auth.conf"``) and
  reload the server after every change (``nats-server --signal reload=<pid>``
  or SIGHUP; the embedded server is reloaded by :meth:`EmbeddedNats.reload`).

Adding an edge writes its seed and re-renders ``auth.conf``; revoking removes
the user and its seed, so after the reload the server refuses the key (and
closes the edge's open connection). The directory is 0700, every file in it
0600.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import nkeys

from broker.durable_files import make_private_dir, write_private
from broker.errors import ConfigError
from broker.protocol.permissions import SERVICE_ROLES, Role, permissions_for
from broker.protocol.tokens import validate_token
from broker.protocol.topology import Topology

__all__ = ["Identity", "IdentityStore", "new_user_seed", "public_key_of"]

_REGISTRY = "identities.json"
_AUTH_CONF = "auth.conf"
_USER_KEY = re.compile(r"U[A-Z2-7]{55}")  # base32 public key with the user prefix


def new_user_seed() -> bytes:
    """A fresh NATS user nkey seed (``SU...``)."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def public_key_of(seed: bytes) -> str:
    """The public key (``U...``) of a user seed."""
    kp = nkeys.from_seed(bytearray(seed.strip()))
    try:
        return str(kp.public_key.decode())
    finally:
        kp.wipe()


@dataclass(frozen=True, slots=True)
class Identity:
    """One NATS user: a service (named after its role) or an edge (named ``edge-<id>``)."""

    name: str
    role: Role
    public_key: str
    edge: str | None = None


class IdentityStore:
    """The auth directory: identities, their seeds, and the rendered ``auth.conf``.

    Args:
        directory: the auth directory (created 0700, with any missing parent).
        topology: subject names the permissions are rendered for.
        create: make the directory if it is missing; False opens an existing one
            and writes nothing (for reading it: a listing must not mint keys).

    Raises:
        ConfigError: ``create`` is False and ``directory`` holds no identities.
    """

    def __init__(self, directory: Path, topology: Topology, *, create: bool = True) -> None:
        self.directory = Path(directory).absolute()
        self.topology = topology
        if not create:
            if not (self.directory / _REGISTRY).is_file():
                raise ConfigError(f"no identities at {self.directory}")
            return
        make_private_dir(self.directory)
        self.directory.chmod(0o700)

    # -- paths ----------------------------------------------------------------------------

    @property
    def auth_conf(self) -> Path:
        """The rendered ``authorization`` block to include from the server config."""
        return self.directory / _AUTH_CONF

    def credentials_file(self, name: str) -> Path:
        """Where identity ``name``'s seed lives."""
        return self.directory / "creds" / f"{validate_token('identity', name)}.nk"

    @staticmethod
    def edge_name(edge: str) -> str:
        return f"edge-{validate_token('edge id', edge)}"

    def edge_credentials(self, edge: str) -> Path:
        return self.credentials_file(self.edge_name(edge))

    # -- registry --------------------------------------------------------------------------

    def identities(self) -> dict[str, Identity]:
        """Every registered identity by name."""
        path = self.directory / _REGISTRY
        if not path.exists():
            return {}
        raw = json.loads(path.read_text())
        return {i["name"]: Identity(**i) for i in raw["identities"]}

    def edges(self) -> list[str]:
        return sorted(i.edge for i in self.identities().values() if i.edge is not None)

    def _save(self, identities: dict[str, Identity]) -> None:
        ordered = sorted(identities.values(), key=lambda i: (i.role != "edge", i.name))
        write_private(self.directory / _REGISTRY, json.dumps(
            {"identities": [asdict(i) for i in ordered]}, indent=2) + "\n")
        write_private(self.auth_conf, self.render(identities.values()))

    def ensure_services(self) -> None:
        """Create the ingest, api and admin identities if missing; idempotent."""
        identities = self.identities()
        changed = False
        for role in SERVICE_ROLES:
            if role not in identities:
                identities[role] = self._mint(role, role, None)
                changed = True
        if changed or not self.auth_conf.exists():
            self._save(identities)

    def add_edge(self, edge: str, *, public_key: str | None = None) -> Identity:
        """Register edge ``edge``; idempotent for an edge that already exists.

        Args:
            public_key: register a key made elsewhere (the edge keeps its seed);
                default: mint a seed here and write it to the credentials file.
        """
        name = self.edge_name(edge)
        identities = self.identities()
        existing = identities.get(name)
        if existing is not None and (public_key is None or public_key == existing.public_key):
            return existing
        if public_key is not None:
            if not _USER_KEY.fullmatch(public_key):
                raise ConfigError(f"not a NATS user public key: {public_key!r}")
            identity = Identity(name=name, role="edge", public_key=public_key, edge=edge)
        else:
            identity = self._mint(name, "edge", edge)
        identities[name] = identity
        self._save(identities)
        return identity

    def revoke_edge(self, edge: str) -> bool:
        """Remove edge ``edge`` and its seed; returns False if it was not registered."""
        name = self.edge_name(edge)
        identities = self.identities()
        if identities.pop(name, None) is None:
            return False
        self._save(identities)
        self.edge_credentials(edge).unlink(missing_ok=True)
        return True

    def _mint(self, name: str, role: Role, edge: str | None) -> Identity:
        seed = new_user_seed()
        write_private(self.credentials_file(name), seed + b"\n")
        return Identity(name=name, role=role, public_key=public_key_of(seed), edge=edge)

    # -- rendering -------------------------------------------------------------------------

    def render(self, identities: Iterable[Identity]) -> str:
        """The ``authorization`` block granting ``identities`` their permissions."""
        users = []
        for identity in identities:
            perms = permissions_for(self.topology, identity.role, identity.edge)
            users.append(
                f"    # {identity.name} ({identity.role})\n"
                f"    {{ nkey: {json.dumps(identity.public_key)}, permissions: {{\n"
                f"      publish: {{ allow: {json.dumps(list(perms.publish))} }},\n"
                f"      subscribe: {{ allow: {json.dumps(list(perms.subscribe))} }}\n"
                f"    }} }}"
            )
        return (
            "# Generated by edgesync (broker/identities.py); do not edit: `edgesync edges`\n"
            "# changes it. Include it from nats-server's configuration and reload the server.\n"
            "authorization {\n  users = [\n" + ",\n".join(users) + "\n  ]\n}\n"
        )
