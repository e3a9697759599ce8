"""Serving an ASGI app inside a service that owns its own signals and socket."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import uvicorn

__all__ = ["EmbeddedServer", "embedded_server"]


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT/SIGTERM to the service embedding it.

    uvicorn normally installs its own handlers and re-raises the signal after
    it stops, which would bypass our ordered shutdown.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def embedded_server(app: Any, *, graceful_s: int = 5) -> EmbeddedServer:
    """An :class:`EmbeddedServer` for ``app``; call ``serve(sockets=[sock])`` on it."""
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="off",
        timeout_graceful_shutdown=graceful_s,
    )
    return EmbeddedServer(config)
