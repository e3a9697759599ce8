"""The bridge's outages as the SDK sees them: logged once when one starts, once when it ends.

An outage begins with the first request that has to be retried (connection
refused, 5xx, a full buffer) and ends with the next answer the bridge gives.
Both ends are one log line each (``sdk_bridge_unavailable`` as a warning,
``sdk_bridge_available`` with how long it lasted, how many requests were
retried and how often), however many requests and retries happened between;
the retries themselves are logged at debug level only.
"""

from __future__ import annotations

from edge_bridge.sdk._log import LOGGER_NAME, EventLogger
from edge_bridge.sdk.results import ClientStats

__all__ = ["OutageLog"]

_log = EventLogger(LOGGER_NAME)


class OutageLog:
    """The current outage of one client's bridge, if any."""

    def __init__(self, *, producer: str, url: str, stats: ClientStats) -> None:
        self._producer = producer
        self._url = url
        self._stats = stats
        self.since: float | None = None
        """Loop time the current outage began, or None while the bridge answers."""
        self.problem = ""
        """What went wrong last."""
        self._requests: set[int] = set()
        self._retries = 0

    def trouble(self, request_seq: int, problem: str, *, now: float, pending_records: int,
                retry_timeout_s: float) -> None:
        """A request will be retried: start (and log, once) an outage, or count into it."""
        self.problem = problem
        self._requests.add(request_seq)
        self._retries += 1
        if self.since is not None:
            return
        self.since = now
        self._stats.outages += 1
        _log.warning(
            "sdk_bridge_unavailable",
            producer=self._producer,
            url=self._url,
            reason=problem,
            pending_records=pending_records,
            retry_timeout_s=retry_timeout_s,
        )

    def recovered(self, *, now: float) -> None:
        """The bridge answered: end (and summarise, once) the outage, if there was one."""
        if self.since is None:
            return
        _log.info(
            "sdk_bridge_available",
            producer=self._producer,
            url=self._url,
            outage_s=round(now - self.since, 3),
            requests_retried=len(self._requests),
            retries=self._retries,
            last_problem=self.problem,
        )
        self.since = None
        self._requests = set()
        self._retries = 0
