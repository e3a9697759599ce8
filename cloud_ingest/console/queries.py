"""What the console reads from PostgreSQL: the fleet page, one edge, completeness history.

The fleet page stays cheap at any fleet size: filter, search, sort and count run in
PostgreSQL over the ``edges`` table (one row per edge), only one page of rows leaves
the database, and the per-stream completeness (``v_completeness``) is computed only
for that page's edges. ``bench`` scenario ``console`` times it at 10,000 edges.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from cloud_ingest.db_errors import Connection

__all__ = [
    "DRIFT_ROWS",
    "FLEET_SORTS",
    "FLEET_STATES",
    "LAGGING_AFTER_S",
    "PAGE_SIZES",
    "FleetPage",
    "FleetQuery",
    "completeness_rows",
    "desired_state",
    "edge_detail",
    "fleet_page",
    "parse_multirange",
    "rollouts",
    "watermark_history",
]

# Records an edge dropped by policy, all streams and reasons ({stream: {reason: n}}). Most
# edges drop nothing: the cheap jsonpath test spares them the sum (nested jsonb_each
# over 10,000 rows cost ~1 s on 2 busy cores; this ~40 ms). The counts are the edge's
# heartbeat, any JSON number: the sum is held within int8 (and the negative ignored),
# or one edge reporting 2^62 twice would make every fleet page "bigint out of range".
_DROPPED_TOTAL: Final = (
    "CASE WHEN jsonb_path_exists(e.dropped, '$.*.* ? (@ > 0)') THEN (SELECT"
    " least(coalesce(sum(greatest(x::numeric, 0)), 0), 9223372036854775807)::int8"
    " FROM jsonb_array_elements_text(jsonb_path_query_array("
    "e.dropped, '$.*.* ? (@.type() == \"number\")')) x) ELSE 0 END")

FLEET_SORTS: Final[dict[str, str]] = {
    "edge": "e.edge_id",
    "seen": "e.last_seen",
    "backlog": "e.unshipped_records",
    "bytes": "e.buffer_bytes",
    "age": "e.oldest_unshipped_age_s",
    "use": "e.buffer_bytes::float8 / nullif(e.buffer_max_bytes, 0)",
    "drops": _DROPPED_TOTAL,
    "version": "e.version",
}
"""Sort keys of the fleet page -> SQL (a closed list: never a caller's text in SQL)."""

FLEET_STATES: Final = ("all", "online", "offline", "lagging", "gaps")
"""Filters: ``lagging`` = online with its oldest unshipped record older than a minute;
``gaps`` = some stream of the edge has missing seqs."""

PAGE_SIZES: Final = (25, 50, 100, 200)

DRIFT_ROWS: Final = 200
"""Drifted fields an edge's page lists (the first by path)."""

LAGGING_AFTER_S: Final = 60.0
"""An online edge whose oldest unshipped record is older than this is lagging (as
``GET /v1/edges?state=lagging`` says by default)."""

# A stream has a gap when what is accounted for (committed, dropped, dead-lettered, lost
# after commit) is not one range starting at seq 1: the missing seqs of v_completeness.
# Most rows have nothing but committed seqs, so the union is skipped for them; one hashed
# semi-join over committed_ranges instead of a probe per edge.
_ACCOUNTED: Final = "(c.ranges + c.dropped + c.dead_lettered + c.lost_after_commit)"
_HAS_GAP: Final = (
    "e.edge_id IN (SELECT c.edge_id FROM committed_ranges c WHERE CASE"
    " WHEN c.dropped = '{}' AND c.dead_lettered = '{}' AND c.lost_after_commit = '{}'"
    " THEN c.ranges <> '{}' AND c.ranges <> int8multirange(int8range(1, upper(c.ranges)))"
    f" ELSE {_ACCOUNTED} <> int8multirange(int8range(1, upper({_ACCOUNTED}))) END)"
)

_WHERE: Final = (
    " WHERE ($1::text IS NULL OR e.edge_id ILIKE $1 ESCAPE '\\' OR e.version ILIKE $1 ESCAPE '\\')"
    " AND CASE $2::text"
    "  WHEN 'online' THEN e.last_seen > now() - make_interval(secs => $3)"
    "  WHEN 'offline' THEN e.last_seen <= now() - make_interval(secs => $3)"
    "  WHEN 'lagging' THEN e.last_seen > now() - make_interval(secs => $3)"
    "   AND e.oldest_unshipped_age_s > $4"
    f"  WHEN 'gaps' THEN {_HAS_GAP}"
    "  ELSE true END"
)


@dataclass(frozen=True, slots=True)
class FleetQuery:
    """One fleet page request, already validated (see :meth:`of`)."""

    q: str = ""
    state: str = "all"
    sort: str = "edge"
    order: Literal["asc", "desc"] = "asc"
    page: int = 1
    per_page: int = 50

    @classmethod
    def of(cls, *, q: str | None, state: str | None, sort: str | None, order: str | None,
           page: int | None, per_page: int | None) -> FleetQuery:
        """A query from request parameters; anything unknown falls back to its default
        (a stale bookmark still shows the fleet)."""
        return cls(
            q=(q or "").strip()[:100],
            state=state if state in FLEET_STATES else "all",
            sort=sort if sort in FLEET_SORTS else "edge",
            order="desc" if order == "desc" else "asc",
            page=max(1, min(page or 1, 1_000_000)),
            per_page=per_page if per_page in PAGE_SIZES else 50,
        )

    def with_(self, **changes: Any) -> FleetQuery:
        return replace(self, **changes)

    def params(self) -> dict[str, str]:
        """The query as URL parameters (defaults left out)."""
        out = {"q": self.q, "state": self.state, "sort": self.sort, "order": self.order,
               "page": str(self.page), "per_page": str(self.per_page)}
        defaults = FleetQuery()
        return {k: v for k, v in out.items()
                if v != str(getattr(defaults, k))}


@dataclass(slots=True)
class FleetPage:
    query: FleetQuery
    rows: list[dict[str, Any]]
    matched: int
    totals: dict[str, int] = field(default_factory=dict)

    @property
    def pages(self) -> int:
        return max(1, -(-self.matched // self.query.per_page))


def _like(q: str) -> str | None:
    if not q:
        return None
    return "%" + re.sub(r"([\\%_])", r"\\\1", q) + "%"


async def fleet_page(conn: Connection, query: FleetQuery, *, offline_after_s: float
                     ) -> FleetPage:
    """One page of the fleet, its number of matches and the fleet's totals."""
    args = (_like(query.q), query.state, offline_after_s, LAGGING_AFTER_S)
    direction = "DESC" if query.order == "desc" else "ASC"
    nulls = "NULLS LAST" if direction == "ASC" else "NULLS FIRST"
    order = f"{FLEET_SORTS[query.sort]} {direction} {nulls}, e.edge_id {direction}"
    outer = f"page.sort_key {direction} {nulls}, page.edge_id {direction}"
    # A filtered page counts its matches in the same pass (the filter, a gap test over
    # every stream, is the expensive part); the whole fleet's first page walks the
    # primary key instead and counts separately, which is cheaper than a full window.
    filtered = query.state != "all" or bool(query.q)
    rows = await conn.fetch(
        "WITH page AS ("
        " SELECT e.edge_id, e.version, e.last_seen, e.buffer_records, e.buffer_bytes,"
        "  e.buffer_max_bytes, e.unshipped_records, e.oldest_unshipped_age_s, e.disk_bytes,"
        "  extract(epoch FROM now() - e.last_seen)::float8 AS ago,"
        f"  {_DROPPED_TOTAL} AS dropped_total, {FLEET_SORTS[query.sort]} AS sort_key"
        f"  {', count(*) OVER () AS matched' if filtered else ''}"
        f" FROM edges e {_WHERE} ORDER BY {order} LIMIT $5 OFFSET $6)"
        " SELECT page.*, c.streams, c.missing, c.dead_lettered, c.lost FROM page"
        " LEFT JOIN LATERAL (SELECT count(*) AS streams,"
        "  coalesce(sum(v.missing_records), 0)::int8 AS missing,"
        "  coalesce(sum(v.dead_lettered_records), 0)::int8 AS dead_lettered,"
        "  coalesce(sum(v.lost_after_commit_records), 0)::int8 AS lost"
        "  FROM v_completeness v WHERE v.edge_id = page.edge_id) c ON true"
        f" ORDER BY {outer}",
        *args, query.per_page, (query.page - 1) * query.per_page)
    if filtered and rows:
        matched = rows[0]["matched"]
    else:
        matched = await conn.fetchval(f"SELECT count(*) FROM edges e {_WHERE}", *args)
    totals = await conn.fetchrow(
        "SELECT count(*) AS all,"
        " count(*) FILTER (WHERE last_seen > now() - make_interval(secs => $1)) AS online,"
        " count(*) FILTER (WHERE last_seen > now() - make_interval(secs => $1)"
        "  AND oldest_unshipped_age_s > $2) AS lagging FROM edges", offline_after_s,
        LAGGING_AFTER_S)
    assert totals is not None
    out = [_fleet_row(dict(r), offline_after_s) for r in rows]
    return FleetPage(query=query, rows=out, matched=int(matched), totals={
        "all": totals["all"], "online": totals["online"],
        "offline": totals["all"] - totals["online"], "lagging": totals["lagging"]})


def _fleet_row(r: Mapping[str, Any], offline_after_s: float) -> dict[str, Any]:
    ago = max(0.0, float(r["ago"]))
    cap = int(r["buffer_max_bytes"] or 0)
    return {
        "edge": r["edge_id"], "version": r["version"], "last_seen": r["last_seen"],
        "ago": ago, "online": ago <= offline_after_s,
        "lagging": ago <= offline_after_s and r["oldest_unshipped_age_s"] > LAGGING_AFTER_S,
        "buffer_records": r["buffer_records"], "buffer_bytes": r["buffer_bytes"],
        "buffer_max_bytes": cap, "use": (r["buffer_bytes"] / cap) if cap else 0.0,
        "unshipped_records": r["unshipped_records"],
        "oldest_unshipped_age_s": r["oldest_unshipped_age_s"], "disk_bytes": r["disk_bytes"],
        "dropped": int(r["dropped_total"]), "streams": int(r["streams"] or 0),
        "missing": int(r["missing"] or 0), "dead_lettered": int(r["dead_lettered"] or 0),
        "lost": int(r["lost"] or 0),
    }


_STREAM_COLUMNS: Final = (
    "edge_id, stream, epoch, committed_records, watermark, highest_seq, dropped_records,"
    " dead_lettered_records, missing_records, lost_after_commit_records, lag_seconds,"
    " updated_at, committed_ranges::text AS committed_text, dropped_ranges::text AS dropped_text,"
    " dead_lettered_ranges::text AS dead_lettered_text,"
    " lost_after_commit_ranges::text AS lost_text, missing_ranges::text AS missing_text"
)


async def edge_detail(conn: Connection, edge: str, *, offline_after_s: float
                      ) -> dict[str, Any] | None:
    """One edge's heartbeat row and its streams' completeness, or None if unknown."""
    row = await conn.fetchrow(
        "SELECT e.*, extract(epoch FROM now() - e.last_seen)::float8 AS ago,"
        f" {_DROPPED_TOTAL} AS dropped_total FROM edges e WHERE e.edge_id = $1", edge)
    if row is None:
        return None
    out = _fleet_row({**dict(row), "streams": 0, "missing": 0, "dead_lettered": 0,
                      "lost": 0}, offline_after_s)
    out["first_seen"] = row["first_seen"]
    out["reported_streams"] = row["streams"] if isinstance(row["streams"], dict) else {}
    out["stream_rows"] = await completeness_rows(conn, edge=edge, limit=200)
    out["streams"] = len(out["stream_rows"])
    for key in ("missing", "dead_lettered", "lost"):
        out[key] = sum(s[key] for s in out["stream_rows"])
    return out


async def completeness_rows(conn: Connection, *, edge: str | None = None,
                            stream: str | None = None, limit: int = 200
                            ) -> list[dict[str, Any]]:
    """Per (edge, stream, epoch): counts, watermark and the seq ranges of each fate."""
    rows = await conn.fetch(
        f"SELECT {_STREAM_COLUMNS} FROM v_completeness"
        " WHERE ($1::text IS NULL OR edge_id = $1) AND ($2::text IS NULL OR stream = $2)"
        " ORDER BY edge_id, stream, updated_at DESC LIMIT $3", edge, stream, limit)
    return [{
        "edge": r["edge_id"], "stream": r["stream"], "epoch": r["epoch"],
        "committed": int(r["committed_records"]), "watermark": int(r["watermark"]),
        "highest": int(r["highest_seq"]), "dropped": int(r["dropped_records"]),
        "dead_lettered": int(r["dead_lettered_records"]),
        "missing": int(r["missing_records"]), "lost": int(r["lost_after_commit_records"]),
        "lag_s": r["lag_seconds"], "updated_at": r["updated_at"],
        "ranges": {k: parse_multirange(r[f"{k}_text"]) for k in (
            "committed", "dropped", "dead_lettered", "lost", "missing")},
    } for r in rows]


_RANGE = re.compile(r"[\[(](-?\d*),(-?\d*)[\])]")


def parse_multirange(text: str | None, *, limit: int = 500) -> list[tuple[int, int]]:
    """``{[1,5),[7,9)}`` -> ``[(1, 5), (7, 9)]`` (half-open, at most ``limit`` ranges:
    a chart cannot show more)."""
    out: list[tuple[int, int]] = []
    for m in _RANGE.finditer(text or ""):
        if m.group(1) and m.group(2):
            out.append((int(m.group(1)), int(m.group(2))))
        if len(out) >= limit:
            break
    return out


async def watermark_history(conn: Connection, edge: str, *, window_s: float = 900.0,
                            bucket_s: float = 15.0) -> dict[tuple[str, int], list[
                                tuple[float, int, int]]]:
    """Per (stream, epoch) of ``edge``, over the last ``window_s`` seconds in buckets:
    (bucket start as epoch seconds, watermark, highest committed seq) as the
    commit-ordered feed recorded them (``feed_commits``)."""
    rows = await conn.fetch(
        "WITH f AS (SELECT committed_at, wm_edge_ids, wm_streams, wm_epochs, watermarks,"
        "  edge_ids, streams, epochs, last_seqs FROM feed_commits"
        "  WHERE committed_at > now() - make_interval(secs => $2) AND commit_id IS NOT NULL),"
        " w AS (SELECT floor(extract(epoch FROM f.committed_at) / $3) * $3 AS t, x.stream,"
        "  x.epoch, max(x.wm) AS wm FROM f, unnest(f.wm_edge_ids, f.wm_streams, f.wm_epochs,"
        "  f.watermarks) AS x(edge, stream, epoch, wm) WHERE x.edge = $1 GROUP BY 1, 2, 3),"
        " h AS (SELECT floor(extract(epoch FROM f.committed_at) / $3) * $3 AS t, y.stream,"
        "  y.epoch, max(y.last) AS hi FROM f, unnest(f.edge_ids, f.streams, f.epochs,"
        "  f.last_seqs) AS y(edge, stream, epoch, last) WHERE y.edge = $1 GROUP BY 1, 2, 3)"
        " SELECT coalesce(w.t, h.t)::float8 AS t, coalesce(w.stream, h.stream) AS stream,"
        "  coalesce(w.epoch, h.epoch) AS epoch, w.wm, h.hi FROM w FULL JOIN h"
        "  ON (w.t, w.stream, w.epoch) = (h.t, h.stream, h.epoch) ORDER BY 1",
        edge, window_s, bucket_s)
    out: dict[tuple[str, int], list[tuple[float, int, int]]] = {}
    for r in rows:
        series = out.setdefault((r["stream"], int(r["epoch"])), [])
        last_wm, last_hi = (series[-1][1], series[-1][2]) if series else (0, 0)
        wm = max(last_wm, int(r["wm"] or 0))
        series.append((float(r["t"]), wm, max(last_hi, int(r["hi"] or 0), wm)))
    return out


async def rollouts(conn: Connection, *, limit: int = 50) -> list[dict[str, Any]]:
    """The newest rollouts, each with its desired version and its progress per wave
    (``v_rollout_progress``): edges waiting, pending, healthy, failed, superseded and
    rolled back."""
    rows = await conn.fetch(
        "SELECT r.id, r.state, r.current_wave, r.waves, r.max_failures, r.failure_budget,"
        " r.reason, r.created_by, r.created_at, r.finished_at, v.target_kind, v.target,"
        " v.version FROM rollouts r JOIN desired_versions v ON v.id = r.version_id"
        " ORDER BY r.id DESC LIMIT $1", limit)
    waves = await conn.fetch(
        "SELECT * FROM v_rollout_progress WHERE rollout_id = ANY($1::bigint[])"
        " ORDER BY rollout_id, wave", [r["id"] for r in rows])
    by_rollout: dict[int, list[dict[str, Any]]] = {}
    for w in waves:
        by_rollout.setdefault(w["rollout_id"], []).append(dict(w))
    out = []
    for r in rows:
        item = dict(r)
        item["waves"] = by_rollout.get(r["id"], [])
        item["planned_waves"] = len(r["waves"]) if isinstance(r["waves"], list) else 0
        item["failed"] = sum(w["failed"] for w in item["waves"])
        out.append(item)
    return out


async def desired_state(conn: Connection, edge: str) -> dict[str, Any] | None:
    """What the edge should run against what it reports (``v_edge_desired_state``) and
    each drifted field (``v_edge_drift``, with the imperative command that caused it
    where one did); None when nothing is desired for the edge."""
    row = await conn.fetchrow("SELECT * FROM v_edge_desired_state WHERE edge_id = $1", edge)
    if row is None or row["version_id"] is None:
        return None
    # The paths come from the edge's own reports: a page shows DRIFT_ROWS of them, and
    # says when there are more (an edge could report thousands).
    drift = await conn.fetch(
        "SELECT path, desired, observed, since, command_id, command_kind, command_issuer"
        " FROM v_edge_drift WHERE edge_id = $1 ORDER BY path LIMIT $2", edge, DRIFT_ROWS + 1)
    return {**dict(row), "drift": [dict(d) for d in drift[:DRIFT_ROWS]],
            "drift_more": len(drift) > DRIFT_ROWS}
