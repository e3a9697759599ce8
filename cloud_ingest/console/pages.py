"""The console's pages under ``/ui``: login, fleet, edge, command form, data, rollouts.

Every page but the login needs a session (:mod:`cloud_ingest.console.sessions`):
without one a page redirects to the login form (an htmx request gets an
``HX-Redirect``, a live stream a 401). Reads need the ``read`` scope; issuing a
command needs ``operate`` or ``operate:<kind>``, checked again on every POST with
its CSRF token. Pages are plain HTML that works without script; htmx (vendored
under ``/ui/static``) swaps fragments in place and the live parts follow
Server-Sent Events (:mod:`cloud_ingest.console.live`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, Final
from urllib.parse import quote, urlencode

import structlog
from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from broker.errors import EdgesyncError, Unauthorized, http_status
from broker.protocol.command_specs import KINDS, SPEC_MODELS
from broker.protocol.commands import COMMAND_ID, IDEMPOTENCY_KEY_MAX
from broker.protocol.tokens import is_valid_token
from cloud_ingest.console.forms import destructive_reason, form_fields, parse_form
from cloud_ingest.console.queries import (
    FLEET_SORTS,
    FLEET_STATES,
    PAGE_SIZES,
    FleetQuery,
    completeness_rows,
    desired_state,
    edge_detail,
    fleet_page,
    rollouts,
    watermark_history,
)
from cloud_ingest.console.rendering import SECURITY_HEADERS, Renderer
from cloud_ingest.console.sessions import COOKIE, SESSION_MAX_AGE_S, Session, SessionKeys
from cloud_ingest.dead_letters import list_dead_letters
from cloud_ingest.operators import Operator, command_scope

if TYPE_CHECKING:
    from cloud_ingest.api.auth import Authenticator
    from cloud_ingest.api.service import Api

__all__ = [
    "PREFIX",
    "CsrfRefused",
    "LoginRequired",
    "Viewer",
    "console_pages",
    "login_required_response",
    "session_viewer",
    "whole_number",
]

log = structlog.get_logger(__name__)

PREFIX: Final = "/ui"
"""Where the console lives in the API's URL space."""

_DEFAULT_KIND: Final = "bridge.configure"

# A not-found page names what was asked for only when it has the shape of an id: the
# path is whoever made the link's text, and the console's own page must not read it out
# ("/ui/edges/Session expired: call 555-0100" would otherwise be said by the console).
_NOT_AN_EDGE_ID: Final = ("No edge with that id (an edge id is 1 to 64 letters, digits, "
                          "'-' or '_').")

_DATA_ROWS: Final = 100
"""Completeness rows the data page shows (by edge id, stream); filters reach the rest."""


class LoginRequired(Exception):
    """No valid session: the answer is the login form (see :func:`login_required_response`)."""


class CsrfRefused(Exception):
    """A POST without this session's CSRF token, or from another origin: 403."""


class Viewer:
    """Who is looking: the operator, their session, and what the page may offer them."""

    def __init__(self, operator: Operator, session: Session, csrf: str) -> None:
        self.operator = operator
        self.session = session
        self.csrf = csrf

    @property
    def kinds(self) -> tuple[str, ...]:
        """The command kinds this operator may send (``operate`` or ``operate:<kind>``):
        the only ones the form offers."""
        return tuple(k for k in KINDS if self.operator.allows(command_scope(k)))

    @property
    def can_operate(self) -> bool:
        return bool(self.kinds)

    def kind_or_default(self, kind: str | None) -> str:
        """``kind`` if this operator may send it, else ``bridge.configure`` (the form's
        default: it changes nothing that is left empty) or the first kind they may send."""
        kinds = self.kinds
        if kind in kinds:
            return kind
        return _DEFAULT_KIND if _DEFAULT_KIND in kinds or not kinds else kinds[0]

    def context(self, **extra: Any) -> dict[str, Any]:
        return {"viewer": self, "operator": self.operator.name, "csrf": self.csrf,
                "can_operate": self.can_operate, **extra}


