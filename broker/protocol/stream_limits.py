"""Default limits of the records stream, apart from the topology so that settings and
the command line read them without importing the NATS client."""

from __future__ import annotations

__all__ = [
    "EVENTS_MAX_BYTES", "EVENTS_MAX_MSGS_PER_EDGE", "RECORDS_MAX_AGE_S", "RECORDS_MAX_BYTES",
]

RECORDS_MAX_BYTES = 10 * 1024**3
"""Default byte cap of ``ES_RECORDS``. The stream only needs what PostgreSQL has not
committed yet (the edge keeps every record until then and retransmits what the
stream discarded), so it is bounded: sizing rule in ``docs/scaling.md``."""
RECORDS_MAX_AGE_S = 24 * 3600.0
"""Default age cap of ``ES_RECORDS``: a day covers an ingest outage of a night."""
EVENTS_MAX_BYTES = 10 * 1024**3
"""Default byte cap of ``ES_EVENTS``. Without one, the events an edge may publish on its
own subject (up to NATS' 1 MiB each, at its link's speed) stayed for the stream's 7 days:
one compromised edge could fill the JetStream store, and with it every stream's writes.
Past it the oldest events go (the ingest consumes them as they come)."""
EVENTS_MAX_MSGS_PER_EDGE = 50_000
"""Default cap of the events ``ES_EVENTS`` keeps per edge (``max_msgs_per_subject``:
the subject is ``<p>.evt.<edge>``): 70 hours of 5-second heartbeats, so that one edge
flooding its subject with small events discards its own oldest events first. Events of
up to 1 MiB can still pass :data:`EVENTS_MAX_BYTES` first, and then the oldest of any
edge go (docs/security.md says what is at stake)."""
