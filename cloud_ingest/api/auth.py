"""Who may use the operator API, and what each request costs before anyone reads it.

Every request but ``/healthz``, ``/readyz`` and the API's description (``/docs``,
``/openapi.json``: its shape, no data) carries ``Authorization: Bearer <token>``
of an operator (:mod:`cloud_ingest.operators`) or the bootstrap
``api.operator_token`` (an admin). ``/metrics`` also takes ``api.metrics_token``.

:class:`ApiGuard` is the outermost layer (an ASGI middleware), in this order:

1. a declared ``Content-Length`` above the limit is 413 before anything else;
2. the token is checked (401 with a ``WWW-Authenticate`` challenge) from the
   headers alone, so an anonymous caller never gets a body parsed;
3. the body is read, at most the limit (a chunked body past it is 413), and
   handed to the app;
4. the answer of every write (any method but GET/HEAD/OPTIONS) and every 403 is
   appended to the audit log before it is sent: who, what, target, client
   address, status, and what the route added (``request.state.audit``).

Routes then ask for a scope with ``Depends(require_scope("read"))`` (403
:class:`~broker.errors.Forbidden` without it); the dependency returns the
:class:`~cloud_ingest.operators.Operator`.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any, Final

import asyncpg
import structlog
from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.errors import EdgesyncError, Forbidden, RequestTooLarge, Unauthorized
from broker.serving import error_response
from broker.settings import ApiSettings
from cloud_ingest.db_errors import DATABASE_ERRORS, as_temporary
from cloud_ingest.operators import BOOTSTRAP, Operator, audit, find_operator

__all__ = [
    "CHALLENGE",
    "OPEN_PATHS",
    "ApiGuard",
    "Authenticator",
    "read_guard",
    "require_scope",
    "write_guard",
]

log = structlog.get_logger(__name__)

CHALLENGE: Final = {"WWW-Authenticate": 'Bearer realm="edgesync"'}
"""The header every 401 carries."""

OPEN_PATHS: Final = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect",
                               "/openapi.json"})
"""Paths served without a token: probes, and the API's description (no data)."""

_READS: Final = frozenset({"GET", "HEAD", "OPTIONS"})


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _same(given: str, expected: str | None) -> bool:
    # An empty expected token guards nothing: it never matches (not even "Bearer ").
    return bool(expected) and hmac.compare_digest(given.encode(), (expected or "").encode())


class Authenticator:
    """Turns an ``Authorization`` header into an :class:`Operator`, or refuses it."""

    def __init__(self, settings: ApiSettings, pool: Callable[[], asyncpg.Pool]) -> None:
        self._bootstrap = (settings.operator_token.get_secret_value()
                           if settings.operator_token is not None else None)
        self._metrics = (settings.metrics_token.get_secret_value()
                         if settings.metrics_token is not None else None)
        self._pool = pool

    async def authenticate(self, authorization: str | None) -> Operator:
        """The operator of this header.

        Raises:
            Unauthorized: no bearer token, or one that is unknown or revoked.
        """
        token = _bearer(authorization)
        if token is None:
            raise Unauthorized("this API needs an operator token (Authorization: Bearer "
                               "<token>; make one with `edgesync operators add`)")
        if _same(token, self._bootstrap):
            return Operator(name=BOOTSTRAP, scopes=frozenset({"admin"}))
        async with self._pool().acquire() as conn:
            found = await find_operator(conn, token)
        if found is None:
            raise Unauthorized("unknown or revoked operator token")
        return found

    def is_metrics_token(self, authorization: str | None) -> bool:
        token = _bearer(authorization)
        return token is not None and _same(token, self._metrics)


def require_scope(scope: str) -> Callable[[Request], Awaitable[Operator]]:
    """A FastAPI dependency: the request's operator, if it holds ``scope`` (else 403).

    Reusable by any route of the API (``Depends(require_scope("read"))``); behind
    :class:`ApiGuard` the operator is already known, else it authenticates here.
    """

    async def operator_with_scope(request: Request) -> Operator:
        operator: Operator | None = getattr(request.state, "operator", None)
        if operator is None:
            authenticator: Authenticator = request.app.state.authenticator
            operator = await authenticator.authenticate(request.headers.get("authorization"))
            request.state.operator = operator
        if not operator.allows(scope):
            raise Forbidden(f"operator {operator.name!r} lacks the {scope!r} scope "
                            f"(has {', '.join(sorted(operator.scopes))})")
        return operator

    return operator_with_scope


