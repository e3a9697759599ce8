"""How many ``(stream, epoch)`` keys one edge may make the cloud hold.

Every key an edge names becomes state that nothing removes: a ``committed_ranges``
row (a batch's seqs, a drop marker's, a heartbeat's trim floor), a ``stream_keys``
row, and a watermark key in the shared ``<P>_WATERMARKS`` bucket. A well-behaved
bridge holds at most ``bridge.max_streams`` streams (2,500) with one epoch each, and
mints a new epoch only when its buffer is wiped; a compromised edge could name a new
epoch in every message, and fill PostgreSQL and JetStream for everyone.

So a key that has no ``committed_ranges`` row yet is taken only while its edge holds
fewer than ``ingest.max_keys_per_edge`` keys; past it, what names a new key is a dead
letter with the reason (the seqs are not accounted: no row is made), and the edge's
existing keys go on as before. Checked before each write, only for keys the writer
does not know (after the first group, a fleet's keys are known: no query). Workers
that check at once may each take keys before either commits, so an edge can pass the
bound, once, by at most a group's messages per worker (``group_max_messages`` x
``workers`` x ingest processes); every check after that refuses.
"""

from __future__ import annotations

from collections.abc import Iterable

from cloud_ingest.db_errors import Connection

__all__ = ["StreamKey", "key_limit_reason", "keys_over_limit"]

StreamKey = tuple[str, str, int]
"""``(edge, stream, epoch)``."""

_NEW_KEYS = """
WITH u AS (SELECT DISTINCT * FROM unnest($1::text[], $2::text[], $3::int8[]) AS u(e, s, ep)),
new AS (SELECT u.* FROM u WHERE NOT EXISTS (
    SELECT 1 FROM committed_ranges c WHERE (c.edge_id, c.stream, c.epoch) = (u.e, u.s, u.ep))),
held AS (SELECT c.edge_id, count(*) AS n FROM committed_ranges c
         WHERE c.edge_id IN (SELECT DISTINCT e FROM new) GROUP BY c.edge_id)
SELECT new.e, new.s, new.ep, coalesce(held.n, 0) AS held
FROM new LEFT JOIN held ON held.edge_id = new.e
ORDER BY 1, 2, 3
"""


async def keys_over_limit(conn: Connection, keys: Iterable[StreamKey], limit: int
                          ) -> set[StreamKey]:
    """The keys of ``keys`` that are new (no ``committed_ranges`` row) and would take
    their edge to more than ``limit`` keys; the others may be written."""
    wanted = sorted(set(keys))
    if not wanted:
        return set()
    rows = await conn.fetch(_NEW_KEYS, [k[0] for k in wanted], [k[1] for k in wanted],
                            [k[2] for k in wanted])
    refused: set[StreamKey] = set()
    held: dict[str, int] = {}
    for r in rows:
        edge = r[0]
        n = held.get(edge, r[3])
        if n >= limit:
            refused.add((edge, r[1], r[2]))
            continue
        held[edge] = n + 1
    return refused


def key_limit_reason(key: StreamKey, limit: int) -> str:
    """The dead-letter reason for what names ``key`` past the limit."""
    edge, stream, epoch = key
    return (f"edge {edge!r} holds {limit} (stream, epoch) keys already "
            f"(ingest.max_keys_per_edge): stream {stream!r} epoch {epoch} refused")
