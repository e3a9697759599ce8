"""Reading the commit-ordered feed: pages of committed rows after a cursor.

A page is read in two statements: the next commits (``feed_commits``, in
``commit_id`` order, a running sum of their rows bounding the page), then their
rows by primary-key ranges (each commit lists its rows as seq spans), so reading
costs index range scans and the rows carry no extra column. Everything read was
committed before the commit ids were handed out to later transactions (migration
006), so a reader never skips a row and never sees an uncommitted one.

A page is bounded by bytes too (:data:`PAGE_MAX_BYTES`): it ends before the record
that would take its records' bytes past the budget, right after its last record, and
a single larger record comes alone. Each commit says how large its largest record is
(migration 013), so a page that cannot reach the budget reads its rows as above;
otherwise PostgreSQL sums the rows' sizes as it reads them and sends only those that
fit.

Completeness travels with the feed: each commit carries the watermark of every
``(edge, stream, epoch)`` it touched, so the completeness at a cursor is the last
watermark of each key among the commits behind it.
"""

from __future__ import annotations

import gc
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import asyncpg
import msgspec

from broker.errors import InvalidInput
from broker.feed.positions import (
    EARLIEST,
    ORD_END,
    commit_of,
    decode_cursor,
    encode_cursor,
    end_of,
    last_whole_commit,
    ord_of,
    position,
)

__all__ = [
    "PAGE_MAX_BYTES",
    "Connection",
    "FeedRecord",
    "Filters",
    "Page",
    "StartAt",
    "StreamKey",
    "checked_cursor",
    "completeness_at",
    "head_cursor",
    "parse_start_at",
    "read_page",
    "resolve_start",
]

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
StreamKey = tuple[str, str, int]
"""``(edge, stream, epoch)``."""
StartAt = Literal["earliest", "latest"] | str | int | datetime
"""Where a new reader starts: ``earliest``, ``latest``, a cursor (its token or its
value) or a time (the first commit at or after it, cloud clock)."""


PAGE_MAX_BYTES: Final = 8 * 1024 * 1024
"""Bytes of records (payload, headers and key as stored) a page holds at most by
default (a single larger record comes alone): with payloads of up to 1 MiB (4 MiB if
configured), a page bounded by its record count alone could hold gigabytes."""


_COMMITS = """
SELECT commit_id, committed_at, edge_ids, streams, epochs, first_seqs, last_seqs,
       wm_edge_ids, wm_streams, wm_epochs, watermarks, received_at, max_record_bytes
FROM (SELECT *, sum(rows) OVER (ORDER BY commit_id) AS upto
      FROM (SELECT * FROM feed_commits WHERE commit_id >= $1
            ORDER BY commit_id LIMIT $2) AS next) AS c
WHERE upto - rows < $3
ORDER BY commit_id
"""
# The rows of a page's spans, span by span (nested loops in unnest's order). No ORDER
# BY: a span's rows come in the index's order, which within a seq bucket is the order
# they were written, seq order (a batch's records are COPYed in order); _rows checks
# that and sorts only if it ever differs (a sort here cost ~15 % of the query).
_SPAN_ROWS = """
FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $8::timestamptz[])
     WITH ORDINALITY AS u(edge_id, stream, epoch, lo, hi, rx, i)
CROSS JOIN LATERAL (
    SELECT k.id FROM stream_keys k
    WHERE (k.edge_id, k.stream, k.epoch) = (u.edge_id, u.stream, u.epoch) OFFSET 0
) k
CROSS JOIN LATERAL (
    SELECT {columns} FROM records r
    WHERE r.stream_key = k.id AND r.seq BETWEEN u.lo AND u.hi
      -- one partition, one index range, when the commit's received_at is known: the
      -- index's seq buckets (migration 010) bound it to the span's seqs
      AND r.received_at BETWEEN coalesce(u.rx, '-infinity') AND coalesce(u.rx, 'infinity')
      AND (r.seq >> 7) BETWEEN (u.lo >> 7) AND (u.hi >> 7)
      AND ($6::timestamptz IS NULL OR r.event_time >= $6)
      AND ($7::timestamptz IS NULL OR r.event_time < $7)
    OFFSET 0  -- not pulled up: always an index scan per span, whatever the statistics
) r
"""
_COLUMNS = """u.i, r.seq, r.event_time,
       -- a row's received_at is its commit's, which the reader has: sent only if unknown
       CASE WHEN u.rx IS NULL THEN r.received_at END AS received_at,
       r.key, r.headers, r.payload, r.payload_raw"""
