"""The one ``async with`` shape of a resource that is opened and closed.

A class with ``open()`` and ``close()`` coroutines inherits :class:`Opened` and is
an async context manager: ``async with X(...) as x`` opens it, and leaving the
block closes it whatever happened inside (the block's exception propagates).
The two methods are the subclass's (checked structurally by mypy at the
``async with``; no metaclass is imposed). Services with a lifecycle state and
rollback use :class:`broker.service.Service` instead; this is for the plain
resources (buffer, stores, channels, feed readers, child servers).
"""

from __future__ import annotations

from typing import Protocol, TypeVar

__all__ = ["Opened"]


class _OpenClose(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...


_R = TypeVar("_R", bound=_OpenClose)


class Opened:
    """An async context manager over the subclass's ``open()`` and ``close()``."""

    async def __aenter__(self: _R) -> _R:
        await self.open()
        return self

    async def __aexit__(self: _OpenClose, *exc: object) -> None:
        await self.close()
