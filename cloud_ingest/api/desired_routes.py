"""The operator API's desired-state and rollout routes (``read`` scope for GETs,
``operate`` for changes).

| method & path                                   | what                                  |
| ----------------------------------------------- | ------------------------------------- |
| ``GET/PUT /v1/edges/{edge}/labels``             | labels (PUT merges; null removes)     |
| ``POST /v1/desired/edges/{edge}``               | a version for one edge, sent now      |
| ``POST /v1/desired/groups/{group}``             | a version for a group (roll it out)   |
| ``GET  /v1/desired/edges/{edge}``               | sent, reported, drift                 |
| ``GET  /v1/desired/groups/{group}``             | a version (``?version=``), its edges  |
| ``GET  /v1/desired/{edges|groups}/{name}/diff`` | drift of an edge / each group edge    |
| ``GET  /v1/desired/versions/{id}``              | one version                           |
| ``POST /v1/rollouts``, ``GET /v1/rollouts[/{id}]`` | start, list, follow rollouts       |
| ``POST /v1/rollouts/{id}/pause|resume|abort``   | operator actions                      |

See :mod:`cloud_ingest.desired` and :mod:`cloud_ingest.rollouts` for the rules;
``docs/desired-state.md`` for the story.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from broker.errors import NotFound
from broker.protocol.tokens import TOKEN_PATTERN
from cloud_ingest.desired import (
    create_version,
    edges_matching,
    find_version,
    get_labels,
    group_selector,
    set_labels,
)
from cloud_ingest.operators import Operator
from cloud_ingest.rollouts import change_state, rollout_status, start_rollout
from cloud_ingest.strict_json import StrictJsonRoute

if TYPE_CHECKING:
    from cloud_ingest.api.service import Api

__all__ = [
    "EdgeVersionRequest",
    "GroupVersionRequest",
    "LabelsRequest",
    "RolloutRequest",
    "desired_routes",
]

_Name = Annotated[str, Path(pattern=f"^{TOKEN_PATTERN}$",  # whole: a search lets a.b in
                                description="An edge id or group name.")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LabelsRequest(_Body):
    labels: dict[str, str | None] = Field(
        min_length=1, max_length=64, description="key -> value; null removes the label.")


class EdgeVersionRequest(_Body):
    document: dict[str, Any] = Field(description="The desired-state document "
                                     "(docs/desired-state.md).")
    note: str = Field("", max_length=1000)


class GroupVersionRequest(EdgeVersionRequest):
    selector: dict[str, str] | None = Field(
        None, description="The group's labels (required for its first version).")
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="edge -> JSON merge patch of the document.")


class RolloutRequest(_Body):
    version_id: int = Field(ge=1, description="The desired version (its global id).")
    selector: dict[str, str] | None = Field(
        None, description="Only these labels' edges (default: the group's selector).")
    waves: list[str] = Field(default_factory=lambda: ["1", "10%", "50%", "100%"],
                             min_length=1, max_length=20,
                             description="Cumulative wave targets: counts or percentages.")
    max_failures: str = Field("0", max_length=16,
                              description="Failed edges tolerated: a count or a percentage.")
    wave_deadline_s: float = Field(600.0, gt=0, le=7 * 86400,
                                   description="Seconds an online edge has to report healthy.")
    offline_deadline_s: float = Field(
        7 * 86400.0, gt=0, le=365 * 86400,
        description="Offline edges count as pending, not failed, until this long after start.")


def desired_routes(api: Api, *, read: Any, write: Any) -> APIRouter:
    """The routes, on ``api``'s pool and rollout driver; ``read`` / ``write`` are the scope
    dependencies."""
    router = APIRouter(tags=["desired state"], route_class=StrictJsonRoute)

    @router.get("/v1/edges/{edge}/labels", dependencies=[read])
    async def get_edge_labels(edge: _Name) -> dict[str, Any]:
        """An edge's labels."""
        async with api._db().acquire() as conn:
            return {"edge": edge, "labels": await get_labels(conn, edge)}

    @router.put("/v1/edges/{edge}/labels")
    async def put_edge_labels(edge: _Name, body: LabelsRequest, request: Request,
                              operator: Operator = write
                              ) -> dict[str, Any]:
        """Set labels (null removes one); returns all of the edge's labels."""
        request.state.audit = {"action": "edge.label", "target": edge, "labels": body.labels}
        async with api._db().acquire() as conn:
            return {"edge": edge, "labels": await set_labels(conn, edge, body.labels)}

    @router.post("/v1/desired/edges/{edge}", status_code=201)
    async def post_edge_version(edge: _Name, body: EdgeVersionRequest, request: Request,
                                operator: Operator = write
                                ) -> dict[str, Any]:
        """A new desired version for one edge, sent to it now (it applies it when online)."""
        request.state.audit = {"action": "desired.set", "target": edge}
        assert api.rollouts is not None
        async with api._db().acquire() as conn, conn.transaction():
            version = await create_version(conn, target_kind="edge", target=edge,
                                           document=body.document, note=body.note,
                                           created_by=operator.name)
            await conn.execute(
                "UPDATE rollout_edges SET status = 'superseded', settled_at = now(),"
                " updated_at = now(), reason = 'a desired version was set for this edge'"
                " WHERE edge_id = $1 AND status IN ('dispatched', 'waiting')", edge)
            revision = await api.rollouts.publisher.assign(conn, edge, version, rollout_id=None,
                                                           by=operator.name)
        # Committed; if NATS does not acknowledge now, the driver's next tick republishes.
        published = await api.rollouts.publisher.publish(api._db(), edge)
        request.state.audit.update(version=version["id"], revision=revision)
        return {**_version(version), "revision": revision, "published": published}

    @router.post("/v1/desired/groups/{group}", status_code=201)
    async def post_group_version(group: _Name, body: GroupVersionRequest, request: Request,
                                 operator: Operator = write
                                 ) -> dict[str, Any]:
        """A new desired version for a group; `POST /v1/rollouts` sends it."""
        request.state.audit = {"action": "desired.set", "target": f"group:{group}"}
        async with api._db().acquire() as conn:
            version = await create_version(
                conn, target_kind="group", target=group, document=body.document,
                overrides=body.overrides, selector=body.selector, note=body.note,
                created_by=operator.name)
            selector = await group_selector(conn, group)
        request.state.audit.update(version=version["id"])
        return {**_version(version), "selector": selector}

    @router.get("/v1/desired/versions/{version_id}", dependencies=[read])
    async def get_version(version_id: Annotated[int, Path(ge=1, le=2**63 - 1)]
                          ) -> dict[str, Any]:
        """One desired version."""
        async with api._db().acquire() as conn:
            return _version(await find_version(conn, version_id=version_id))

    @router.get("/v1/desired/edges/{edge}", dependencies=[read])
    async def get_edge_desired(edge: _Name) -> dict[str, Any]:
        """What the edge was sent, what it reports, and its drift."""
        async with api._db().acquire() as conn:
            return await _edge_view(conn, edge)

    @router.get("/v1/desired/groups/{group}", dependencies=[read])
    async def get_group_desired(
        group: _Name, version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    ) -> dict[str, Any]:
        """A group's version (the latest by default), its selector and its edges."""
        async with api._db().acquire() as conn:
            found = await find_version(conn, target_kind="group", target=group,
                                       version=version)
            selector = await group_selector(conn, group) or {}
            edges = await edges_matching(conn, selector)
        return {**_version(found), "selector": selector, "edges": edges}

    @router.get("/v1/desired/{kind}/{name}/diff", dependencies=[read])
    async def get_diff(kind: Literal["edges", "groups"], name: _Name) -> dict[str, Any]:
        """Drift per field, of one edge or of every edge of a group, as last reported."""
        async with api._db().acquire() as conn:
            if kind == "edges":
                edges = [name]
            else:
                selector = await group_selector(conn, name)
                if selector is None:
                    raise NotFound(f"no group {name!r}", code="unknown_group")
                edges = await edges_matching(conn, selector)
            views = [await _edge_view(conn, edge) for edge in edges]
        return {"target": name, "edges": [
            {k: v[k] for k in ("edge", "revision", "version_id", "reported_status",
                               "reported_revision", "in_sync", "drift")} for v in views]}

    @router.post("/v1/rollouts", status_code=201)
    async def post_rollout(body: RolloutRequest, request: Request,
                           operator: Operator = write) -> dict[str, Any]:
        """Start a rollout; the driver sends wave 1 within a tick."""
        request.state.audit = {"action": "rollout.start", "target": str(body.version_id)}
        async with api._db().acquire() as conn:
            row = await start_rollout(
                conn, version_id=body.version_id, selector=body.selector, waves=body.waves,
                max_failures=body.max_failures, wave_deadline_s=body.wave_deadline_s,
                offline_deadline_s=body.offline_deadline_s, created_by=operator.name)
            request.state.audit.update(rollout=row["id"])
            return await rollout_status(conn, row["id"])

    @router.get("/v1/rollouts", dependencies=[read])
    async def list_rollouts(limit: Annotated[int, Query(ge=1, le=1000)] = 50
                            ) -> list[dict[str, Any]]:
        """Rollouts, newest first."""
        async with api._db().acquire() as conn:
            rows = await conn.fetch("SELECT * FROM rollouts ORDER BY id DESC LIMIT $1", limit)
        return [dict(r) for r in rows]

    @router.get("/v1/rollouts/{rollout_id}", dependencies=[read])
    async def get_rollout(rollout_id: Annotated[int, Path(ge=1, le=2**63 - 1)]
                          ) -> dict[str, Any]:
        """A rollout: state, per-wave progress, every edge."""
        async with api._db().acquire() as conn:
            return await rollout_status(conn, rollout_id)

    @router.post("/v1/rollouts/{rollout_id}/{action}")
    async def post_rollout_action(
        rollout_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
        action: Literal["pause", "resume", "abort"], request: Request,
        operator: Operator = write,
    ) -> dict[str, Any]:
        """Pause, resume or abort (409 when the rollout's state does not allow it)."""
        request.state.audit = {"action": f"rollout.{action}", "target": str(rollout_id)}
        async with api._db().acquire() as conn:
            return await change_state(conn, rollout_id, action, by=operator.name)

    return router


