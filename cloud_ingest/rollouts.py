"""Rollouts: a desired version sent to a group's edges in health-gated waves.

Life of a rollout (``rollouts.state``)::

    running --(failures > budget)--> halted --abort--> aborting --> aborted
       |  ^                                               ^
     pause resume                      running/paused ----+ abort
       v  |
    paused            running --(every edge settled)--> completed

Each edge's row (``rollout_edges.status``): ``waiting`` (its wave has not
started) -> ``dispatched`` (sent) -> ``healthy`` | ``failed`` (its report, or the
wave deadline) ; ``superseded`` (a later rollout sent it something newer) ;
after abort ``rolling_back`` -> ``rolled_back`` ; ``skipped`` (never sent).

The driver (:class:`RolloutDriver`, a loop of the API process) advances every
``running`` or ``aborting`` rollout each tick, in one transaction that takes
the rollout rows ``FOR UPDATE SKIP LOCKED``: several API processes can run it,
and each rollout is advanced by one of them at a time. What a tick assigns is
put in the desired-state bucket after it commits (so an edge never reports a
revision the rows do not know yet). A tick:

1. fails edges still ``dispatched`` past the wave deadline *if they are online*
   (heartbeat within ``api.edge_offline_after_s``); an offline edge is pending,
   not failed, until the rollout's offline deadline;
2. halts the rollout when the failed edges exceed its failure budget;
3. when every edge of the current wave is settled (or offline), dispatches the
   next wave; after the last, completes once nothing is pending.

Abort sends each edge this rollout reached (healthy, failed or still pending) its
previous desired version (the one it had when the rollout started; nothing
desired if it had none) and skips the edges never reached. The edges' reports
move their rows (:mod:`cloud_ingest.desired_reports`).
"""

from __future__ import annotations

from typing import Any, Final

import asyncpg
import structlog

from broker.errors import Conflict, InvalidInput, NotFound
from cloud_ingest.db_errors import Connection
from cloud_ingest.desired import DesiredPublisher, edges_matching, find_version, group_selector
from cloud_ingest.metrics import RolloutMetrics
from cloud_ingest.rollout_waves import failure_budget, wave_sizes

__all__ = [
    "ACTIONS",
    "RolloutDriver",
    "change_state",
    "rollout_status",
    "start_rollout",
]

log = structlog.get_logger(__name__)

ACTIONS: Final = {
    "pause": ({"running"}, "paused"),
    "resume": ({"paused"}, "running"),
    "abort": ({"running", "paused", "halted"}, "aborting"),
}
"""Operator actions: the states each is allowed from, and the state it leads to."""


async def start_rollout(
    conn: Connection,
    *,
    version_id: int,
    selector: dict[str, str] | None,
    waves: list[str],
    max_failures: str,
    wave_deadline_s: float,
    offline_deadline_s: float,
    created_by: str,
) -> dict[str, Any]:
    """Plan a rollout (its edges and waves); the driver sends the first wave.

    Raises:
        NotFound: no such version.
        InvalidInput: no edge matches, bad waves or failure threshold.
    """
    version = await find_version(conn, version_id=version_id)
    if version["target_kind"] == "edge":
        if selector:
            raise InvalidInput("a selector narrows a group's version; this version is for "
                               f"edge {version['target']!r}", code="invalid_request")
        selector = {}
        edges = [version["target"]]
    else:
        selector = selector or await group_selector(conn, version["target"]) or {}
        edges = await edges_matching(conn, selector)
    if not edges:
        raise InvalidInput(f"no edge is labelled {_show(selector)}: label edges with "
                           "`edgesync edges label`", code="invalid_request")
    sizes = wave_sizes(len(edges), waves)
    budget = failure_budget(len(edges), max_failures)
    async with conn.transaction():
        row = await conn.fetchrow(
            "INSERT INTO rollouts (version_id, selector, waves, max_failures, failure_budget,"
            " wave_deadline_s, offline_deadline_at, created_by) VALUES ($1, $2, $3, $4, $5, $6,"
            " now() + make_interval(secs => $7), $8) RETURNING *",
            version_id, selector, waves, max_failures, budget, wave_deadline_s,
            offline_deadline_s, created_by)
        assert row is not None
        wave_of = [w for w, size in enumerate(sizes, start=1) for _ in range(size)]
        await conn.executemany(
            "INSERT INTO rollout_edges (rollout_id, edge_id, wave, previous_version_id)"
            " SELECT $1, $2, $3, (SELECT version_id FROM edge_desired WHERE edge_id = $2)",
            [(row["id"], edge, wave) for edge, wave in zip(edges, wave_of, strict=True)])
    log.info("rollout_started", rollout=row["id"], version=version_id, edges=len(edges),
             waves=sizes, failure_budget=budget, by=created_by)
    return dict(row)