def login_required_response(request: Request) -> Response:
    """The login form for a page, ``HX-Redirect`` for htmx, 401 for a live stream."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    login = f"{PREFIX}/login?next={quote(target)}"
    if request.headers.get("hx-request"):
        return Response(status_code=204, headers={"HX-Redirect": login, **SECURITY_HEADERS})
    if request.headers.get("accept", "").startswith("text/event-stream"):
        return Response("login required", status_code=401, headers=SECURITY_HEADERS)
    return RedirectResponse(login, status_code=303, headers=SECURITY_HEADERS)


def _safe_next(target: str | None) -> str:
    """Only a console path (never another host: no open redirect)."""
    if target and target.startswith(f"{PREFIX}/") and not target.startswith("//") \
            and "\\" not in target:
        return target
    return f"{PREFIX}/"


def _over_tls(request: Request) -> bool:
    """Whether the browser reached the console over TLS: directly, or through a proxy
    that terminated it and says so in ``X-Forwarded-Proto`` (the Ingress of
    ``deploy/``). Uvicorn trusts that header from 127.0.0.1 only, so behind an
    Ingress the request's own scheme is ``http``, and the session cookie went out
    without ``Secure``: a browser would then send it in clear to any ``http://`` URL of
    the host. A forged header can only make a cookie Secure, never less."""
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


def _same_origin(request: Request) -> bool:
    """A POST's ``Origin`` (browsers send it) must be this host; absent is allowed
    (non-browser clients), SameSite=Strict and the CSRF token still apply."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


def session_viewer(keys: SessionKeys) -> Callable[[Request], Awaitable[Viewer]]:
    """The dependency every console route starts with: the session's :class:`Viewer`.

    Raises:
        LoginRequired: no session, a damaged or expired one, or a token since revoked.
    """

    async def viewer(request: Request) -> Viewer:
        session = keys.open(request.cookies.get(COOKIE))
        if session is None:
            raise LoginRequired
        authenticator: Authenticator = request.app.state.authenticator
        try:
            operator = await authenticator.authenticate(f"Bearer {session.token}")
        except Unauthorized:
            raise LoginRequired from None  # revoked since: the session ends with it
        if not operator.allows("read"):
            raise LoginRequired
        request.state.operator = operator  # the audit log's "who"
        return Viewer(operator, session, keys.csrf_token(session))

    return viewer