_SIZE = """r.*, coalesce(octet_length(r.payload::text), octet_length(r.payload_raw))
             + coalesce(octet_length(r.headers::text), 0)
             + coalesce(octet_length(r.key), 0) AS size"""
"""A row's bytes as the page budget counts them (what the API then holds and sends)."""
_ROWS = f"SELECT {_COLUMNS}, true AS fits\n{_SPAN_ROWS.format(columns='*')}"
"""Every row of the spans: for a page whose commits say it cannot reach its bytes."""
# The same rows cut by bytes ($9): a running sum of each row's size (payload, headers
# and key as stored; octet_length reads a TOASTed value's size from its pointer,
# without fetching it) keeps the rows up to $9 bytes, always the first one, and
# returns the next one with `fits` false and neither payload nor headers: the page
# was cut before it. Rows past it are read (their heap tuples, not their TOASTed
# values) but not sent. The window costs (about 0.5 to 1 µs a row, measured), so it
# runs only when the commits cannot vouch for the page (migration 013).
#
# The sum runs in position order (span, then seq; a sort), never in the index's order:
# the page ends at its last record, so every record before that one in position order
# must be in it. Summed in an order that differs (heap order within a seq bucket is
# the order rows were written, not a promise), a record could fall after the cut while
# a later one made the page, and the next page would start past it: a hole.
_ROWS_BY_BYTES = f"""
SELECT i, seq, event_time, received_at, key,
       CASE WHEN fits THEN headers END, CASE WHEN fits THEN payload END,
       CASE WHEN fits THEN payload_raw END, fits
FROM (SELECT *, upto <= $9 OR n = 1 AS fits
      FROM (SELECT {_COLUMNS}, r.size,
                   sum(r.size) OVER w AS upto, row_number() OVER w AS n
            {_SPAN_ROWS.format(columns=_SIZE)}
            WINDOW w AS (ORDER BY u.i, r.seq ROWS UNBOUNDED PRECEDING)) AS s
      WHERE upto - size <= $9 OR n <= 2  -- what fits, and the first row that does not
     ) AS p
ORDER BY i, seq"""
_json = msgspec.json.Decoder()
_headers = msgspec.json.Decoder(dict[str, str])