def _version(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("id", "target_kind", "target", "version", "document",
                                "overrides", "note", "created_by", "created_at")}


async def _edge_view(conn: Any, edge: str) -> dict[str, Any]:
    sent = await conn.fetchrow(
        "SELECT version_id, revision, document, rollout_id, assigned_at, assigned_by,"
        " published_at FROM edge_desired WHERE edge_id = $1", edge)
    reported = await conn.fetchrow("SELECT * FROM edge_reported_state WHERE edge_id = $1", edge)
    drift = await conn.fetch("SELECT path, desired, observed, since, command_id, command_kind,"
                             " command_issuer FROM v_edge_drift WHERE edge_id = $1"
                             " ORDER BY path", edge)
    out: dict[str, Any] = {
        "edge": edge, "labels": await get_labels(conn, edge),
        "revision": None if sent is None else sent["revision"],
        "version_id": None if sent is None else sent["version_id"],
        "sent": None if sent is None else dict(sent),
        "reported": None if reported is None else dict(reported),
        "reported_status": None if reported is None else reported["status"],
        "reported_revision": None if reported is None else reported["revision"],
        "drift": [{**dict(d), "command_id": None if d["command_id"] is None
                   else str(d["command_id"])} for d in drift],
    }
    out["in_sync"] = (sent is not None and reported is not None
                      and reported["revision"] == sent["revision"]
                      and reported["status"] == "healthy" and not drift)
    return out