def console_pages(api: Api, keys: SessionKeys, renderer: Renderer) -> APIRouter:
    """The page routes (the live streams are :func:`cloud_ingest.console.live.console_live`)."""
    router = APIRouter(prefix=PREFIX, include_in_schema=False)
    settings = api.settings

    viewer = session_viewer(keys)

    async def poster(request: Request) -> Viewer:
        """A viewer whose POST carries this session's CSRF token and this origin."""
        v = await viewer(request)
        form = await request.form()
        given = request.headers.get("x-csrf-token") or str(form.get("csrf", ""))
        if not _same_origin(request) or not keys.csrf_ok(v.session, given):
            raise CsrfRefused
        return v

    current = Depends(viewer)
    posting = Depends(poster)

    # -- login --------------------------------------------------------------------------

    @router.get("/login")
    async def login_form(next: str | None = None) -> HTMLResponse:
        return renderer.page("login.html", {"next": _safe_next(next), "error": None})

    @router.post("/login")
    async def login(request: Request, token: Annotated[str, Form(max_length=512)] = "",
                    next: Annotated[str, Form(max_length=2000)] = "") -> Response:
        target = _safe_next(next)
        error = None
        if not _same_origin(request):
            error = "This form was sent from another site."
        else:
            authenticator: Authenticator = request.app.state.authenticator
            try:
                operator = await authenticator.authenticate(f"Bearer {token.strip()}")
            except Unauthorized:
                operator, error = None, "Unknown or revoked operator token."
            if operator is not None and not operator.allows("read"):
                error = "This token has no read scope."
            request.state.operator = operator
        request.state.audit = {"action": "console.login"}
        if error is not None:
            client = request.client
            log.warning("console_login_refused", reason=error,
                        client=f"{client.host}:{client.port}" if client else "")
            return renderer.page("login.html", {"next": target, "error": error}, status=401)
        response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
        response.set_cookie(
            COOKIE, keys.seal(keys.new_session(token.strip())), max_age=SESSION_MAX_AGE_S,
            path=PREFIX, httponly=True, samesite="strict",
            secure=_over_tls(request))
        return response

    @router.post("/logout")
    async def logout(request: Request, v: Viewer = posting) -> Response:
        request.state.audit = {"action": "console.logout"}
        response = RedirectResponse(f"{PREFIX}/login", status_code=303,
                                    headers=SECURITY_HEADERS)
        response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict",
                               secure=_over_tls(request))
        return response

    @router.get("/session")
    async def session_state(request: Request) -> Response:
        """204 while this browser's session holds, 401 once it has ended (logged out,
        expired, the token revoked): what ``console.js`` asks when a live stream is
        refused, to say so instead of retrying for ever."""
        try:
            await viewer(request)
        except LoginRequired:
            return Response("session ended", status_code=401, media_type="text/plain",
                            headers=SECURITY_HEADERS)
        return Response(status_code=204, headers=SECURITY_HEADERS)

    # -- fleet --------------------------------------------------------------------------

    async def fleet_context(query: FleetQuery) -> tuple[dict[str, Any], float]:
        started = time.perf_counter()
        async with api._db().acquire() as conn:
            page = await fleet_page(conn, query, offline_after_s=settings.edge_offline_after_s)
        return {"fleet": page, "query": query, "sorts": FLEET_SORTS, "states": FLEET_STATES,
                "page_sizes": PAGE_SIZES, "urlencode": urlencode}, time.perf_counter() - started

    @router.get("")
    @router.get("/")
    @router.get("/fleet")
    async def fleet(  # noqa: PLR0917 (FastAPI injects by name)
        request: Request, v: Viewer = current, q: str | None = None,
        state: str | None = None, sort: str | None = None, order: str | None = None,
        page: str | None = None, per_page: str | None = None,
    ) -> HTMLResponse:
        started = time.perf_counter()
        # Taken as text: a hand-edited page=0 or per_page=all falls back to the default
        # like every other parameter, instead of a JSON 422 in place of the page.
        query = FleetQuery.of(q=q, state=state, sort=sort, order=order,
                              page=whole_number(page), per_page=whole_number(per_page))
        context, db_s = await fleet_context(query)
        fragment = request.headers.get("hx-target") == "fleet-region"
        return renderer.page("_fleet.html" if fragment else "fleet.html",
                             v.context(nav="fleet", **context), started=started, db_s=db_s)

    # -- one edge -----------------------------------------------------------------------

    async def edge_context(edge: str) -> dict[str, Any] | None:
        async with api._db().acquire() as conn:
            detail = await edge_detail(conn, edge, offline_after_s=settings.edge_offline_after_s)
            if detail is None:
                return None
            history = await watermark_history(conn, edge)
            letters = await list_dead_letters(conn, edge=edge, limit=10)
            desired = await desired_state(conn, edge)
        commands = await api.list_commands(edge, status=None, limit=10)
        return {"edge": detail, "history": history, "dead_letters": letters,
                "commands": commands, "desired": desired}

    @router.get("/edges/{edge}")
    async def edge_page(edge: str, v: Viewer = current,
                        kind: str | None = None) -> HTMLResponse:
        started = time.perf_counter()
        context = await edge_context(edge) if is_valid_token(edge) else None
        if context is None:
            return renderer.page("not_found.html", v.context(
                nav="fleet", what=f"No edge {edge!r} has reported to this cloud." if
                is_valid_token(edge) else _NOT_AN_EDGE_ID), status=404)
        db_s = time.perf_counter() - started
        return renderer.page("edge.html", v.context(
            nav="fleet", **context, form=_form_context(edge, v.kind_or_default(kind), v.kinds)),
            started=started, db_s=db_s)

    @router.get("/edges/{edge}/command-form")
    async def command_form(edge: str, v: Viewer = current,
                           kind: str | None = None) -> HTMLResponse:
        kind = v.kind_or_default(kind if is_valid_token(edge) else None)
        return renderer.page("_command_form.html",
                             v.context(form=_form_context(edge, kind, v.kinds)))

    @router.post("/edges/{edge}/commands")
    async def issue_command(edge: str, request: Request, v: Viewer = posting) -> HTMLResponse:
        form = {k: str(val) for k, val in (await request.form()).items()}
        kind = form.get("kind", "")
        request.state.audit = {"action": "command.issue", "target": edge, "kind": kind,
                               "via": "console"}
        parsed = parse_form(kind, form)
        ctx = _form_context(edge, kind if kind in SPEC_MODELS else v.kind_or_default(None),
                            v.kinds)
        ctx.update(values=parsed.values, errors=parsed.errors, ttl=form.get("ttl_seconds", ""))
        if not v.operator.allows(command_scope(kind)):
            ctx["errors"] = {"": f"operator {v.operator.name!r} may not send {kind} commands "
                                 "(needs the operate scope)"}
            return renderer.page("_command_form.html", v.context(form=ctx), status=403)
        ttl = _ttl(form.get("ttl_seconds", ""), settings.default_ttl_s, settings.min_ttl_s,
                   settings.max_ttl_s, ctx["errors"])
        key = form.get("idempotency_key") or None  # (a hand-made POST: the form has none)
        if key is not None and len(key) > IDEMPOTENCY_KEY_MAX:
            ctx["errors"][""] = (f"an idempotency key is at most {IDEMPOTENCY_KEY_MAX} "
                                 f"characters (this one has {len(key)})")
        if not is_valid_token(edge) or not await api.edge_exists(edge):
            ctx["errors"][""] = f"edge {edge!r} has never reported to this cloud"
        if ctx["errors"] or parsed.spec is None:
            return renderer.page("_command_form.html", v.context(form=ctx), status=422)
        reason = destructive_reason(kind, parsed.spec)
        if reason is not None and form.get("confirm") != "yes":
            ctx["confirm"] = reason  # shown with a button that sends confirm=yes
            return renderer.page("_command_form.html", v.context(form=ctx), status=200)
        try:
            row, _ = await api.issue(edge, kind, parsed.spec, ttl_s=ttl,
                                     idempotency_key=key,
                                     operator=v.operator.name)
        except EdgesyncError as exc:
            # Refused as the API would refuse it (an idempotency key used for another
            # command: 409; a signed command above what an edge accepts: 413; ...): the
            # reason on the form, the operator's values kept, never a bare JSON body.
            ctx["errors"][""] = str(exc)
            return renderer.page("_command_form.html", v.context(form=ctx),
                                 status=http_status(exc))
        request.state.audit.update(command=str(row["id"]))
        fresh = _form_context(edge, kind, v.kinds)
        fresh["issued"] = {"id": str(row["id"]), "kind": kind, "status": row["status"]}
        return renderer.page("_command_form.html", v.context(form=fresh),
                             headers={"HX-Trigger": "command-issued"})

    @router.get("/commands/{command_id}")
    async def command_page(command_id: str, v: Viewer = current) -> HTMLResponse:
        found = await api.get_command(command_id)
        if found is None:
            return renderer.page("not_found.html", v.context(
                nav="fleet", what=f"No command {command_id!r}." if
                COMMAND_ID.match(command_id) else "No command with that id."), status=404)
        return renderer.page("command.html", v.context(nav="fleet", command=found))

    # -- data and rollouts ---------------------------------------------------------------

    @router.get("/data")
    async def data(v: Viewer = current, edge: str | None = None,
                   stream: str | None = None) -> HTMLResponse:
        started = time.perf_counter()
        edge = edge if edge and is_valid_token(edge) else None
        stream = stream if stream and is_valid_token(stream) else None
        async with api._db().acquire() as conn:
            rows = await completeness_rows(conn, edge=edge, stream=stream,
                                           limit=_DATA_ROWS + 1)
        # One more than shown is read to know whether there are more: a fleet of 10,000
        # edges has 20,000 rows, and a page of the first 100 must not pass for all of them.
        return renderer.page("data.html", v.context(
            nav="data", rows=rows[:_DATA_ROWS], more=len(rows) > _DATA_ROWS,
            edge=edge or "", stream=stream or "",
            tail_query=urlencode({k: x for k, x in (("edge", edge), ("stream", stream)) if x})),
            started=started, db_s=time.perf_counter() - started)

    @router.get("/rollouts")
    async def rollouts_page(v: Viewer = current) -> HTMLResponse:
        async with api._db().acquire() as conn:
            rows = await rollouts(conn)
        return renderer.page("rollouts.html", v.context(nav="rollouts", rollouts=rows))

    return router


def whole_number(text: str | None) -> int | None:
    """``text`` as an int, or None if it is not one (the caller's default applies)."""
    try:
        return int(text) if text is not None and len(text) <= 18 else None
    except ValueError:
        return None


def _form_context(edge: str, kind: str, kinds: tuple[str, ...]) -> dict[str, Any]:
    return {"edge": edge, "kind": kind, "kinds": kinds, "fields": form_fields(kind),
            "values": {}, "errors": {}, "ttl": "", "confirm": None, "issued": None,
            "form_id": uuid.uuid4().hex[:8]}


def _ttl(text: str, default: float, low: float, high: float, errors: dict[str, str]
         ) -> float:
    text = text.strip()
    if not text:
        return default
    try:
        ttl = float(text)
    except ValueError:
        errors["ttl_seconds"] = f"{text!r} is not a number of seconds"
        return default
    if not low <= ttl <= high:
        errors["ttl_seconds"] = f"between {low:g} and {high:g} seconds"
    return ttl