class FeedRecord(msgspec.Struct, frozen=True):
    """One committed record, as the feed delivers it.

    A :class:`msgspec.Struct`, not a dataclass: a frozen dataclass's ``__init__``
    cost more than decoding the payload, per record.
    """

    position: int
    edge: str
    stream: str
    epoch: int
    seq: int
    event_time: datetime
    """As the producer said (edge clock)."""
    received_at: datetime
    """When the ingest wrote it (cloud clock)."""
    key: str | None
    headers: dict[str, str] | None
    payload: Any
    """The decoded JSON payload, or ``bytes`` for an opaque one."""

    @property
    def cursor(self) -> str:
        """The cursor just after this record (resume here to get what follows)."""
        return encode_cursor(self.position)

    @property
    def identity(self) -> tuple[str, str, int, int]:
        """``(edge, stream, epoch, seq)``: unique; de-duplicate redeliveries by it."""
        return (self.edge, self.stream, self.epoch, self.seq)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the HTTP and CLI form); opaque payloads as base64. The
        epoch also as a string (``epoch_str``): epochs are random 63-bit integers, and a
        JSON reader with doubles only (JavaScript, jq) rounds past 2^53."""
        import base64

        binary = isinstance(self.payload, bytes)
        return {
            "cursor": self.cursor, "edge": self.edge, "stream": self.stream,
            "epoch": self.epoch, "epoch_str": str(self.epoch), "seq": self.seq,
            "event_time": self.event_time.isoformat(),
            "received_at": self.received_at.isoformat(),
            "key": self.key, "headers": self.headers,
            "payload": base64.b64encode(self.payload).decode() if binary else self.payload,
            "payload_is_binary": binary,
        }


@dataclass(frozen=True, slots=True)
class Filters:
    """Which records a reader wants; empty means all."""

    edges: tuple[str, ...] = ()
    streams: tuple[str, ...] = ()
    since: datetime | None = None
    """Only records whose event time is at or after this."""
    until: datetime | None = None
    """Only records whose event time is before this."""

    def wants(self, edge: str, stream: str) -> bool:
        return ((not self.edges or edge in self.edges)
                and (not self.streams or stream in self.streams))

    def to_json(self) -> dict[str, Any]:
        return {"edges": list(self.edges), "streams": list(self.streams),
                "since": self.since.isoformat() if self.since else None,
                "until": self.until.isoformat() if self.until else None}

    @classmethod
    def of(cls, *, edges: Iterable[str] | None = None, streams: Iterable[str] | None = None,
           since: datetime | None = None, until: datetime | None = None) -> Filters:
        """The filters, with ``since``/``until`` in UTC.

        Raises:
            InvalidInput: a time without a zone, or one whose UTC is outside the years
                1-9999 (``0001-01-01T00:00+01:00``): ``invalid_time``, before any read
                (an NDJSON stream would otherwise fail after its 200).
        """
        return cls(tuple(edges or ()), tuple(streams or ()), _utc(since, "since"),
                   _utc(until, "until"))


def _utc(t: datetime | None, what: str) -> datetime | None:
    if t is None:
        return None
    if t.tzinfo is None:
        raise InvalidInput("times must be timezone-aware (e.g. 2026-01-01T00:00Z)",
                           code="invalid_time")
    try:
        return t.astimezone(UTC)
    except OverflowError:
        raise InvalidInput(f"{what}: {t.isoformat()} is out of range (years 1 to 9999 "
                           "in UTC)", code="invalid_time") from None


@dataclass(slots=True)
class Page:
    """Records after a cursor, and where the feed stands after them."""

    records: list[FeedRecord]
    cursor: int
    """The cursor after this page (it may pass commits the filters skip entirely)."""
    watermarks: dict[StreamKey, int] = field(default_factory=dict)
    """Completeness this page advanced: key -> every seq up to it is committed, dropped
    or dead-lettered, and the committed ones are at or below :attr:`cursor`."""
    caught_up: bool = False
    """Whether the page reached the end of the feed as it was when read."""


async def read_page(conn: Connection, after: int, filters: Filters = Filters(), *,
                    limit: int = 1000, max_commits: int = 1000,
                    max_bytes: int = PAGE_MAX_BYTES) -> Page:
    """The committed records after cursor ``after`` that pass ``filters``.

    Args:
        limit: rows to plan at most (a commit is split across pages when larger).
        max_commits: commits to look at at most (bounds a page of a narrow filter).
        max_bytes: bytes of records (payload, headers and key, as stored) at most: the
            page ends before the record that would pass it (``caught_up`` false, its
            cursor just after the last record it holds), but always holds one record,
            however large, so that a reader never stalls.
    """
    mid = ord_of(after) != ORD_END
    first = commit_of(after) if mid else commit_of(after) + 1
    commits = await conn.fetch(_COMMITS, first, max_commits, limit)
    spans: list[tuple[str, str, int, int, int]] = []
    places: list[tuple[int, int, int]] = []  # (commit_id, ord of the span's first seq, seq)
    received: list[Any] = []  # each span's commit's received_at (None: unknown)
    cursor = after
    marks: list[tuple[int, StreamKey, int]] = []  # (commit_id, key, watermark)
    planned = listed = 0
    most: int | None = 0  # at least the bytes of the planned rows (None: unknown)
    stopped = False
    for c in commits:
        cid = c["commit_id"]
        behind = ord_of(after) if mid and cid == commit_of(after) else -1
        base = 0
        for edge, stream, epoch, lo, hi in zip(c["edge_ids"], c["streams"], c["epochs"],
                                               c["first_seqs"], c["last_seqs"], strict=True):
            n = hi - lo + 1
            span_base, base = base, base + n
            first_ord = max(span_base, behind + 1)  # ords up to `behind` were delivered
            if first_ord >= base or not filters.wants(edge, stream):
                continue
            if planned >= limit:  # the page is full before this span
                cursor = position(cid, first_ord - 1) if first_ord else end_of(cid - 1)
                stopped = True
                break
            take = min(base - first_ord, limit - planned)
            start = lo + first_ord - span_base
            spans.append((edge, stream, epoch, start, start + take - 1))
            places.append((cid, first_ord, start))
            received.append(c["received_at"])
            planned += take
            if most is not None:
                most = (None if c["max_record_bytes"] is None
                        else most + take * c["max_record_bytes"])
            if first_ord + take < base:  # the page is full inside this span
                cursor = position(cid, first_ord + take - 1)
                stopped = True
                break
        if stopped:
            break
        listed += base
        cursor = end_of(cid)
        marks += ((cid, (e, s, ep), w) for e, s, ep, w in zip(
            c["wm_edge_ids"], c["wm_streams"], c["wm_epochs"], c["watermarks"], strict=True)
            if filters.wants(e, s))
    records: list[FeedRecord] = []
    if spans:
        records, cut = await _rows(conn, spans, places, received, filters,
                                  max_bytes=None if most is not None and most <= max_bytes
                                  else max_bytes)
        if cut:  # full by bytes: the page ends after its last record
            cursor = records[-1].position
            stopped = True
    # completeness of the commits wholly behind the cursor (a commit cut inside by count
    # or bytes is not: the next page reports it)
    watermarks = {key: w for cid, key, w in marks if end_of(cid) <= cursor}
    caught_up = not stopped and listed < limit and len(commits) < max_commits
    return Page(records, cursor, watermarks, caught_up)


async def _rows(conn: Connection, spans: Sequence[tuple[str, str, int, int, int]],
                places: Sequence[tuple[int, int, int]], received: list[Any],
                filters: Filters, *, max_bytes: int | None
                ) -> tuple[list[FeedRecord], bool]:
    """The records of ``spans`` in position order, up to ``max_bytes`` (always one;
    None: all, the commits vouch that they fit), and whether some were left out for
    the bytes (the page ends after the last)."""
    args = [[s[0] for s in spans], [s[1] for s in spans], [s[2] for s in spans],
            [s[3] for s in spans], [s[4] for s in spans], filters.since, filters.until,
            received]
    # per span (1-based, as unnest numbers them): position of seq s = base + s, its key,
    # and its commit's received_at (every row of a commit has it; the query checks)
    info = [(0, "", "", 0, None), *((position(cid, ord_lo) - lo, *s[:3], rx)
                                    for (cid, ord_lo, lo), s, rx
                                    in zip(places, spans, received, strict=True))]
    if max_bytes is None:
        out, cut_at = _decoded(await conn.fetch(_ROWS, *args), info)
        if any(a.position >= b.position for a, b in itertools.pairwise(out)):
            out.sort(key=_position)
    else:  # summed and sent in position order (see _ROWS_BY_BYTES)
        out, cut_at = _decoded(await conn.fetch(_ROWS_BY_BYTES, *args, max_bytes), info)
    return out, cut_at is not None


def _decoded(rows: Sequence[asyncpg.Record], info: Sequence[tuple[int, str, str, int, Any]]
             ) -> tuple[list[FeedRecord], int | None]:
    """The records of ``rows``, and the position of the one left out for the bytes."""
    out: list[FeedRecord] = []
    cut_at = None
    # Decoding a page allocates tens of objects per record, all kept: the cyclic GC
    # would rescan them again and again (it cost 80 % of the decoding, measured). None
    # of them can form a cycle, so it is paused for this loop (no await inside).
    paused = gc.isenabled()
    gc.disable()
    try:
        # The payload and headers are the stored JSON text (migration 010), as sent.
        for i, seq, event_time, received_at, key, headers, payload, raw, fits in rows:
            base, edge, stream, epoch, rx = info[i]
            if not fits:  # the first record past the bytes (the last row): not sent
                cut_at = base + seq
                break
            out.append(FeedRecord(
                base + seq, edge, stream, epoch, seq, event_time,
                rx if received_at is None else received_at, key,
                _headers.decode(headers) if headers is not None else None,
                bytes(raw) if raw is not None else _json.decode(payload),
            ))
    finally:
        if paused:
            gc.enable()
    return out, cut_at


def _position(r: FeedRecord) -> int:
    return r.position


async def head_cursor(conn: Connection) -> int:
    """The cursor after the last commit visible now."""
    last = await conn.fetchval("SELECT max(commit_id) FROM feed_commits")
    return end_of(last or 0)


async def completeness_at(conn: Connection, cursor: int,
                          filters: Filters = Filters()) -> dict[StreamKey, int]:
    """Per key the filters pass, the watermark as of ``cursor`` (keys with none omitted).

    Reads every commit behind the cursor (watermarks only grow, so the largest is the
    last): a cost paid once when a reader resumes, not per page. Commits retention
    trimmed count through ``feed_baseline``; a cursor behind them reads on from the
    oldest commit kept (what lay behind is gone).
    """
    rows = await conn.fetch(
        "SELECT w.edge_id, w.stream, w.epoch, max(w.watermark) AS watermark "
        "FROM (SELECT w.* FROM feed_commits c, unnest(c.wm_edge_ids, c.wm_streams,"
        "        c.wm_epochs, c.watermarks) AS w(edge_id, stream, epoch, watermark)"
        "      WHERE c.commit_id <= $1"
        # what retention trimmed from the feed (migration 008): its last watermarks
        "      UNION ALL SELECT edge_id, stream, epoch, watermark FROM feed_baseline) w "
        "WHERE (cardinality($2::text[]) = 0 OR w.edge_id = ANY($2))"
        "  AND (cardinality($3::text[]) = 0 OR w.stream = ANY($3)) "
        "GROUP BY 1, 2, 3",
        last_whole_commit(cursor), list(filters.edges), list(filters.streams))
    return {(r[0], r[1], r[2]): r[3] for r in rows}


async def checked_cursor(conn: Connection, cursor: int | str) -> int:
    """``cursor`` (a token or its value), if the feed could have handed it out.

    Commit ids only grow, so every cursor a reader was given is at or below the last
    commit id ever assigned. One above it was made up or tampered with, or the database
    was restored from a backup behind it: read from there, it would silently skip every
    commit until the ids caught up.

    Raises:
        InvalidInput: not a cursor (``invalid_cursor``), or beyond the end of the feed
            (``cursor_ahead``).
    """
    value = decode_cursor(cursor) if isinstance(cursor, str) else cursor
    if value < 0:
        raise InvalidInput(f"invalid cursor {cursor}", code="invalid_cursor")
    last = await conn.fetchval(
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM feed_commit_seq")
    if commit_of(value) > int(last or 0):
        raise InvalidInput(
            f"cursor {encode_cursor(value)} is beyond the end of the feed (no commit "
            f"{commit_of(value)} yet): pass a cursor the feed returned, or earliest/latest "
            "(a database restored from a backup behind it starts the feed over)",
            code="cursor_ahead")
    return value


async def resolve_start(conn: Connection, start_at: StartAt) -> int:
    """The cursor ``start_at`` names (see :data:`StartAt`).

    Raises:
        InvalidInput: not one of the forms of :data:`StartAt`.
    """
    if isinstance(start_at, datetime):
        if start_at.tzinfo is None:
            raise InvalidInput("start_at: a time must be timezone-aware", code="invalid_time")
        first = await conn.fetchval(
            "SELECT min(commit_id) FROM feed_commits WHERE committed_at >= $1",
            _utc(start_at, "start_at"))
        return await head_cursor(conn) if first is None else end_of(first - 1)
    if isinstance(start_at, int):
        return await checked_cursor(conn, start_at)
    if start_at == "earliest":
        return EARLIEST
    if start_at == "latest":
        return await head_cursor(conn)
    return await checked_cursor(conn, start_at)


_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_start_at(text: str) -> StartAt:
    """``earliest``, ``latest``, a cursor (digits), a duration ago (``90s``, ``15m``,
    ``2h``, ``7d``) or an ISO 8601 time (UTC when it names no zone).

    Raises:
        InvalidInput: none of those (``invalid_start``).
    """
    text = text.strip()
    if text in ("earliest", "latest"):
        return text
    if text.isdigit():
        return decode_cursor(text)
    if m := _DURATION.match(text):
        try:
            return datetime.now(UTC) - timedelta(seconds=int(m[1]) * _UNIT_S[m[2]])
        except OverflowError:  # before year 1, or past timedelta's 999,999,999 days
            raise InvalidInput(f"{text!r}: a duration that long reaches before year 1; "
                               "use earliest", code="invalid_start") from None
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput(f"{text!r} is not earliest, latest, a cursor, a duration (15m) "
                           "or an ISO 8601 time", code="invalid_start") from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)
