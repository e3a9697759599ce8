"""Operators: who may use the operator API, with which scopes, and the audit log of
what they did. The one home of scopes, token rules and the ``operators`` /
``audit_log`` tables (migration 007); the API (:mod:`cloud_ingest.api.auth`) and
the CLI (``edgesync operators``) both go through here.

Tokens are ``eso_`` plus 43 URL-safe characters (256 random bits). Only their
SHA-256 is stored: a token is shown once, when it is made. A token an operator
brings (``--token-stdin``) or the bootstrap token of the settings must pass
:func:`broker.token_strength.check_token_strength` , so
``changeme``, ``aaaa...`` and empty strings never guard anything.

Scopes (:data:`SCOPES`): ``read`` (every GET), ``consume`` (move a feed
subscription's checkpoint: what an HTTP consumer commits), ``operate`` (every command
kind, replays), ``operate:<kind>`` (that command kind only), ``admin`` (everything:
operators, audit log). ``consume``, ``operate`` and ``operate:<kind>`` imply ``read``.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from broker.errors import Conflict, InvalidInput, NotFound
from broker.protocol.command_specs import KINDS
from broker.token_strength import check_token_strength
from cloud_ingest.db_errors import Connection

__all__ = [
    "BOOTSTRAP",
    "SCOPES",
    "TOKEN_PREFIX",
    "Operator",
    "add_operator",
    "audit",
    "command_scope",
    "find_operator",
    "list_audit",
    "list_operators",
    "mint_token",
    "parse_scopes",
    "revoke_operator",
    "token_sha256",
]

TOKEN_PREFIX: Final = "eso_"
"""Every minted token starts with this, so secret scanners can find leaked ones."""

BOOTSTRAP: Final = "bootstrap"
"""The operator name of ``api.operator_token`` (an admin that is not in the table)."""

SCOPES: Final = ("read", "consume", "operate", "admin", *(f"operate:{k}" for k in KINDS))
"""Every scope a token can hold."""

_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


@dataclass(frozen=True, slots=True)
class Operator:
    """An authenticated caller: a name and what it may do."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """Whether this operator holds ``scope`` (directly or by implication)."""
        if "admin" in self.scopes or scope in self.scopes:
            return True
        if scope == "read":
            return any(s in ("consume", "operate") or s.startswith("operate:")
                       for s in self.scopes)
        return scope.startswith("operate:") and "operate" in self.scopes


def command_scope(kind: str) -> str:
    """The scope a command of ``kind`` needs (``operate`` covers every kind)."""
    return f"operate:{kind}"


def parse_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """Validated scopes.

    Raises:
        InvalidInput: an unknown scope, or none (the message lists the valid ones).
    """
    found = frozenset(s.strip() for s in scopes if s.strip())
    unknown = sorted(found - set(SCOPES))
    if unknown or not found:
        raise InvalidInput(f"unknown scope(s) {', '.join(unknown) or '(none given)'}: "
                           f"valid are {', '.join(SCOPES)}", code="invalid_scope")
    return found


def mint_token() -> str:
    """A new random operator token (shown once; store only :func:`token_sha256`)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInput(f"operator name {name!r} must match {_NAME.pattern}",
                           code="invalid_name")
    return name


async def add_operator(conn: Connection, name: str, scopes: Iterable[str], *, created_by: str,
                       client: str = "", token: str | None = None) -> str:
    """Create operator ``name`` with ``scopes``; returns its token (shown once).

    Args:
        token: a token the operator brings (checked for strength); default: minted.

    Raises:
        InvalidInput: a bad name, scope or token. Conflict: the name is taken.
    """
    _check_name(name)
    granted = parse_scopes(scopes)
    token = mint_token() if token is None else check_token_strength(token)
    async with conn.transaction():
        taken = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM operators WHERE name = $1 AND revoked_at IS NULL)",
            name)
        if taken:
            raise Conflict(f"operator {name!r} exists; revoke it first to issue a new token",
                           code="operator_exists")
        digest = token_sha256(token)
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM operators "
                               "WHERE token_sha256 = $1)", digest):
            # A token is one operator's, for good (revoked ones included): it was a
            # unique-key error, "cannot reach the database".
            raise Conflict("that token is (or was) another operator's: bring a fresh one",
                           code="token_taken")
        await conn.execute(
            "INSERT INTO operators (name, scopes, token_sha256, token_prefix, created_by)"
            " VALUES ($1, $2, $3, $4, $5)",
            name, sorted(granted), digest, token[:8], created_by)
        await audit(conn, operator=created_by, action="operator.add", target=name,
                    client=client, detail={"scopes": sorted(granted)})
    return token


async def revoke_operator(conn: Connection, name: str, *, revoked_by: str, client: str = ""
                          ) -> None:
    """Revoke ``name``'s token: refused from the next request on.

    Raises:
        NotFound: no active operator of that name.
    """
    async with conn.transaction():
        done = await conn.fetchval(
            "UPDATE operators SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL"
            " RETURNING id", name)
        if done is None:
            raise NotFound(f"no active operator {name!r}", code="unknown_operator")
        await audit(conn, operator=revoked_by, action="operator.revoke", target=name,
                    client=client)


async def list_operators(conn: Connection, *, include_revoked: bool = False
                         ) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT name, scopes, token_prefix, created_at, created_by, revoked_at, last_used_at"
        " FROM operators WHERE $1 OR revoked_at IS NULL ORDER BY name, id", include_revoked)
    return [dict(r) for r in rows]


async def find_operator(conn: Connection, token: str) -> Operator | None:
    """The active operator whose token is ``token``, or None.

    The lookup is by the token's SHA-256, so its timing says nothing about the token.
    ``last_used_at`` is refreshed at most once a minute (one write per operator-minute,
    not per request).
    """
    row = await conn.fetchrow(
        "UPDATE operators SET last_used_at = now() WHERE token_sha256 = $1"
        " AND revoked_at IS NULL AND (last_used_at IS NULL"
        "  OR last_used_at < now() - interval '1 minute') RETURNING name, scopes",
        token_sha256(token))
    if row is None:
        row = await conn.fetchrow(
            "SELECT name, scopes FROM operators WHERE token_sha256 = $1 AND revoked_at IS NULL",
            token_sha256(token))
    if row is None:
        return None
    return Operator(name=row["name"], scopes=frozenset(row["scopes"]))


async def audit(conn: Connection, *, operator: str, action: str, target: str = "",
                client: str = "", status: int | None = None,
                detail: Mapping[str, Any] | None = None) -> None:
    """Append one row to the audit log (it refuses updates and deletes)."""
    await conn.execute(
        "INSERT INTO audit_log (operator, action, target, client, status, detail)"
        " VALUES ($1, $2, $3, $4, $5, $6::text::jsonb)",  # text: whatever jsonb codec
        operator, action, target, client, status, json.dumps(dict(detail or {}), default=str))


async def list_audit(conn: Connection, *, before: int | None = None, limit: int = 100,
                     operator: str | None = None, since: datetime | None = None
                     ) -> list[dict[str, Any]]:
    """Audit rows, newest first, a page at a time (``before``: ids below it)."""
    rows = await conn.fetch(
        "SELECT id, at, operator, action, target, client, status, detail::text AS detail"
        " FROM audit_log WHERE ($1::bigint IS NULL OR id < $1)"
        " AND ($2::text IS NULL OR operator = $2) AND ($3::timestamptz IS NULL OR at >= $3)"
        " ORDER BY id DESC LIMIT $4", before, operator, since, limit)
    return [{**dict(r), "detail": json.loads(r["detail"])} for r in rows]
