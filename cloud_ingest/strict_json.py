"""Request bodies read as JSON the standard knows: no ``NaN``, ``Infinity`` or a number
beyond a float's range.

Python's parser takes ``NaN`` and ``Infinity`` (and reads ``1e400`` as infinity). Such a
value then failed a model's check, and the 422 that echoed it could not be written
(JSON has no NaN): every write route answered any operator, read-only ones included,
with a 500 and a traceback (found by an attacker probe). A :class:`StrictJsonRoute`
parses the body so that such a number is a JSON error: FastAPI's own 422 (``json_invalid``)
with the reason.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

__all__ = ["StrictJsonRequest", "StrictJsonRoute", "loads"]


def _constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not a JSON number", name, 0)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise json.JSONDecodeError(f"{text} is beyond a float's range", text, 0)
    return value


def loads(body: bytes | str) -> Any:
    """``json.loads`` that refuses NaN, Infinity and numbers beyond a float's range
    (:class:`json.JSONDecodeError`)."""
    return json.loads(body, parse_constant=_constant, parse_float=_float)


class StrictJsonRequest(Request):
    """A request whose :meth:`json` is :func:`loads`."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """A route whose handler reads its body with :class:`StrictJsonRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict
