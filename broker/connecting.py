"""Connecting to NATS the way every long-lived service needs: keep trying.

nats-py reconnects by itself once connected, but the *first* connect fails
fast when the server is down. A bridge must start (and accept records) while
NATS is unreachable, so the first connect is retried here with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import nats
import structlog
from nats.aio.client import Client as NATS

from broker.backoff import backoff_s
from broker.settings import NatsSettings

__all__ = ["close_nats", "connect_with_retry"]

log = structlog.get_logger(__name__)


async def connect_with_retry(
    settings: NatsSettings,
    *,
    name: str,
    disconnected_cb: Callable[[], Awaitable[None]] | None = None,
    reconnected_cb: Callable[[], Awaitable[None]] | None = None,
    max_backoff_s: float = 5.0,
) -> NATS:
    """Connect, retrying with capped exponential backoff until it succeeds.

    Cancel the calling task to give up.
    """
    attempt = 0
    servers = [s.strip() for s in settings.url.split(",") if s.strip()]

    async def on_error(exc: Exception) -> None:
        log.debug("nats_client_error", client=name, error=f"{type(exc).__name__}: {exc}")

    async def on_disconnected() -> None:
        log.warning("nats_disconnected", client=name)
        if disconnected_cb is not None:
            await disconnected_cb()

    async def on_reconnected() -> None:
        log.info("nats_reconnected", client=name)
        if reconnected_cb is not None:
            await reconnected_cb()

    while True:
        try:
            nc = await nats.connect(
                servers=servers,
                name=name,
                connect_timeout=settings.connect_timeout_s,
                reconnect_time_wait=settings.reconnect_wait_s,
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                ping_interval=5,
                max_outstanding_pings=3,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            attempt += 1
            delay = backoff_s(attempt, cap_s=max_backoff_s)
            log.warning(
                "nats_connect_failed", client=name, attempt=attempt, retry_in_s=round(delay, 2),
                error=f"{type(exc).__name__}: {exc}",
            )
            await asyncio.sleep(delay)
            continue
        log.info("nats_connected", client=name, url=nc.connected_url.netloc if nc.connected_url
                 else None)
        return nc


async def close_nats(nc: NATS, timeout_s: float = 5.0) -> None:
    """Close a connection within ``timeout_s``; a dead link must not hang a shutdown."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), timeout=timeout_s)
