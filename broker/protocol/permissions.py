"""Who may publish and subscribe to what on NATS: the permission matrix.

The one place that states each role's NATS permissions; the server's
authorization file (:mod:`broker.identities`), ``docs/security.md`` and the
matrix test all read it from here. Everything is an allow-list: what is not
listed is refused by nats-server (a ``Permissions Violation``).

Roles:

- ``edge``: one per edge id, confined to its own subjects. It publishes record
  batches (``<p>.rec.<own>.*``) and events (``<p>.evt.<own>``), pulls from its
  own control consumer ``ctl-<own>`` (next, ack, info), reads its own watermark
  keys (live updates on ``$KV.<bucket>.<own>.>`` and direct gets of them) and
  reads stream info to verify the topology; reads its own desired-state key
  (``$KV.<P>_DESIRED.<own>``: live updates and direct gets). No KV write, no stream or consumer
  administration, no subject of another edge, and replies only on its own
  inbox prefix so it cannot read anybody else's responses.
- ``ingest``: manages the topology (creates and updates the streams and the
  watermark bucket, its own consumers), pulls and acks records and events,
  writes watermarks.
- ``api``: publishes commands and each edge's desired state (KV puts), reads stream
  info.
- ``admin``: the JetStream API as a whole (``edgesync edges add`` creates each
  edge's control consumer with it); held by operators, never by a service.

Subjects of the JetStream API used below (nats-server 2.10+): ``$JS.API.STREAM.
<op>.<stream>``, ``$JS.API.CONSUMER.INFO|MSG.NEXT.<stream>.<consumer>``, consumer
creation as ``$JS.API.CONSUMER.CREATE.<stream>.<consumer>[.<filter>]`` or the
legacy ``$JS.API.CONSUMER.DURABLE.CREATE.<stream>.<consumer>``, acks on
``$JS.ACK.<stream>.<consumer>.>``, and direct gets of a KV key as
``$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>`` (which is why the
watermark bucket is created with ``allow_direct``: a non-direct get carries the
key in the request body, where no permission can see it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from broker.protocol.tokens import validate_token
from broker.protocol.topology import Topology

__all__ = [
    "SERVICE_ROLES",
    "Permissions",
    "Role",
    "inbox_prefix",
    "permissions_for",
]

Role = Literal["edge", "ingest", "api", "admin"]
SERVICE_ROLES: tuple[Role, ...] = ("ingest", "api", "admin")
"""The cloud-side roles; each has exactly one identity, named after the role."""

_JS = "$JS.API"


@dataclass(frozen=True, slots=True)
class Permissions:
    """Subjects one identity may publish to and subscribe to (allow-lists)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def inbox_prefix(topology: Topology, role: Role, edge: str | None = None) -> str:
    """The reply-subject prefix of an identity (nats-py ``inbox_prefix``).

    Edges get ``_INBOX.<p>.edge.<edge>``, services ``_INBOX.<p>.svc.<role>``: the
    two namespaces cannot collide whatever an edge is called, and each identity
    may subscribe only below its own prefix, so nobody reads another's replies.
    """
    if role == "edge":
        if edge is None:
            raise ValueError("an edge identity needs its edge id")
        return f"_INBOX.{topology.prefix}.edge.{validate_token('edge id', edge)}"
    return f"_INBOX.{topology.prefix}.svc.{role}"


def permissions_for(topology: Topology, role: Role, edge: str | None = None) -> Permissions:
    """The permissions of ``role`` (of edge ``edge`` for the edge role)."""
    t = topology
    kv_stream = f"KV_{t.watermarks_bucket}"
    desired_stream = f"KV_{t.desired_bucket}"
    inbox = f"{inbox_prefix(t, role, edge)}.>"
    if role == "edge":
        assert edge is not None  # inbox_prefix checked it
        durable = t.control_durable(edge)
        return Permissions(
            publish=(
                f"{t.prefix}.rec.{edge}.*",
                t.events_subject(edge),
                *(f"{_JS}.STREAM.INFO.{s}" for s in
                  (t.records_stream, t.control_stream, t.events_stream, kv_stream)),
                f"{_JS}.CONSUMER.INFO.{t.control_stream}.{durable}",
                f"{_JS}.CONSUMER.MSG.NEXT.{t.control_stream}.{durable}",
                f"$JS.ACK.{t.control_stream}.{durable}.>",
                f"{_JS}.DIRECT.GET.{kv_stream}.$KV.{t.watermarks_bucket}.{edge}.>",
                f"{_JS}.STREAM.INFO.{desired_stream}",
                f"{_JS}.DIRECT.GET.{desired_stream}.{t.desired_subject(edge)}",
            ),
            subscribe=(f"$KV.{t.watermarks_bucket}.{edge}.>", t.desired_subject(edge), inbox),
        )
    if edge is not None:
        raise ValueError(f"role {role!r} takes no edge id")
    if role == "ingest":
        consumed = (t.records_stream, t.events_stream)
        return Permissions(
            publish=(
                *(f"{_JS}.STREAM.{op}.{s}"
                  for op in ("INFO", "CREATE", "UPDATE")
                  for s in (t.records_stream, t.control_stream, t.events_stream, kv_stream,
                            desired_stream)),
                *(f"{_JS}.CONSUMER.CREATE.{s}.>" for s in consumed),
                *(f"{_JS}.CONSUMER.DURABLE.CREATE.{s}.*" for s in consumed),
                *(f"{_JS}.CONSUMER.INFO.{s}.*" for s in consumed),
                *(f"{_JS}.CONSUMER.MSG.NEXT.{s}.*" for s in consumed),
                *(f"$JS.ACK.{s}.>" for s in consumed),
                f"$KV.{t.watermarks_bucket}.>",
            ),
            subscribe=(inbox,),
        )
    if role == "api":
        return Permissions(
            publish=(
                f"{t.prefix}.ctl.*",
                f"$KV.{t.desired_bucket}.*",  # each edge's signed desired state
                *(f"{_JS}.STREAM.INFO.{s}"
                  for s in (t.records_stream, t.control_stream, t.events_stream,
                            desired_stream)),
            ),
            subscribe=(inbox,),
        )
    if role == "admin":
        return Permissions(publish=(f"{_JS}.>",), subscribe=(inbox,))
    raise ValueError(f"unknown role {role!r}")
