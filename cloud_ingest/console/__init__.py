"""The operator console: the fleet, each edge's data health, commands and rollouts in
the browser, served by the operator API under ``/ui`` (``docs/console.md``).

Server-rendered HTML (Jinja2) with htmx and its SSE extension vendored under
``/ui/static`` (no CDN: it works on an air-gapped network). Rooms:
:mod:`~cloud_ingest.console.sessions` (login cookie, CSRF),
:mod:`~cloud_ingest.console.pages` (the pages and the command form's POST),
:mod:`~cloud_ingest.console.live` (Server-Sent Events of fragments),
:mod:`~cloud_ingest.console.queries` (what they read), :mod:`~cloud_ingest.console.forms`
(the command form from the command specs), :mod:`~cloud_ingest.console.charts`
(inline SVG) and :mod:`~cloud_ingest.console.rendering` (templates).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

from cloud_ingest.console import live as _live
from cloud_ingest.console import pages as _pages
from cloud_ingest.console import rendering as _rendering
from cloud_ingest.console import sessions as _sessions

if TYPE_CHECKING:
    from cloud_ingest.api.records import TailLimit
    from cloud_ingest.api.service import Api

__all__ = ["PREFIX", "STATIC_DIR", "mount_console"]

PREFIX: Final = _pages.PREFIX
"""Where the console lives in the API's URL space (``/ui``)."""

STATIC_DIR: Final = Path(__file__).parent / "static"
"""htmx, its SSE extension, the stylesheet: packaged in the wheel."""


class _Static(StaticFiles):
    """The console's script and style, ``nosniff`` like its pages: a browser runs
    them only as what they are served as."""

    def file_response(self, full_path: Any, stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def mount_console(app: FastAPI, api: Api, *, tails: TailLimit,
                  keys: _sessions.SessionKeys | None = None) -> None:
    """Serve the console under :data:`PREFIX` of ``app``.

    Args:
        tails: the API's limits on streams that hold a PostgreSQL connection: the
            console's live tail counts against them like ``/v1/records/tail``.
        keys: the session keys; by default derived from the API's command-signing
            key, so every replica of the API opens every replica's sessions (without
            one configured: a random key, valid for this process only).
    """
    if keys is None:
        key_file = api.settings.private_key_file
        # A serving Api always has its key file (it refuses to start without one); an app
        # built without it (route listings, tests) gets a key of its own for its life.
        keys = (_sessions.SessionKeys.from_key_file(key_file) if key_file is not None
                else _sessions.SessionKeys(os.urandom(32)))
    renderer = _rendering.Renderer()
    app.include_router(_pages.console_pages(api, keys, renderer))
    app.include_router(_live.console_live(api, renderer, _pages.session_viewer(keys), tails))
    app.mount(f"{PREFIX}/static", _Static(directory=STATIC_DIR), name="console-static")

    @app.exception_handler(_pages.LoginRequired)
    async def login_required(request: Request, exc: _pages.LoginRequired) -> Response:
        return _pages.login_required_response(request)

    @app.exception_handler(_pages.CsrfRefused)
    async def csrf_refused(request: Request, exc: _pages.CsrfRefused) -> Response:
        return HTMLResponse(
            "<!doctype html><title>Refused</title><p>This form is stale or came from "
            f'another site. <a href="{PREFIX}/">Reload the console</a> and try again.</p>',
            status_code=403, headers=_rendering.SECURITY_HEADERS)
