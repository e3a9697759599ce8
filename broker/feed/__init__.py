"""Consuming committed records: the commit-ordered feed and its consumer SDK.

Every row the cloud commits gets a position in commit order
(``cloud_ingest/migrations/006_feed.sql``); readers follow it from a cursor and
never skip a row or see an uncommitted one. :class:`Subscription` (async) and
:class:`SyncSubscription` are named durable readers with filters, checkpoints and
a lease; :func:`read_page` is the stateless read the HTTP API and ``edgesync
tail`` use. Only ``asyncpg`` and ``msgspec`` are needed: no server code is imported.
Constants and type aliases live in their modules (:mod:`broker.feed.positions`,
:mod:`broker.feed.reading`). See ``docs/analytics.md``.
"""

from broker.feed.blocking import SyncSubscription
from broker.feed.following import follow
from broker.feed.positions import decode_cursor, encode_cursor
from broker.feed.reading import (
    FeedRecord,
    Filters,
    Page,
    checked_cursor,
    completeness_at,
    head_cursor,
    parse_start_at,
    read_page,
    resolve_start,
)
from broker.feed.subscribing import FeedBatch, Subscription

__all__ = [
    "FeedBatch",
    "FeedRecord",
    "Filters",
    "Page",
    "Subscription",
    "SyncSubscription",
    "checked_cursor",
    "completeness_at",
    "decode_cursor",
    "encode_cursor",
    "follow",
    "head_cursor",
    "parse_start_at",
    "read_page",
    "resolve_start",
]
