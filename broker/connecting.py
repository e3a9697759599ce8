"""Connecting to NATS the way every long-lived service needs: keep trying.

nats-py reconnects by itself once connected; the *first* connect is ours to
keep trying. A bridge must start (and accept records) while NATS is unreachable,
so the first connect is retried here with backoff, and every attempt has a
deadline: nats-py's ``connect()`` can wait forever. When the server goes away in
the middle of a TLS handshake, nats-py's clean-up awaits ``wait_closed()`` on the
plain stream the handshake was taken over from, which never completes (its
protocol no longer hears about the connection); with no deadline a bridge whose
first connect was cut short stayed unconnected, shipping nothing, until restarted.

Identity and transport security come from :class:`NatsSettings`: the
credentials file (an nkey seed, or a user JWT ``.creds`` file), TLS with the
given CA and optional client certificate, and the reply-subject prefix the
caller's permissions allow (see :func:`broker.protocol.permissions.inbox_prefix`).
A server refusing the credentials is retried like an unreachable one: a
revoked edge keeps buffering, and resumes once it is provisioned again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import structlog
from nats.aio.client import Client as NATS

from broker.backoff import backoff_s
from broker.errors import ConfigError
from broker.settings import NatsSettings

__all__ = [
    "attempt_deadline_s", "close_nats", "connect_once", "connect_options", "connect_with_retry",
    "tls_context",
]

_JWT_MARK = b"-----BEGIN NATS USER JWT-----"

log = structlog.get_logger(__name__)


def tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    """The client TLS context of ``settings``, or None when TLS is off.

    Raises:
        ConfigError: a CA or certificate file cannot be read.
    """
    if not settings.tls:
        return None
    try:
        context = ssl.create_default_context(
            cafile=str(settings.ca_file) if settings.ca_file else None)
        if settings.cert_file is not None and settings.key_file is not None:
            context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"nats TLS files unusable: {exc}") from exc
    return context


def connect_options(settings: NatsSettings, *, inbox_prefix: str | None = None
                    ) -> dict[str, Any]:
    """The identity and TLS keyword arguments of ``nats.connect`` for ``settings``.

    Raises:
        ConfigError: the credentials file cannot be read.
    """
    options: dict[str, Any] = {}
    if inbox_prefix is not None:
        options["inbox_prefix"] = inbox_prefix
    if (context := tls_context(settings)) is not None:
        options["tls"] = context
    if settings.credentials_file is not None:
        try:
            head = settings.credentials_file.read_bytes()[:4096]
        except OSError as exc:
            raise ConfigError(f"nats.credentials_file unreadable: {exc}") from exc
        key = "user_credentials" if _JWT_MARK in head else "nkeys_seed"
        options[key] = str(settings.credentials_file)
    return options


async def connect_with_retry(
    settings: NatsSettings,
    *,
    name: str,
    inbox_prefix: str | None = None,
    disconnected_cb: Callable[[], Awaitable[None]] | None = None,
    reconnected_cb: Callable[[], Awaitable[None]] | None = None,
    closed_cb: Callable[[], Awaitable[None]] | None = None,
    max_backoff_s: float = 5.0,
    client: Callable[[], NATS] = NATS,
) -> NATS:
    """Connect, retrying with capped exponential backoff until it succeeds.

    Args:
        inbox_prefix: reply subjects below this prefix (what the identity may
            subscribe to); default nats-py's ``_INBOX``.
        closed_cb: called once the returned client is closed for good: by its
            ``close()``, or by nats-py giving the connection up (a server error it
            does not retry), after which nothing reconnects it.
        client: makes the unconnected client (a subclass of nats-py's, e.g. the
            ingest's :class:`cloud_ingest.direct_delivery.DeliveringClient`); it is
            connected with the same options as ``nats.connect`` would be.

    Cancel the calling task to give up.

    Raises:
        ConfigError: TLS or credentials files are unusable (retrying cannot help).
    """
    attempt = 0
    options = connect_options(settings, inbox_prefix=inbox_prefix)
    servers = [s.strip() for s in settings.url.split(",") if s.strip()]
    attempt_s = attempt_deadline_s(settings, len(servers))
    errors_seen: list[Exception] = []  # during the current attempt

    async def on_error(exc: Exception) -> None:
        if not connected:  # what the log of a failed attempt names
            errors_seen.append(exc)
        text = str(exc)
        if "Violation" in text:  # the server's words for a refused identity or subject
            log.warning("nats_permission_denied", client=name, error=text)
            return
        log.debug("nats_client_error", client=name, error=f"{type(exc).__name__}: {text}")

    nc: NATS | None = None
    connected = False

    async def on_disconnected() -> None:
        if not connected:
            return  # an attempt given up (closed below): there was no connection to lose
        # nats-py calls this on our own close() too, which is no outage: the client
        # is already CLOSED then (it never is after a lost connection: reconnects
        # are unlimited).
        if nc is not None and nc.is_closed:
            log.info("nats_connection_closed", client=name)
        else:
            log.warning("nats_disconnected", client=name)
        if disconnected_cb is not None:
            await disconnected_cb()

    async def on_closed() -> None:
        if connected and closed_cb is not None:  # not an attempt given up
            await closed_cb()

    async def on_reconnected() -> None:
        log.info("nats_reconnected", client=name)
        if reconnected_cb is not None:
            await reconnected_cb()

    options.update(  # as nats.connect(**options) would be called
        servers=servers,
        name=name,
        connect_timeout=settings.connect_timeout_s,
        reconnect_time_wait=settings.reconnect_wait_s,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
        closed_cb=on_closed,
        ping_interval=5,
        max_outstanding_pings=3,
    )
    while True:
        errors_seen.clear()
        nc = client()
        try:
            await asyncio.wait_for(nc.connect(**options), timeout=attempt_s)
        except asyncio.CancelledError:
            await _give_up(nc, settings)
            raise
        except Exception as exc:
            await _give_up(nc, settings)
            attempt += 1
            delay = backoff_s(attempt, cap_s=max_backoff_s)
            error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, TimeoutError):
                error = f"not connected within {attempt_s:g} s"
                if errors_seen:
                    last = errors_seen[-1]
                    error += f"; last error: {type(last).__name__}: {last}"
            log.warning(
                "nats_connect_failed", client=name, attempt=attempt, retry_in_s=round(delay, 2),
                error=error,
            )
            await asyncio.sleep(delay)
            continue
        connected = True
        log.info("nats_connected", client=name, url=nc.connected_url.netloc if nc.connected_url
                 else None)
        return nc


def attempt_deadline_s(settings: NatsSettings, servers: int = 1) -> float:
    """How long one attempt of :func:`connect_with_retry` may take before it is given up.

    nats-py bounds each step by ``connect_timeout_s``: the TCP connect to each server
    tried, then the TLS handshake, the INFO line and the PONG on the one that
    answers; plus one ``reconnect_wait_s`` pause before it tries a server again.
    """
    return settings.connect_timeout_s * (servers + 3) + settings.reconnect_wait_s


async def _give_up(nc: NATS, settings: NatsSettings) -> None:
    """Drop an attempt that failed or ran out of time; its client is never used again."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), timeout=settings.connect_timeout_s)


async def connect_once(servers: list[str], *, timeout_s: float, **options: Any) -> NATS:
    """One connection attempt, for a command or a test step that must not wait long.

    nats-py keeps retrying an initial connect that is refused (60 rounds, 2 s
    apart) even with ``allow_reconnect=False``; this bounds the whole attempt. What
    goes wrong on the way is not printed (nats-py's default ``error_cb`` logs a
    traceback per try): the last of it is in the ``TimeoutError`` raised, and the
    caller says what it means. Once connected, the connection's errors (a permission
    refused, say) are logged as warnings. An ``error_cb`` in ``options`` is called
    as well.

    Raises:
        TimeoutError: not connected within ``timeout_s`` (with the last error seen).
        Exception: what nats-py raised first (refused, authorization, TLS).
    """
    seen: list[Exception] = []
    connected = False
    caller_error_cb = options.pop("error_cb", None)

    async def on_error(exc: Exception) -> None:
        if connected:  # the link's own errors (a permission refused...) are told
            log.warning("nats_error", error=f"{type(exc).__name__}: {exc}")
        else:
            seen.append(exc)
        if caller_error_cb is not None:
            await caller_error_cb(exc)

    try:
        nc = await asyncio.wait_for(
            nats.connect(servers, allow_reconnect=False, max_reconnect_attempts=0,
                         error_cb=on_error, **options),
            timeout=timeout_s)
        connected = True
        return nc
    except TimeoutError as exc:
        last = f"; last error: {type(seen[-1]).__name__}: {seen[-1]}" if seen else ""
        raise TimeoutError(f"not connected within {timeout_s:g} s{last}") from exc


async def close_nats(nc: NATS, timeout_s: float = 5.0) -> None:
    """Close a connection within ``timeout_s``; a dead link must not hang a shutdown."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), timeout=timeout_s)
