"""Desired state in PostgreSQL, and sending it to edges: labels, groups, versions,
and the signed message each edge gets.

- **Labels** (``edge_labels``) put edges in groups; a **group** is a named label
  selector (``desired_groups``): every edge whose labels include all of it.
- **Versions** (``desired_versions``) of a target (one edge, or a group) are
  immutable and numbered per target; each has a global id, the "desired version"
  a rollout names. A group's version may carry per-edge **overrides**, each a JSON
  merge patch of its document; the document an edge gets is the merge, validated
  again (:func:`resolve`).
- **Sending** (:class:`DesiredPublisher`): the resolved document becomes a
  :class:`~broker.protocol.desired.DesiredStateSpec` with a fresh revision from
  ``desired_revision_seq``, signed like a command, and recorded in
  ``edge_desired`` (one row per edge: what it must run) inside the caller's
  transaction. Only after that commits is the row put as the edge's key in the
  desired-state bucket - an edge can apply and report a revision only once the
  cloud's rows know it - and marked published; a put JetStream did not
  acknowledge is retried by :meth:`DesiredPublisher.republish` (the rollout
  driver's every tick). The database is the source of truth, the bucket its copy.

The API's connections decode jsonb to Python values (its codec); every function
here takes such a connection.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import asyncpg
import structlog
from nats.js import JetStreamContext

from broker.errors import InvalidInput, NotFound, RequestTooLarge
from broker.protocol.commands import MAX_COMMAND_BYTES, CommandSigner, new_envelope
from broker.protocol.desired import (
    DESIRED_KIND,
    DesiredStateSpec,
    merge_documents,
    parse_document,
)
from broker.protocol.tokens import is_valid_token, validate_token
from broker.protocol.topology import Topology
from cloud_ingest.db_errors import Connection
from cloud_ingest.republishing import publish_each

__all__ = [
    "LABEL_KEY",
    "MAX_DOCUMENT_BYTES",
    "DesiredPublisher",
    "create_version",
    "edges_matching",
    "find_version",
    "get_labels",
    "group_selector",
    "resolve",
    "set_labels",
]

log = structlog.get_logger(__name__)

LABEL_KEY: Final = r"^[A-Za-z0-9]([A-Za-z0-9_.\-/]{0,61}[A-Za-z0-9])?$"
"""Label keys and values: Kubernetes-like, 1-63 characters, alphanumeric at both ends."""
_LABEL = re.compile(LABEL_KEY)
_MESSAGE_TTL_S: Final = 10 * 365 * 24 * 3600.0
"""A desired state does not expire (the revision orders it); the envelope needs a value."""
_PUBLISH_TIMEOUT_S: Final = 5.0
MAX_DOCUMENT_BYTES: Final = MAX_COMMAND_BYTES - 16 * 1024
"""Largest desired-state document (with its overrides) as JSON: what an edge accepts
signed, less room for the envelope, the signature and the framing."""


def _check_label(what: str, value: str) -> str:
    if not isinstance(value, str) or not _LABEL.match(value):
        raise InvalidInput(f"label {what} {value!r} is not 1-63 characters of letters, digits, "
                           "'-', '_', '.', '/' (alphanumeric at both ends)",
                           code="invalid_request")
    return value


async def set_labels(conn: Connection, edge: str, labels: dict[str, str | None]
                     ) -> dict[str, str]:
    """Set (or, with None, remove) an edge's labels; returns all its labels.

    Raises:
        InvalidInput: a key or value that is not a label.
    """
    validate_token("edge id", edge)
    for key, value in labels.items():
        _check_label("key", key)
        if value is not None:
            _check_label("value", value)
    async with conn.transaction():
        for key, value in labels.items():
            if value is None:
                await conn.execute("DELETE FROM edge_labels WHERE edge_id = $1 AND key = $2",
                                   edge, key)
            else:
                await conn.execute(
                    "INSERT INTO edge_labels (edge_id, key, value) VALUES ($1, $2, $3)"
                    " ON CONFLICT (edge_id, key) DO UPDATE SET value = EXCLUDED.value,"
                    " updated_at = now()", edge, key, value)
    return await get_labels(conn, edge)


async def get_labels(conn: Connection, edge: str) -> dict[str, str]:
    rows = await conn.fetch("SELECT key, value FROM edge_labels WHERE edge_id = $1 ORDER BY key",
                            edge)
    return {r["key"]: r["value"] for r in rows}


async def edges_matching(conn: Connection, selector: dict[str, str]) -> list[str]:
    """Edges whose labels include every ``key=value`` of ``selector``, in id order.

    Raises:
        InvalidInput: an empty selector (it would select the whole fleet by accident).
    """
    if not selector:
        raise InvalidInput("a group's selector needs at least one label (key=value)",
                           code="invalid_request")
    rows = await conn.fetch(
        "SELECT edge_id FROM edge_labels WHERE (key, value) IN"
        " (SELECT * FROM jsonb_each_text($1::jsonb))"
        " GROUP BY edge_id HAVING count(*) = $2 ORDER BY edge_id",
        selector, len(selector))
    return [r["edge_id"] for r in rows]


async def group_selector(conn: Connection, group: str) -> dict[str, str] | None:
    selector: dict[str, str] | None = await conn.fetchval(
        "SELECT selector FROM desired_groups WHERE name = $1", group)
    return selector


def resolve(version: asyncpg.Record | dict[str, Any] | None, edge: str) -> dict[str, Any]:
    """The document ``edge`` gets from ``version`` (its override merged in); ``{}`` (manage
    nothing) for no version.

    Raises:
        InvalidInput: the merged document does not validate.
    """
    if version is None:
        return {}
    overrides = version["overrides"] or {}
    merged = merge_documents(version["document"], overrides.get(edge))
    parse_document(merged, where=f"document for edge {edge}")
    return merged


async def create_version(
    conn: Connection,
    *,
    target_kind: str,
    target: str,
    document: Any,
    overrides: dict[str, Any] | None = None,
    selector: dict[str, str] | None = None,
    note: str = "",
    created_by: str,
) -> dict[str, Any]:
    """Store the next version of ``target``'s desired state; returns its row.

    Raises:
        InvalidInput: the document, an override, or the group's selector is invalid, or a
            group's first version has no selector.
    """
    validate_token("edge id" if target_kind == "edge" else "group name", target)
    parse_document(document)  # stored as given, once valid
    size = len(json.dumps(document, separators=(",", ":")).encode()) + len(
        json.dumps(overrides or {}, separators=(",", ":")).encode())
    if size > MAX_DOCUMENT_BYTES:
        raise RequestTooLarge(f"the document and overrides are {size} bytes of JSON; at "
                              f"most {MAX_DOCUMENT_BYTES} (an edge accepts a signed desired "
                              f"state of at most {MAX_COMMAND_BYTES})")
    overrides = overrides or {}
    if target_kind == "edge" and overrides:
        raise InvalidInput("overrides belong to a group's version; an edge's document is "
                           "already its own", code="invalid_request")
    if target_kind == "edge" and selector:
        raise InvalidInput("a selector belongs to a group", code="invalid_request")
    for edge, override in overrides.items():
        if not is_valid_token(edge):
            raise InvalidInput(f"overrides: {edge!r} is not an edge id", code="invalid_request")
        if not isinstance(override, dict):
            raise InvalidInput(f"overrides.{edge}: a JSON merge patch object",
                               code="invalid_request")
        resolve({"document": document, "overrides": overrides}, edge)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                           f"desired:{target_kind}:{target}")
        if target_kind == "group":
            for key, value in (selector or {}).items():
                _check_label("key", key)
                _check_label("value", value)
            if selector:
                await conn.execute(
                    "INSERT INTO desired_groups (name, selector) VALUES ($1, $2)"
                    " ON CONFLICT (name) DO UPDATE SET selector = EXCLUDED.selector,"
                    " updated_at = now()", target, selector)
            elif await group_selector(conn, target) is None:
                raise InvalidInput(f"group {target!r} is new: give its selector "
                                   "(labels, e.g. region=eu)", code="invalid_request")
        row = await conn.fetchrow(
            "INSERT INTO desired_versions (target_kind, target, version, document, overrides,"
            " note, created_by) SELECT $1, $2, coalesce(max(version), 0) + 1, $3, $4, $5, $6"
            " FROM desired_versions WHERE target_kind = $1 AND target = $2 RETURNING *",
            target_kind, target, document, overrides, note, created_by)
    assert row is not None
    log.info("desired_version_created", id=row["id"], target_kind=target_kind, target=target,
             version=row["version"], by=created_by)
    return dict(row)


async def find_version(conn: Connection, *, version_id: int | None = None,
                       target_kind: str | None = None, target: str | None = None,
                       version: int | None = None) -> dict[str, Any]:
    """A version by global id, or a target's version (its latest when ``version`` is None).

    Raises:
        NotFound: no such version.
    """
    if version_id is not None:
        row = await conn.fetchrow("SELECT * FROM desired_versions WHERE id = $1", version_id)
        what = f"desired version {version_id}"
    else:
        row = await conn.fetchrow(
            "SELECT * FROM desired_versions WHERE target_kind = $1 AND target = $2"
            " AND ($3::int IS NULL OR version = $3) ORDER BY version DESC LIMIT 1",
            target_kind, target, version)
        what = f"{target_kind} {target!r}" + ("" if version is None else f" version {version}")
    if row is None:
        raise NotFound(f"no desired state for {what}", code="unknown_desired_version")
    return dict(row)


class DesiredPublisher:
    """Signs an edge's desired state into ``edge_desired`` (inside the caller's
    transaction), and puts the current row of an edge in the bucket once that
    transaction has committed (see the module docstring)."""

    def __init__(self, *, signer: CommandSigner, topology: Topology,
                 js: JetStreamContext | None) -> None:
        self._signer = signer
        self._topology = topology
        self.js = js

    async def assign(self, conn: Connection, edge: str,
                     version: asyncpg.Record | dict[str, Any] | None, *,
                     rollout_id: int | None, by: str) -> int:
        """Record ``version`` (None: nothing desired) as what ``edge`` must run, signed
        with a fresh revision, unpublished; returns the revision. Call :meth:`publish`
        for the edge after the transaction commits.

        Raises:
            InvalidInput: the edge's resolved document does not validate.
            RequestTooLarge: signed, it is more than an edge accepts (a version stored
                before :data:`MAX_DOCUMENT_BYTES` was enforced).
        """
        document = resolve(version, edge)
        revision = int(await conn.fetchval("SELECT nextval('desired_revision_seq')"))
        version_id = 0 if version is None else int(version["id"])
        spec = DesiredStateSpec(revision=revision, version_id=version_id,
                                rollout_id=rollout_id, document=document)
        envelope = new_envelope(edge=edge, kind=DESIRED_KIND,
                                spec=spec.model_dump(mode="json"), ttl_s=_MESSAGE_TTL_S,
                                issuer=f"{by}@{self._signer.issuer}")
        signed, digest = self._signer.sign(envelope)
        if len(signed) > MAX_COMMAND_BYTES:
            raise RequestTooLarge(
                f"edge {edge}'s signed desired state is {len(signed)} bytes; an edge "
                f"accepts at most {MAX_COMMAND_BYTES}")
        await conn.execute(
            "INSERT INTO edge_desired (edge_id, version_id, revision, document, digest, signed,"
            " rollout_id, assigned_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            " ON CONFLICT (edge_id) DO UPDATE SET version_id = EXCLUDED.version_id,"
            " revision = EXCLUDED.revision, document = EXCLUDED.document,"
            " digest = EXCLUDED.digest, signed = EXCLUDED.signed,"
            " rollout_id = EXCLUDED.rollout_id, assigned_by = EXCLUDED.assigned_by,"
            " assigned_at = now(), published_at = NULL",
            edge, None if version is None else version_id, revision, document, digest, signed,
            rollout_id, by)
        log.info("desired_state_assigned", edge=edge, revision=revision, version=version_id,
                 rollout=rollout_id)
        return revision

    async def publish(self, pool: asyncpg.Pool, edge: str) -> bool:
        """Put the edge's *current* signed desired state in the bucket, holding its row
        so that concurrent publishers of one edge go one after the other and the last
        put is always the newest revision. Returns whether JetStream acknowledged it
        (if not, :meth:`republish` tries again)."""
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT revision, signed, published_at FROM edge_desired WHERE edge_id = $1"
                " FOR UPDATE", edge)
            if row is None or row["published_at"] is not None:
                return row is not None
            if self.js is None:
                return False
            try:
                await self.js.publish(self._topology.desired_subject(edge),
                                      bytes(row["signed"]), timeout=_PUBLISH_TIMEOUT_S)
            except Exception as exc:
                log.warning("desired_state_publish_failed", edge=edge,
                            revision=row["revision"], error=f"{type(exc).__name__}: {exc}")
                return False
            await conn.execute("UPDATE edge_desired SET published_at = now()"
                               " WHERE edge_id = $1", edge)
        log.info("desired_state_sent", edge=edge, revision=row["revision"])
        return True

    async def republish(self, pool: asyncpg.Pool, *, limit: int = 500) -> int:
        """Publish the edges whose current desired state JetStream has not acknowledged
        (a failed or interrupted publish); returns how many were sent now."""
        # A state signed over what an edge accepts (stored before assign refused such)
        # can never go: it is left out, not retried every round.
        edges = await pool.fetch("SELECT edge_id FROM edge_desired WHERE published_at IS NULL"
                                 " AND octet_length(signed) <= $2 ORDER BY assigned_at"
                                 " LIMIT $1", limit, MAX_COMMAND_BYTES)
        return await publish_each((row["edge_id"] for row in edges),
                                  lambda edge: self.publish(pool, edge))