def _show(selector: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "(nothing)"


async def rollout_status(conn: Connection, rollout_id: int) -> dict[str, Any]:
    """A rollout with its per-wave progress and its edges.

    Raises:
        NotFound: no such rollout.
    """
    row = await conn.fetchrow("SELECT * FROM rollouts WHERE id = $1", rollout_id)
    if row is None:
        raise NotFound(f"no rollout {rollout_id}", code="unknown_rollout")
    waves = await conn.fetch("SELECT * FROM v_rollout_progress WHERE rollout_id = $1"
                             " ORDER BY wave", rollout_id)
    edges = await conn.fetch("SELECT edge_id, wave, status, reason, revision, dispatched_at,"
                             " settled_at FROM rollout_edges WHERE rollout_id = $1"
                             " ORDER BY wave, edge_id", rollout_id)
    out = dict(row)
    out["waves_progress"] = [
        {k: v for k, v in dict(w).items() if k != "rollout_id"} for w in waves]
    out["edges"] = [{**dict(e), "edge": e["edge_id"]} for e in edges]
    return out


async def change_state(conn: Connection, rollout_id: int, action: str, *, by: str
                       ) -> dict[str, Any]:
    """``pause``, ``resume`` or ``abort`` a rollout.

    Raises:
        NotFound: no such rollout.
        Conflict: not allowed in its current state (409, names the state).
    """
    allowed_from, to = ACTIONS[action]
    async with conn.transaction():
        state = await conn.fetchval("SELECT state FROM rollouts WHERE id = $1 FOR UPDATE",
                                    rollout_id)
        if state is None:
            raise NotFound(f"no rollout {rollout_id}", code="unknown_rollout")
        if state not in allowed_from:
            raise Conflict(f"rollout {rollout_id} is {state}; {action} needs it "
                           f"{' or '.join(sorted(allowed_from))}", code="rollout_state")
        await conn.execute("UPDATE rollouts SET state = $2, updated_at = now(),"
                           " reason = CASE WHEN $3 THEN 'aborted by ' || $4 ELSE reason END"
                           " WHERE id = $1", rollout_id, to, action == "abort", by)
    log.info("rollout_state_changed", rollout=rollout_id, action=action, state=to, by=by)
    return await rollout_status(conn, rollout_id)


class RolloutDriver:
    """Advances rollouts (see the module docstring)."""

    def __init__(self, publisher: DesiredPublisher, *, offline_after_s: float,
                 metrics: RolloutMetrics) -> None:
        self.publisher = publisher
        self._offline_after_s = offline_after_s
        self.metrics = metrics
        self._sent: list[str] = []

    async def tick(self, pool: asyncpg.Pool) -> int:
        """Advance every rollout no other process holds, then put what it assigned (and
        anything left unpublished) in the bucket; returns how many rollouts it advanced."""
        self._sent = []
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT * FROM rollouts WHERE state IN ('running', 'aborting') ORDER BY id"
                " FOR UPDATE SKIP LOCKED")
            for row in rows:
                if row["state"] == "aborting":
                    await self._roll_back(conn, row)
                else:
                    await self._advance(conn, row)
            self.metrics.active.set(await conn.fetchval(
                "SELECT count(*) FROM rollouts WHERE state IN ('running', 'paused')"))
        # Committed: the edges may now apply and report what was assigned.
        for edge in self._sent:
            await self.publisher.publish(pool, edge)
        await self.publisher.republish(pool)
        return len(rows)

    async def _finish(self, conn: Connection, row: asyncpg.Record, state: str,
                      reason: str) -> None:
        await conn.execute(
            "UPDATE rollouts SET state = $2, reason = $3, updated_at = now(),"
            " finished_at = CASE WHEN $2 IN ('aborted', 'completed') THEN now() END"
            " WHERE id = $1", row["id"], state, reason)
        self.metrics.finished.labels(state).inc()
        log.info(f"rollout_{state}", rollout=row["id"], reason=reason)

    async def _advance(self, conn: Connection, row: asyncpg.Record) -> None:
        rid = row["id"]
        offline = ("NOT EXISTS (SELECT 1 FROM edges WHERE edges.edge_id = e.edge_id"
                   " AND edges.last_seen > now() - make_interval(secs => $2))")
        await conn.execute(
            "UPDATE rollout_edges e SET status = 'failed', settled_at = now(), updated_at = now(),"
            " reason = format('not healthy within the wave deadline (%ss)', $3::float8)"
            f" WHERE rollout_id = $1 AND status = 'dispatched' AND NOT {offline}"
            " AND dispatched_at < now() - make_interval(secs => $3)",
            rid, self._offline_after_s, row["wave_deadline_s"])
        await conn.execute(
            "UPDATE rollout_edges SET status = 'failed', settled_at = now(), updated_at = now(),"
            " reason = 'offline past the rollout''s offline deadline'"
            " WHERE rollout_id = $1 AND status = 'dispatched' AND now() > $2",
            rid, row["offline_deadline_at"])
        failed = await conn.fetchval("SELECT count(*) FROM rollout_edges WHERE rollout_id = $1"
                                     " AND status = 'failed'", rid)
        if failed > row["failure_budget"]:
            await self._finish(conn, row, "halted", f"{failed} edge(s) failed, more than the "
                               f"{row['failure_budget']} tolerated ({row['max_failures']})")
            return
        blocking = await conn.fetchval(
            "SELECT count(*) FROM rollout_edges e WHERE rollout_id = $1 AND wave <= $3"
            f" AND status = 'dispatched' AND NOT {offline}",
            rid, self._offline_after_s, row["current_wave"])
        if blocking:
            return
        last_wave = await conn.fetchval("SELECT max(wave) FROM rollout_edges"
                                        " WHERE rollout_id = $1", rid)
        if row["current_wave"] < last_wave:
            await self._dispatch(conn, row, row["current_wave"] + 1)
            return
        pending = await conn.fetchval("SELECT count(*) FROM rollout_edges WHERE rollout_id = $1"
                                      " AND status = 'dispatched'", rid)
        if not pending:
            await self._finish(conn, row, "completed", f"{failed} edge(s) failed"
                               if failed else "every edge healthy")

    async def _dispatch(self, conn: Connection, row: asyncpg.Record, wave: int) -> None:
        rid = row["id"]
        version = await find_version(conn, version_id=row["version_id"])
        edges = await conn.fetch("SELECT edge_id FROM rollout_edges WHERE rollout_id = $1"
                                 " AND wave = $2 AND status = 'waiting' ORDER BY edge_id",
                                 rid, wave)
        for e in edges:
            edge = e["edge_id"]
            await conn.execute(
                "UPDATE rollout_edges SET status = 'superseded', settled_at = now(),"
                " updated_at = now(), reason = format('rollout %s sent a newer version', $3::int)"
                " WHERE edge_id = $1 AND rollout_id <> $2 AND status IN ('dispatched', 'waiting')",
                edge, rid, rid)
            revision = await self.publisher.assign(conn, edge, version, rollout_id=rid,
                                                   by=row["created_by"])
            self._sent.append(edge)
            await conn.execute(
                "UPDATE rollout_edges SET status = 'dispatched', revision = $3,"
                " dispatched_at = now(), updated_at = now() WHERE rollout_id = $1"
                " AND edge_id = $2", rid, edge, revision)
            self.metrics.dispatched.inc()
        await conn.execute("UPDATE rollouts SET current_wave = $2, wave_started_at = now(),"
                           " updated_at = now() WHERE id = $1", rid, wave)
        log.info("rollout_wave_started", rollout=rid, wave=wave, edges=len(edges))

    async def _roll_back(self, conn: Connection, row: asyncpg.Record) -> None:
        rid = row["id"]
        reached = await conn.fetch(
            "SELECT e.edge_id, e.previous_version_id, d.rollout_id AS current_rollout"
            " FROM rollout_edges e LEFT JOIN edge_desired d ON d.edge_id = e.edge_id"
            " WHERE e.rollout_id = $1 AND e.status IN ('dispatched', 'healthy', 'failed')"
            " ORDER BY e.edge_id", rid)
        for e in reached:
            if e["current_rollout"] != rid:  # something newer was sent since: keep it
                await conn.execute(
                    "UPDATE rollout_edges SET status = 'superseded', updated_at = now()"
                    " WHERE rollout_id = $1 AND edge_id = $2", rid, e["edge_id"])
                continue
            previous = (None if e["previous_version_id"] is None
                        else await find_version(conn, version_id=e["previous_version_id"]))
            revision = await self.publisher.assign(conn, e["edge_id"], previous,
                                                   rollout_id=None, by=f"abort of rollout {rid}")
            self._sent.append(e["edge_id"])
            await conn.execute(
                "UPDATE rollout_edges SET status = 'rolling_back', rollback_revision = $3,"
                " updated_at = now() WHERE rollout_id = $1 AND edge_id = $2",
                rid, e["edge_id"], revision)
            self.metrics.rolled_back.inc()
        await conn.execute("UPDATE rollout_edges SET status = 'skipped', updated_at = now()"
                           " WHERE rollout_id = $1 AND status = 'waiting'", rid)
        await self._finish(conn, row, "aborted", row["reason"] or "aborted")
