"""The ASGI fast path of the ingress's hot route, in front of the ingress application.

Every record reaches the bridge through ``POST /v1/streams/{stream}/records``. Through
the application a request also paid for its middleware stack, routing and a
``Request`` object (a profile of the bridge under the edge-path load showed them);
here that one route is recognised from the ASGI scope and answered by the same
:class:`~edge_bridge.ingress_records.RecordsEndpoint` the application's route calls,
whose Starlette response is sent as the application would send it. Everything else
(other routes and methods, a path the application would redirect, a ``root_path``)
goes to the application unchanged, which also keeps describing the route in
``/openapi.json``.
``tests/integration/test_ingress_fast_path.py`` checks both ways answer alike.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

from starlette.requests import ClientDisconnect
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from edge_bridge.ingress_openapi import RECORDS_PATH
from edge_bridge.ingress_records import RecordsEndpoint

__all__ = ["RecordsFastPath"]

_PREFIX: Final = RECORDS_PATH.split("{", 1)[0]
_SUFFIX: Final = RECORDS_PATH.rsplit("}", 1)[1]


class RecordsFastPath:
    """An ASGI application: the records route answered directly, the rest by ``app``."""

    def __init__(self, app: ASGIApp, endpoint: RecordsEndpoint) -> None:
        self.app = app
        self._endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = _records_stream(scope)
        if stream is None:
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:  # as Starlette's Headers.get: the first of repeats
            key = name.decode("latin-1").lower()
            if key not in headers:
                headers[key] = value.decode("latin-1")
        try:
            response = await self._endpoint.respond(stream, headers, _body(receive))
        except ClientDisconnect:
            return  # nobody is left to answer
        except Exception:
            # What Starlette's ServerErrorMiddleware answers before the server logs it.
            await PlainTextResponse("Internal Server Error", status_code=500)(
                scope, receive, send)
            raise
        await response(scope, receive, send)


def _records_stream(scope: Scope) -> str | None:
    """The stream of a request the application would route to the records route, else None."""
    if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
        return None
    path: str = scope["path"]
    if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
        return None
    stream = path[len(_PREFIX):len(path) - len(_SUFFIX)]
    # The route's ``{stream}`` matches one non-empty path segment.
    return stream if stream and "/" not in stream else None


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    """The request body's chunks, as Starlette's ``Request.stream`` yields them."""
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk: bytes = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect
