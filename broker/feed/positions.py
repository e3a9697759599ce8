"""Positions and cursors of the commit-ordered feed.

A committed row's position is ``(commit_id << 24) | ord``: the id its transaction
got at COMMIT (in commit order, see ``cloud_ingest/migrations/006_feed.sql``) and
its place among that commit's rows. A *cursor* names a point between rows: every
row at or below it is behind the reader. ``end_of(c)`` is the cursor after the
whole commit ``c``; 0 is the cursor before everything. Cursors travel as decimal
strings, which clients treat as opaque.
"""

from __future__ import annotations

from typing import Final

from broker.errors import InvalidInput

__all__ = [
    "EARLIEST",
    "FEED_CHANNEL",
    "MAX_CURSOR",
    "ORD_BITS",
    "ORD_END",
    "commit_of",
    "decode_cursor",
    "encode_cursor",
    "end_of",
    "last_whole_commit",
    "ord_of",
    "position",
]

FEED_CHANNEL: Final = "edgesync_feed"
"""LISTEN/NOTIFY channel of the feed; the payload is the commit id (migration 006)."""
ORD_BITS: Final = 24
ORD_END: Final = (1 << ORD_BITS) - 1
"""The ord of :func:`end_of`: above any row's (a commit holds fewer than 2**24 - 1 rows)."""
EARLIEST: Final = 0
"""The cursor before the first commit."""
MAX_CURSOR: Final = 2**63 - 1
"""Positions are PostgreSQL bigints: no cursor the feed hands out is above this."""


def position(commit_id: int, ord_: int) -> int:
    return (commit_id << ORD_BITS) | ord_


def commit_of(pos: int) -> int:
    return pos >> ORD_BITS


def ord_of(pos: int) -> int:
    return pos & ORD_END


def end_of(commit_id: int) -> int:
    """The cursor after every row of commit ``commit_id``."""
    return position(commit_id, ORD_END)


def last_whole_commit(cursor: int) -> int:
    """The last commit wholly behind ``cursor``."""
    return commit_of(cursor) if ord_of(cursor) == ORD_END else commit_of(cursor) - 1


def encode_cursor(cursor: int) -> str:
    return str(cursor)


def decode_cursor(token: str) -> int:
    """The cursor a token names.

    Raises:
        InvalidInput: not a cursor this feed hands out (``invalid_cursor``).
    """
    try:
        cursor = int(token)
    except ValueError:
        cursor = -1
    if not 0 <= cursor <= MAX_CURSOR or not token.isascii() or not token.isdigit():
        raise InvalidInput(f"invalid cursor {token!r}: pass a cursor the feed returned",
                           code="invalid_cursor")
    return cursor
