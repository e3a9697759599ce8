"""The lifecycle of a control command, named once for the edge, the cloud, the API and
the CLI: ``pending -> delivered -> applied | failed | rejected``, or ``expired``.

Deliberately free of heavy imports: the CLI reads it at start-up.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["FINAL_STATUSES", "CommandStatus"]


class CommandStatus(enum.StrEnum):
    """Where a command stands. The edge reports it in
    :class:`~broker.protocol.events.CommandStatusReport` events; the cloud stores it."""

    PENDING = "pending"
    """Stored by the cloud, not yet seen by the edge."""
    DELIVERED = "delivered"
    """The edge verified it and is acting on it."""
    APPLIED = "applied"
    FAILED = "failed"
    """Valid and allowed, but it could not be carried out."""
    REJECTED = "rejected"
    """Refused: signature, replay, policy or spec."""
    EXPIRED = "expired"
    """Not acted on before its expiry (decided by the edge, or by the cloud if undelivered)."""


FINAL_STATUSES: Final = frozenset({CommandStatus.APPLIED, CommandStatus.FAILED,
                                   CommandStatus.REJECTED, CommandStatus.EXPIRED})
"""Statuses a command never leaves (except a cloud ``expired`` an edge report supersedes)."""
