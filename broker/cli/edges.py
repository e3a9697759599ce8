"""``edgesync edges``: provision, list and revoke the NATS identities of edges.

``add`` mints an edge's nkey (or registers a public key made on the edge),
writes its credentials file (0600), re-renders the server's ``auth.conf``,
reloads the server, and creates the edge's control consumer as the admin
identity. ``revoke`` removes the identity and reloads: the server closes the
edge's connection and refuses it from then on.

Where things are: the auth directory is ``--auth-dir`` or ``<state-dir>/nats-auth``.
``add`` makes it if missing (every directory on the way 0700, every file 0600);
``list``, ``repair`` and ``revoke`` read it as it is and fail (exit 2) when it is not
there. ``repair`` creates the control consumers JetStream lost (a store wiped or put
back from an older copy), as the admin; the ingest recreates the streams, but only
the admin may make an edge's consumer.
Next to a running ``edgesync up`` (its ``runtime.json``) the embedded server is
reloaded by its pid and reached with the CA from ``runtime.json``; against a
deployed server, pass ``--reload-pid`` or reload it yourself
(``nats-server --signal reload=<pid>``), and NATS connection settings come
from ``EDGESYNC_NATS__*`` with the admin's credentials.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from broker.cli.locating import not_located, read_runtime, reason
from broker.cli.output import stderr_console, stdout_console
from broker.errors import ConfigError, EdgesyncError
from broker.identities import IdentityStore
from broker.protocol.topology import Topology
from broker.settings import NatsSettings, load_settings

__all__ = [
    "AuthDir",
    "ReloadPid",
    "StateDir",
    "add",
    "admin_settings_for",
    "console",
    "edges_app",
    "list_",
    "nats_not_located",
    "repair",
    "revoke",
]

edges_app = typer.Typer(no_args_is_help=True,
                        help="Provision and revoke edges' NATS identities.")
console = stdout_console()
_errors = stderr_console()  # errors: never into the data

StateDir = Annotated[Path, typer.Option(help="Where `edgesync up` keeps its state.")]
AuthDir = Annotated[Path | None, typer.Option(
    help="The auth directory (identities, seeds, auth.conf); default <state-dir>/nats-auth.")]
ReloadPid = Annotated[int | None, typer.Option(
    help="Pid of the nats-server to reload (default: the one in runtime.json, if any).")]


_runtime = read_runtime


def nats_not_located(state_dir: Path) -> str | None:
    """Why the admin's NATS URL may be the wrong one: no ``runtime.json`` in
    ``state_dir`` and no ``EDGESYNC_NATS__URL`` left only the default to try."""
    return not_located(state_dir, given="url" in load_settings().nats.model_fields_set,
                       flags="--state-dir",
                       setting="EDGESYNC_NATS__URL and the admin's "
                               "EDGESYNC_NATS__CREDENTIALS_FILE")


def _store(state_dir: Path, auth_dir: Path | None) -> IdentityStore:
    """The auth directory, made (0700, with the service identities) if missing: for the
    commands that provision."""
    prefix = load_settings().nats.prefix
    store = IdentityStore(auth_dir or state_dir / "nats-auth", Topology(prefix=prefix))
    store.ensure_services()
    return store


def _existing_store(state_dir: Path, auth_dir: Path | None) -> IdentityStore:
    """The auth directory as it is, for the commands that read it or remove from it:
    one that is not there is an error (exit 2), never made (with fresh keys) on the spot."""
    prefix = load_settings().nats.prefix
    try:
        return IdentityStore(auth_dir or state_dir / "nats-auth", Topology(prefix=prefix),
                             create=False)
    except ConfigError as exc:
        _errors.print(f"[red]error:[/red] {exc}: run where `edgesync up` runs, or pass "
                      "--state-dir or --auth-dir")
        raise typer.Exit(2) from exc


def _reload(pid: int | None) -> bool:
    """SIGHUP nats-server ``pid`` (checked to be one); False when there is none to reload."""
    if pid is None:
        return False
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        comm = ""
    if comm != "nats-server":
        console.print(f"[yellow]pid {pid} is not a running nats-server; not reloaded[/yellow]")
        return False
    os.kill(pid, signal.SIGHUP)  # by pid: the server re-reads its configuration
    return True


def _admin_settings(store: IdentityStore, runtime: dict[str, Any]) -> NatsSettings:
    admin_creds = store.credentials_file("admin")
    if runtime:
        return NatsSettings(url=runtime["nats_url"], ca_file=runtime.get("nats_ca_file"),
                            credentials_file=admin_creds, prefix=store.topology.prefix)
    settings = load_settings().nats
    if settings.credentials_file is None:
        settings = settings.model_copy(update={"credentials_file": admin_creds})
    return settings


def admin_settings_for(state_dir: Path) -> NatsSettings:
    """The admin identity's NATS settings: a running `edgesync up`'s in ``state_dir``
    (URL, CA, admin credentials), else the environment's."""
    runtime = _runtime(state_dir)
    if runtime:
        return _admin_settings(_existing_store(state_dir, None), runtime)
    return load_settings().nats


def _reload_or_explain(store: IdentityStore, pid: int | None) -> bool:
    """Reload nats-server ``pid``, or say how to; whether it was reloaded."""
    if _reload(pid):
        console.print(f"nats-server (pid {pid}) reloaded")
        return True
    console.print(f"Reload nats-server to apply {store.auth_conf} "
                  "(`nats-server --signal reload=<pid>`, or SIGHUP).")
    return False


