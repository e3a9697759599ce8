"""Desired-state reports in PostgreSQL: each edge's reported state, its per-field drift,
and the rollout rows the report settles.

:class:`DesiredReportWriter` stores the ``desired_state`` events the events
consumer reads from ``<prefix>.evt.>``, inside its transaction (an
:data:`~cloud_ingest.events_consuming.EventWriter`; idempotent, so a redelivered
group changes nothing):

- ``edge_reported_state`` keeps each edge's latest report by the edge's clock
  (an older report arriving late does not overwrite a newer one); ``current``
  says whether it is about what the cloud last sent (same revision and digest);
  ``applied`` keeps what the last apply of that revision used (a re-check
  report applies nothing);
- ``edge_drift`` is replaced by the report's drift (a path still drifting keeps
  the time it was first reported);
- a rollout row ``dispatched`` with that revision becomes ``healthy`` or ``failed``
  (``failed`` or ``rejected`` reports), and one ``rolling_back`` becomes
  ``rolled_back`` once healthy - only when the digest is the one the cloud signed.

Statements cast their parameters (``::text::jsonb``, ``to_timestamp(float)``) so
they run unchanged on the ingest's connections, whose codecs are custom.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter

from broker.protocol.events import DesiredStateReport
from cloud_ingest.events_consuming import NEWER_BY_EDGE_CLOCK

__all__ = ["DesiredReportWriter"]

log = structlog.get_logger(__name__)

_STATE = """
INSERT INTO edge_reported_state AS s (edge_id, revision, version_id, digest, status, observed,
    reason, applied, reported_at, current)
VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8::text::jsonb,
    LEAST(to_timestamp($9::float8), now() + interval '1 minute'),
    EXISTS (SELECT 1 FROM edge_desired d WHERE d.edge_id = $1 AND d.revision = $2
            AND d.digest = $4))
ON CONFLICT (edge_id) DO UPDATE SET revision = EXCLUDED.revision,
    version_id = EXCLUDED.version_id, digest = EXCLUDED.digest, status = EXCLUDED.status,
    observed = CASE WHEN EXCLUDED.status = 'applying' THEN s.observed ELSE EXCLUDED.observed END,
    reason = EXCLUDED.reason,
    applied = CASE WHEN EXCLUDED.revision = s.revision AND EXCLUDED.applied = '[]'::jsonb
                   THEN s.applied ELSE EXCLUDED.applied END,
    reported_at = EXCLUDED.reported_at,
    received_at = now(), current = EXCLUDED.current
WHERE {newer}
RETURNING edge_id
""".format(newer=NEWER_BY_EDGE_CLOCK.format(stored="s.reported_at", new="EXCLUDED.reported_at"))

_DRIFT_UPSERT = """
INSERT INTO edge_drift (edge_id, path, desired, observed, revision, since)
SELECT $1, d->>'path', d->'desired', d->'observed', $2, to_timestamp($4::float8)
FROM jsonb_array_elements($3::text::jsonb) AS d
ON CONFLICT (edge_id, path) DO UPDATE SET desired = EXCLUDED.desired,
    observed = EXCLUDED.observed, revision = EXCLUDED.revision
"""

_DRIFT_PRUNE = """
DELETE FROM edge_drift WHERE edge_id = $1 AND NOT path = ANY($2::text[])
"""

_SETTLE = """
UPDATE rollout_edges e SET
    status = CASE WHEN $4 = 'healthy' THEN 'healthy' ELSE 'failed' END,
    reason = $5, settled_at = now(), updated_at = now()
FROM edge_desired d
WHERE e.edge_id = $1 AND e.revision = $2 AND e.status = 'dispatched'
  AND d.edge_id = $1 AND d.revision = $2 AND d.digest = $3
RETURNING e.rollout_id, e.status
"""

_ROLLED_BACK = """
UPDATE rollout_edges e SET status = 'rolled_back', reason = $4, updated_at = now(),
    settled_at = now()
FROM edge_desired d
WHERE e.edge_id = $1 AND e.rollback_revision = $2 AND e.status = 'rolling_back'
  AND d.edge_id = $1 AND d.revision = $2 AND d.digest = $3
RETURNING e.rollout_id
"""


class DesiredReportWriter:
    """Stores ``DesiredStateReport`` events (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.reports = Counter(
            "edgesync_desired_reports", "Desired-state reports stored, by status.", ["status"],
            registry=registry)

    async def __call__(self, conn: Any, events: list[Any]) -> None:
        for event in sorted(events, key=lambda e: e.reported_at):
            assert isinstance(event, DesiredStateReport)
            await self._store(conn, event)
            self.reports.labels(event.status).inc()

    async def _store(self, conn: Any, e: DesiredStateReport) -> None:
        stored = await conn.fetchval(
            _STATE, e.edge, e.revision, e.version_id, e.digest, e.status,
            json.dumps(e.observed), e.reason, json.dumps(e.applied), e.reported_at)
        if stored is not None and e.status != "applying":
            await conn.execute(_DRIFT_UPSERT, e.edge, e.revision, json.dumps(e.drift),
                               e.reported_at)
            await conn.execute(_DRIFT_PRUNE, e.edge, [str(d.get("path")) for d in e.drift])
        if e.status in ("healthy", "failed", "rejected"):
            settled = await conn.fetch(_SETTLE, e.edge, e.revision, e.digest, e.status,
                                       e.reason)
            for row in settled:
                log.info("rollout_edge_settled", rollout=row["rollout_id"], edge=e.edge,
                         status=row["status"], reason=e.reason or None)
        if e.status == "healthy":
            for row in await conn.fetch(_ROLLED_BACK, e.edge, e.revision, e.digest, e.reason):
                log.info("rollout_edge_rolled_back", rollout=row["rollout_id"], edge=e.edge)
