"""Who may use the operator API: the operator token, checked in constant time.

Writes need ``Authorization: Bearer <operator token>``; reads are open unless
``read_requires_token``. A refusal is :class:`~broker.errors.Unauthorized` (401,
with the ``WWW-Authenticate`` challenge the routes add).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import Header

from broker.errors import Unauthorized
from broker.settings import ApiSettings

__all__ = ["CHALLENGE", "read_guard", "token_ok", "write_guard"]

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="edgesync"'}
"""The header every 401 carries."""


def token_ok(settings: ApiSettings, authorization: str | None) -> bool:
    """Whether ``authorization`` is ``Bearer <the configured operator token>``."""
    expected = settings.operator_token
    if expected is None or not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), expected.get_secret_value().encode())


def write_guard(settings: ApiSettings) -> Callable[..., None]:
    """A FastAPI dependency that refuses requests without the operator token."""

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if not token_ok(settings, authorization):
            raise Unauthorized(
                "writes are disabled: no operator token is configured "
                "(EDGESYNC_API__OPERATOR_TOKEN)" if settings.operator_token is None
                else "missing or wrong operator token (Authorization: Bearer <token>)")

    return require_token


def read_guard(settings: ApiSettings) -> Callable[..., None]:
    """A FastAPI dependency for reads: open, unless ``read_requires_token``."""
    require_token = write_guard(settings)

    def require_read(authorization: Annotated[str | None, Header()] = None) -> None:
        if settings.read_requires_token:
            require_token(authorization)

    return require_read
