"""Default limits of the records stream, apart from the topology so that settings and
the command line read them without importing the NATS client."""

from __future__ import annotations

__all__ = ["RECORDS_MAX_AGE_S", "RECORDS_MAX_BYTES"]

RECORDS_MAX_BYTES = 10 * 1024**3
"""Default byte cap of ``ES_RECORDS``. The stream only needs what PostgreSQL has not
committed yet (the edge keeps every record until then and retransmits what the
stream discarded), so it is bounded: sizing rule in ``docs/scaling.md``."""
RECORDS_MAX_AGE_S = 24 * 3600.0
"""Default age cap of ``ES_RECORDS``: a day covers an ingest outage of a night."""