_RELOAD_SETTLE_S = 5.0
"""How long a connection refused as unauthorized is retried right after a reload."""


async def _create_control_consumer(admin: NatsSettings, topology: Topology, edge: str, *,
                                   just_reloaded: bool) -> None:
    """The edge's control consumer, made as the admin. Right after our SIGHUP, nats-server
    may still be applying its new authorization and refuse the admin's connection
    ('Authorization Violation', seen in about one run in five): that is retried, with
    backoff, for up to :data:`_RELOAD_SETTLE_S`; any other error is raised at once."""
    import nats.errors

    from broker.runtime.secured_nats import create_control_consumer

    loop = asyncio.get_running_loop()
    deadline = loop.time() + (_RELOAD_SETTLE_S if just_reloaded else 0.0)
    delay = 0.05
    while True:
        try:
            await create_control_consumer(admin, topology, edge)
            return
        except nats.errors.Error as exc:
            if "Authorization Violation" not in str(exc) or loop.time() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(2 * delay, 0.5)


@edges_app.command("add")
def add(
    edge: Annotated[str, typer.Argument(help="The edge id ([A-Za-z0-9_-]{1,64}).")],
    *,
    state_dir: StateDir = Path(".edgesync"),
    auth_dir: AuthDir = None,
    public_key: Annotated[str | None, typer.Option(
        help="Register this public nkey (U...) made on the edge instead of minting a seed.")]
    = None,
    reload_pid: ReloadPid = None,
    control_consumer: Annotated[bool, typer.Option(
        help="Create the edge's control consumer now (needs NATS as the admin).")] = True,
) -> None:
    """Give EDGE its own NATS identity, confined to its own subjects."""
    runtime = _runtime(state_dir)
    try:
        store = _store(state_dir, auth_dir)
        store.add_edge(edge, public_key=public_key)
    except (EdgesyncError, ValueError) as exc:
        _errors.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if public_key is None:
        console.print(f"edge {edge}: credentials in {store.edge_credentials(edge)} (0600); "
                      "give the edge this file as EDGESYNC_NATS__CREDENTIALS_FILE")
    else:
        console.print(f"edge {edge}: public key {public_key} registered")
    reloaded = _reload_or_explain(store, reload_pid or runtime.get("nats_pid"))
    if not control_consumer:
        return
    try:
        asyncio.run(_create_control_consumer(_admin_settings(store, runtime), store.topology,
                                             edge, just_reloaded=reloaded))
    except Exception as exc:
        _errors.print(f"[red]control consumer not created:[/red] {type(exc).__name__}: "
                      f"{reason(exc)}; run `edgesync edges add` again once NATS is reachable")
        if (note := nats_not_located(state_dir)) is not None:
            console.print(note)
        raise typer.Exit(1) from exc
    console.print(f"control consumer {store.topology.control_durable(edge)} ready")


@edges_app.command("repair")
def repair(
    *,
    state_dir: StateDir = Path(".edgesync"),
    auth_dir: AuthDir = None,
) -> None:
    """Create the control consumer of every edge that JetStream lost (its store wiped or
    put back from an older copy); consumers that exist are left alone."""
    store = _existing_store(state_dir, auth_dir)
    edges = store.edges()
    if not edges:
        console.print("no edges provisioned; nothing to repair")
        return
    runtime = _runtime(state_dir)
    from broker.runtime.secured_nats import restore_control_consumers

    try:
        created = asyncio.run(restore_control_consumers(
            _admin_settings(store, runtime), store.topology, edges))
    except Exception as exc:
        _errors.print(f"[red]control consumers not repaired:[/red] {type(exc).__name__}: "
                      f"{reason(exc)}; run `edgesync edges repair` again once NATS is "
                      "reachable")
        if (note := nats_not_located(state_dir)) is not None:
            console.print(note)
        raise typer.Exit(1) from exc
    if created:
        console.print(f"created {len(created)} missing control consumer(s): "
                      + ", ".join(created[:20]) + (" ..." if len(created) > 20 else ""))
    console.print(f"{len(edges) - len(created)} of {len(edges)} edges' control consumers "
                  "were in place")


@edges_app.command("revoke")
def revoke(
    edge: Annotated[str, typer.Argument(help="The edge id.")],
    *,
    state_dir: StateDir = Path(".edgesync"),
    auth_dir: AuthDir = None,
    reload_pid: ReloadPid = None,
) -> None:
    """Remove EDGE's identity: after the reload NATS closes its connection and refuses it."""
    store = _existing_store(state_dir, auth_dir)
    try:
        removed = store.revoke_edge(edge)
    except (EdgesyncError, ValueError) as exc:
        _errors.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if not removed:
        console.print(f"[yellow]edge {edge} has no identity; nothing to revoke[/yellow]")
        raise typer.Exit(1)
    console.print(f"edge {edge}: identity removed")
    _reload_or_explain(store, reload_pid or _runtime(state_dir).get("nats_pid"))


@edges_app.command("list")
def list_(
    *,
    state_dir: StateDir = Path(".edgesync"),
    auth_dir: AuthDir = None,
) -> None:
    """List the NATS identities: services and edges, with their public keys (reads only)."""
    store = _existing_store(state_dir, auth_dir)
    table = Table(title=f"NATS identities ({store.directory})")
    for col in ("name", "role", "edge", "public key"):
        table.add_column(col)
    for identity in store.identities().values():
        table.add_row(identity.name, identity.role, identity.edge or "-", identity.public_key)
    console.print(table)
