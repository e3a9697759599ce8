"""``edgesync streams init|check``: the admin step that owns the JetStream topology.

The cloud owns the streams and the watermark KV bucket (see
:mod:`broker.protocol.topology`). The ingest creates them when it starts;
``streams init`` does the same without running an ingest (e.g. a deploy job
before the first bridge connects), and ``streams check`` reports whether
what exists matches the configuration, changing nothing. Both connect as the
admin identity: next to a running ``edgesync up`` (``--state-dir``, default
``.edgesync``) with the URL and CA of its ``runtime.json`` and its admin
credentials, else with the ``EDGESYNC_NATS__*`` settings (its credentials
file, the CA).

| exit | meaning                                                  |
| ---- | -------------------------------------------------------- |
| 0    | ``init``: created or updated; ``check``: all as expected |
| 1    | ``check``: something missing or configured differently   |
| 2    | NATS unreachable, bad settings                           |
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from broker.cli.output import stderr_console, stdout_console
from broker.settings import NatsSettings

if TYPE_CHECKING:  # imported when used: `edgesync --help` stays fast
    from nats.js import JetStreamContext

    from broker.protocol.topology import Topology

__all__ = [
    "StateDir",
    "StreamCheck",
    "check",
    "check_topology",
    "console",
    "init",
    "streams_app",
]

console = stdout_console()
_errors = stderr_console()  # errors: never into the data
streams_app = typer.Typer(no_args_is_help=True,
                          help="Create or check the JetStream streams and KV bucket (admin).")
EXIT_MISMATCH, EXIT_ERROR = 1, 2


@dataclass(frozen=True, slots=True)
class StreamCheck:
    """How one stream (or the KV bucket's stream) compares with the configuration."""

    name: str
    exists: bool
    replicas: int | None
    expected_replicas: int
    subjects: list[str]
    expected_subjects: list[str]

    @property
    def ok(self) -> bool:
        return (self.exists and self.replicas == self.expected_replicas
                and sorted(self.subjects) == sorted(self.expected_subjects))


async def check_topology(js: JetStreamContext, topology: Topology) -> list[StreamCheck]:
    """Compare every stream (and the KV bucket) with ``topology``; reads only."""
    from nats.js.errors import NotFoundError

    kv = topology.watermarks_config()
    expected = [(c.name or "", list(c.subjects or [])) for c in topology.stream_configs()]
    expected.append((f"KV_{kv.bucket}", [f"$KV.{kv.bucket}.>"]))
    checks = []
    for name, subjects in expected:
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            checks.append(StreamCheck(name, False, None, topology.replicas, [], subjects))
            continue
        checks.append(StreamCheck(
            name, True, info.config.num_replicas, topology.replicas,
            list(info.config.subjects or []), subjects,
        ))
    return checks


def _topology(settings: NatsSettings) -> Topology:
    from broker.protocol.topology import Topology

    return Topology(prefix=settings.prefix, replicas=settings.replicas)


async def _with_js(settings: NatsSettings,
                   body: Callable[[JetStreamContext], Awaitable[list[StreamCheck]]]
                   ) -> list[StreamCheck]:

    from broker.connecting import connect_once, connect_options
    from broker.protocol.permissions import inbox_prefix

    # As the admin identity (EDGESYNC_NATS__CREDENTIALS_FILE, CA_FILE): on a secured
    # server only the admin (or the ingest) may create streams, and replies come on
    # the admin's own inbox prefix, the only one it may subscribe to.
    nc = await connect_once([s.strip() for s in settings.url.split(",") if s.strip()],
                            timeout_s=3 * settings.connect_timeout_s,
                            connect_timeout=settings.connect_timeout_s,
                            **connect_options(settings, inbox_prefix=inbox_prefix(
                                _topology(settings), "admin")))
    try:
        return await body(nc.jetstream(timeout=settings.publish_timeout_s))
    finally:
        await nc.close()


def _print(checks: list[StreamCheck]) -> None:
    table = Table(title="JetStream topology")
    for col in ("stream", "exists", "replicas (expected)", "subjects", "ok"):
        table.add_column(col)
    for c in checks:
        table.add_row(c.name, "yes" if c.exists else "no",
                      f"{c.replicas if c.replicas is not None else '-'} ({c.expected_replicas})",
                      ", ".join(c.subjects) or "-", "yes" if c.ok else "[red]no[/red]")
    console.print(table)


def _run(body: Callable[[JetStreamContext], Awaitable[list[StreamCheck]]],
         settings: NatsSettings, state_dir: Path) -> list[StreamCheck]:
    from broker.cli.edges import nats_not_located
    from broker.cli.locating import reason

    try:
        return asyncio.run(_with_js(settings, body))
    except Exception as exc:  # the CLI boundary: any failure to talk to NATS is exit 2
        _errors.print(f"[red]cannot reach NATS at {settings.url}:[/red] "
                      f"{type(exc).__name__}: {reason(exc)}")
        if (note := nats_not_located(state_dir)) is not None:
            console.print(note)
        raise typer.Exit(EXIT_ERROR) from exc


StateDir = Annotated[Path, typer.Option(
    help="Where `edgesync up` keeps its state (its runtime.json and admin credentials are "
    "used when present).")]


def _settings(state_dir: Path) -> NatsSettings:
    """The admin's NATS settings: those of a running `edgesync up` in ``state_dir``, else
    the environment's."""
    from broker.cli.edges import admin_settings_for

    return admin_settings_for(state_dir)


@streams_app.command("init")
def init(state_dir: StateDir = Path(".edgesync")) -> None:
    """Create the streams and the watermark bucket, or update them to these settings
    (EDGESYNC_NATS__PREFIX, EDGESYNC_NATS__REPLICAS)."""
    settings = _settings(state_dir)
    topology = _topology(settings)

    async def body(js: JetStreamContext) -> list[StreamCheck]:
        await topology.ensure_all(js)
        return await check_topology(js, topology)

    checks = _run(body, settings, state_dir)
    _print(checks)


@streams_app.command("check")
def check(state_dir: StateDir = Path(".edgesync")) -> None:
    """Report whether the streams and the bucket exist as configured; change nothing."""
    settings = _settings(state_dir)
    topology = _topology(settings)

    async def body(js: JetStreamContext) -> list[StreamCheck]:
        return await check_topology(js, topology)

    checks = _run(body, settings, state_dir)
    _print(checks)
    if not all(c.ok for c in checks):
        raise typer.Exit(EXIT_MISMATCH)
