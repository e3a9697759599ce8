"""Command status in PostgreSQL: the edges' reports, and expiry decided by the cloud.

:class:`CommandStatusWriter` stores the ``command_status`` events the
events consumer reads from ``<prefix>.evt.>``, inside its transaction. A report
changes a command's row only when all of these hold:

- the reporting edge is the command's edge (an edge speaks for itself only);
- its digest is the digest of the signed command the cloud issued (a forged
  message reusing a real id cannot change that command);
- the move is forward: ``pending -> delivered -> final``; a final status is
  final, except ``expired`` set by the cloud, which an edge's report
  supersedes (the edge acted before the expiry, it just could not say so);
- it is not a replay refusal (the original outcome stands).

Every report is also appended to ``command_events`` (idempotently), whether
or not it changed the row, so forgeries and replays leave a trace.

:func:`expire_overdue` is the cloud's half: commands still ``pending`` at
their ``expires_at`` become ``expired``.

Statements cast their parameters (``::text::jsonb``, ``to_timestamp(float)``)
so they run unchanged on the ingest's connections, whose jsonb and timestamptz
codecs are custom.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter

from broker.protocol.command_status import FINAL_STATUSES, CommandStatus
from broker.protocol.commands import COMMAND_ID
from broker.protocol.events import CommandStatusReport
from cloud_ingest.db_errors import Connection

__all__ = ["CommandStatusWriter", "expire_overdue"]

log = structlog.get_logger(__name__)

_CLOUD_EXPIRED = "(status = 'expired' AND finished_by = 'cloud')"

_DELIVERED = f"""
UPDATE commands SET
    delivered_at = coalesce(delivered_at, to_timestamp($4::float8)),
    status = CASE WHEN status = 'pending' OR {_CLOUD_EXPIRED} THEN 'delivered' ELSE status END,
    code = CASE WHEN {_CLOUD_EXPIRED} THEN NULL ELSE code END,
    reason = CASE WHEN {_CLOUD_EXPIRED} THEN NULL ELSE reason END,
    finished_at = CASE WHEN {_CLOUD_EXPIRED} THEN NULL ELSE finished_at END,
    finished_by = CASE WHEN {_CLOUD_EXPIRED} THEN NULL ELSE finished_by END,
    updated_at = now()
WHERE id = $1::uuid AND edge_id = $2 AND digest = $3
  AND (status = 'pending' OR delivered_at IS NULL OR {_CLOUD_EXPIRED})
RETURNING status
"""

_FINAL = f"""
UPDATE commands SET
    status = $4::text,
    code = nullif($5::text, ''),
    reason = nullif($6::text, ''),
    result = $7::text::jsonb,
    finished_at = to_timestamp($8::float8),
    finished_by = 'edge',
    delivered_at = CASE WHEN $4::text IN ('applied', 'failed')
                        THEN coalesce(delivered_at, to_timestamp($8::float8))
                        ELSE delivered_at END,
    updated_at = now()
WHERE id = $1::uuid AND edge_id = $2 AND digest = $3
  AND (status IN ('pending', 'delivered') OR {_CLOUD_EXPIRED})
RETURNING status
"""

_EVENT = """
INSERT INTO command_events
    (command_id, edge_id, digest, status, code, reason, result, reported_at, effective)
VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb, to_timestamp($8::float8), $9)
ON CONFLICT (edge_id, command_id, status, reported_at) DO NOTHING
"""

_EXPIRE = """
UPDATE commands SET status = 'expired', finished_by = 'cloud', code = 'expired',
       reason = 'not delivered before it expired', finished_at = now(), updated_at = now()
WHERE status = 'pending' AND expires_at <= now()
RETURNING id, edge_id
"""


class CommandStatusWriter:
    """Stores ``CommandStatusReport`` events.

    An :data:`~cloud_ingest.events_consuming.EventWriter`.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.reports = Counter(
            "edgesync_command_status_reports", "Command status reports stored, by status and "
            "whether they changed the command.", ["status", "effective"], registry=registry,
        )

    async def __call__(self, conn: Any, events: list[Any]) -> None:
        """Store ``events`` (in order) using ``conn``, inside the caller's transaction."""
        for event in events:
            assert isinstance(event, CommandStatusReport)
            effective = await self._update(conn, event)
            result = None if event.result is None else json.dumps(event.result)
            await conn.execute(_EVENT, event.command_id, event.edge, event.digest, event.status,
                               event.code, event.reason, result, event.reported_at, effective)
            self.reports.labels(event.status, "true" if effective else "false").inc()
            if not effective and event.status != CommandStatus.DELIVERED:
                log.info("command_status_ignored", command=event.command_id or None,
                         edge=event.edge, status=event.status, code=event.code)

    async def _update(self, conn: Any, event: CommandStatusReport) -> bool:
        if not COMMAND_ID.match(event.command_id) or event.code == "replay":
            return False
        if event.status == CommandStatus.DELIVERED:
            row = await conn.fetchrow(_DELIVERED, event.command_id, event.edge, event.digest,
                                      event.reported_at)
        elif event.status in FINAL_STATUSES:
            result = None if event.result is None else json.dumps(event.result)
            row = await conn.fetchrow(_FINAL, event.command_id, event.edge, event.digest,
                                      event.status, event.code, event.reason, result,
                                      event.reported_at)
        else:
            return False
        return row is not None


async def expire_overdue(conn: Connection
                         ) -> list[tuple[str, str]]:
    """Mark commands still ``pending`` past ``expires_at`` as ``expired``.

    Returns:
        ``(command id, edge id)`` of each command expired now.
    """
    rows = await conn.fetch(_EXPIRE)
    return [(str(r["id"]), str(r["edge_id"])) for r in rows]