def read_guard(settings: ApiSettings | None = None) -> Callable[[Request], Awaitable[Operator]]:
    """``require_scope("read")`` (the name older routes use)."""
    return require_scope("read")


def write_guard(settings: ApiSettings | None = None) -> Callable[[Request], Awaitable[Operator]]:
    """``require_scope("operate")`` (the name older routes use)."""
    return require_scope("operate")


class _BodyTooLarge(Exception):
    pass


class ApiGuard:
    """ASGI middleware: body limit, authentication and the audit log (module docstring).

    Args:
        max_body_bytes: the largest request body read (1 MiB by default in settings).
        session_prefixes: paths under these prefixes authenticate themselves (the
            console's session cookie, :mod:`cloud_ingest.console`): no bearer token is
            asked here, the body limit and the audit log still apply.
    """

    def __init__(self, app: ASGIApp, *, authenticator: Authenticator,
                 pool: Callable[[], asyncpg.Pool], max_body_bytes: int,
                 session_prefixes: tuple[str, ...] = ()) -> None:
        self.app = app
        self.authenticator = authenticator
        self.pool = pool
        self.max_body_bytes = max_body_bytes
        self.session_prefixes = session_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            declared = _content_length(scope)
            if declared is not None and declared > self.max_body_bytes:
                raise RequestTooLarge(f"request body of {declared} bytes is above the "
                                      f"{self.max_body_bytes}-byte limit")
            path: str = scope["path"]
            state: dict[str, Any] = scope.setdefault("state", {})
            if path not in OPEN_PATHS and not _under(path, self.session_prefixes):
                authorization = _header(scope, b"authorization")
                if not (path == "/metrics"
                        and self.authenticator.is_metrics_token(authorization)):
                    state["operator"] = await self.authenticator.authenticate(authorization)
            body = await self._read_body(receive)
        except EdgesyncError as exc:
            await self._refuse(exc, scope, receive, send)
            return
        except DATABASE_ERRORS as exc:
            temporary = as_temporary(exc)
            log.warning("api_auth_database_error", error=f"{type(exc).__name__}: {exc}")
            await self._refuse(temporary or Unauthorized("cannot check the token now"),
                               scope, receive, send)
            return
        except _BodyTooLarge:
            await self._refuse(RequestTooLarge(
                f"request body is above the {self.max_body_bytes}-byte limit"),
                scope, receive, send)
            return
        responded: list[int] = []
        try:
            await self.app(scope, _replay(body, receive), self._audited(scope, send, responded))
        except Exception:
            # An error no handler answered (Starlette's outer middleware sends the 500,
            # past this guard): the write was attempted, so it is audited as a 500.
            if not responded and scope["method"] not in _READS:
                await self._audit(scope, 500)
            raise

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # a disconnect: the app sees an empty body and the peer is gone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _refuse(self, exc: EdgesyncError, scope: Scope, receive: Receive,
                      send: Send) -> None:
        headers = CHALLENGE if isinstance(exc, Unauthorized) else None
        await error_response(exc, headers=headers)(scope, receive, send)

    def _audited(self, scope: Scope, send: Send, responded: list[int]) -> Send:
        """``send``, auditing a write's answer first (its status joins ``responded``)."""
        method: str = scope["method"]

        async def send_after_audit(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                responded.append(status)
                # A 401 is anonymous noise (a console login with a wrong token): counted
                # in the request metrics, not audited, as the guard's own 401s.
                if (method not in _READS or status == 403) and status != 401:
                    await self._audit(scope, status)
            await send(message)

        return send_after_audit

    async def _audit(self, scope: Scope, status: int) -> None:
        state = scope.get("state", {})
        operator: Operator | None = state.get("operator")
        extra: dict[str, Any] = dict(state.get("audit", {}))
        client = scope.get("client")
        try:
            async with self.pool().acquire() as conn:
                await audit(
                    conn, operator=operator.name if operator else "", status=status,
                    action=str(extra.pop("action", f"{scope['method']} {scope['path']}")),
                    target=str(extra.pop("target", "")),
                    client=f"{client[0]}:{client[1]}" if client else "", detail=extra)
        except Exception as exc:  # the action happened: say loudly that its trace did not
            log.error("audit_write_failed", error=f"{type(exc).__name__}: {exc}",
                      path=scope["path"], status=status)


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(f"{p}/") for p in prefixes)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _content_length(scope: Scope) -> int | None:
    raw = _header(scope, b"content-length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None  # uvicorn's parser refuses these before we see them


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
