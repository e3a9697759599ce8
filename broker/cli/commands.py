"""``edgesync cmd ...`` and ``edgesync keys ...``: the operator's command line.

``cmd`` talks to the operator API over HTTP. Where the API is and the operator
token come from, first to last: ``--api-url`` / ``--token``, the settings
(``EDGESYNC_API__URL``, ``EDGESYNC_API__OPERATOR_TOKEN``), then the
``runtime.json`` that ``edgesync up`` writes in its state directory.

``--wait`` follows a command's lifecycle and exits with its outcome:

| exit | meaning                                              |
| ---- | ---------------------------------------------------- |
| 0    | applied (or, without ``--wait``, accepted)           |
| 1    | failed, rejected or expired                          |
| 2    | refused by the API (4xx), API unreachable, bad usage |
| 3    | still not final when ``--timeout`` ran out           |
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from broker.cli.locating import not_located, read_runtime, reason
from broker.cli.output import stderr_console, stdout_console
from broker.protocol.command_status import FINAL_STATUSES, CommandStatus

__all__ = [
    "AsJson",
    "Key",
    "Timeout",
    "Ttl",
    "Wait",
    "cmd_app",
    "configure",
    "console",
    "edges",
    "err_console",
    "generate",
    "keys_app",
    "list_",
    "patch_configmap",
    "restart",
    "scale",
    "send",
    "set_env",
    "set_image",
    "status",
]

console = stdout_console()
err_console = stderr_console()

cmd_app = typer.Typer(no_args_is_help=True, help="Send signed commands to edges and follow them.")
keys_app = typer.Typer(no_args_is_help=True, help="Manage the command signing keys.")

EXIT_FAILED, EXIT_ERROR, EXIT_TIMEOUT = 1, 2, 3


@dataclass(frozen=True)
class _Client:
    url: str
    token: str | None
    not_located: str | None = None
    """What to add to "cannot reach": the URL was only the default guess (see
    :func:`broker.cli.locating.not_located`)."""

    def request(self, method: str, path: str, body: Any = None, *,
                headers: dict[str, str] | None = None) -> Any:
        import httpx  # here, not at import: `edgesync --help` stays fast

        all_headers = dict(headers or {})
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        try:
            with httpx.Client(base_url=self.url, timeout=15) as client:
                response = client.request(method, path, json=body, headers=all_headers)
        except httpx.HTTPError as exc:
            err_console.print(f"[red]cannot reach the API at {self.url}:[/red] {reason(exc)}")
            if self.not_located is not None:
                err_console.print(self.not_located)
            raise typer.Exit(EXIT_ERROR) from exc
        if response.status_code >= 400:
            try:
                payload = response.json()
                message = payload.get("message") or payload.get("detail") or response.text
            except ValueError:
                message = response.text
            err_console.print(f"[red]HTTP {response.status_code}:[/red] {message}")
            raise typer.Exit(EXIT_ERROR)
        return response.json()


def _client(ctx: typer.Context) -> _Client:
    obj = ctx.find_root().obj if ctx.obj is None else ctx.obj
    assert isinstance(obj, _Client), "cmd callback did not run"
    return obj


@cmd_app.callback()
def _options(
    ctx: typer.Context,
    api_url: Annotated[str | None, typer.Option(help="Operator API URL.")] = None,
    token: Annotated[str | None, typer.Option(help="Operator token (for sending).")] = None,
    state_dir: Annotated[Path, typer.Option(help="Where `edgesync up` wrote runtime.json.")]
    = Path(".edgesync"),
) -> None:
    """Where the API is: options, then EDGESYNC_API__* settings, then runtime.json."""
    from broker.settings import load_settings

    settings = load_settings()
    runtime = read_runtime(state_dir)
    url = (api_url or settings.api.url or runtime.get("api_url")
           or f"http://{settings.api.host}:{settings.api.port}")
    configured = settings.api.operator_token
    ctx.obj = _Client(
        url=url.rstrip("/"),
        token=token or (configured.get_secret_value() if configured else None)
        or runtime.get("operator_token"),
        not_located=not_located(state_dir, given=bool(api_url or settings.api.url),
                                flags="--api-url or --state-dir", setting="EDGESYNC_API__URL"),
    )


# -- sending ------------------------------------------------------------------------------

Wait = Annotated[bool, typer.Option("--wait", help="Follow until final; exit with the outcome.")]
Timeout = Annotated[float, typer.Option(help="Seconds --wait waits for a final status.")]
Ttl = Annotated[float | None, typer.Option("--ttl", help="Seconds the command stays valid.")]
Key = Annotated[str | None, typer.Option(help="Idempotency key: a retry returns the same id.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _target(value: str) -> tuple[str, str]:
    namespace, sep, name = value.partition("/")
    if not sep or not namespace or not name:
        err_console.print(f"[red]expected NAMESPACE/NAME, got {value!r}[/red]")
        raise typer.Exit(EXIT_ERROR)
    return namespace, name


def _assignments(items: list[str], *, secrets: bool = False) -> dict[str, Any]:
    """``KEY=VALUE`` sets, ``KEY-`` removes (as ``kubectl set env``); with ``secrets``,
    ``KEY=@secret/key`` takes the value from that key of a Secret on the edge."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if secrets and value.startswith("@") and "/" in value:
            secret, _, secret_key = value[1:].partition("/")
            out[key] = {"valueFrom": {"secretKeyRef": {"name": secret, "key": secret_key}}}
        elif "=" in item:
            out[key] = value
        elif item.endswith("-") and len(item) > 1:
            out[item[:-1]] = None
        else:
            err_console.print(f"[red]expected KEY=VALUE or KEY-, got {item!r}[/red]")
            raise typer.Exit(EXIT_ERROR)
    return out


def _send(ctx: typer.Context, edge: str, kind: str, spec: dict[str, Any], *, ttl: float | None,
          key: str | None, wait: bool, timeout: float, as_json: bool) -> None:
    client = _client(ctx)
    body: dict[str, Any] = {"kind": kind, "spec": spec}
    if ttl is not None:
        body["ttl_seconds"] = ttl
    headers = {"Idempotency-Key": key} if key else None
    accepted = client.request("POST", f"/v1/edges/{edge}/commands", body, headers=headers)
    if not wait:
        if as_json:
            console.print_json(data=accepted)
        else:
            console.print(f"command {accepted['id']} {accepted['status']} ({kind} on {edge})")
        return
    if not as_json:
        console.print(f"command {accepted['id']} accepted ({kind} on {edge})")
    _follow(client, accepted["id"], timeout=timeout, as_json=as_json)


def _follow(client: _Client, command_id: str, *, timeout: float, as_json: bool) -> None:
    deadline = time.monotonic() + timeout
    seen = ""
    delay = 0.1
    while True:
        command = client.request("GET", f"/v1/commands/{command_id}")
        status = command["status"]
        if status != seen and not as_json:
            console.print(f"  {status}" + _outcome(command))
            seen = status
        if status in FINAL_STATUSES:
            if as_json:
                console.print_json(data=command)
            raise typer.Exit(0 if status == CommandStatus.APPLIED else EXIT_FAILED)
        if time.monotonic() >= deadline:
            # Accepted is not sent: say which side of NATS it waits on.
            where = ("not yet published: the API could not reach NATS and keeps trying"
                     if command.get("published_at") is None else
                     "published; the edge has not reported (offline, or busy)")
            err_console.print(f"[yellow]still {status} after {timeout:g}s: {where}[/yellow]")
            raise typer.Exit(EXIT_TIMEOUT)
        time.sleep(delay)
        delay = min(1.0, delay * 1.5)


def _outcome(command: dict[str, Any]) -> str:
    if command.get("result"):
        return f": {json.dumps(command['result'], sort_keys=True)}"
    if command.get("reason"):
        return f": {command['reason']}"
    return ""


@cmd_app.command()
def scale(ctx: typer.Context, edge: str, target: Annotated[str, typer.Argument(
              help="NAMESPACE/NAME of the Deployment.")], replicas: int, *,
          wait: Wait = False, timeout: Timeout = 60, ttl: Ttl = None, idempotency_key: Key = None,
          as_json: AsJson = False) -> None:
    """Scale a Deployment: `edgesync cmd scale EDGE NS/NAME REPLICAS`."""
    namespace, name = _target(target)
    _send(ctx, edge, "deployment.scale",
          {"namespace": namespace, "name": name, "replicas": replicas}, ttl=ttl,
          key=idempotency_key, wait=wait, timeout=timeout, as_json=as_json)


@cmd_app.command("set-env")
def set_env(ctx: typer.Context, edge: str, target: str,
            assignments: Annotated[list[str], typer.Argument(
                help="KEY=VALUE sets, KEY=@secret/key takes it from a Secret on the edge "
                "(the value never leaves the edge), KEY- removes.")],
            *, container: Annotated[str | None, typer.Option(
                help="Only this container (default: all).")] = None,
            wait: Wait = False, timeout: Timeout = 60, ttl: Ttl = None,
            idempotency_key: Key = None, as_json: AsJson = False) -> None:
    """Set or remove a Deployment's env vars; the others and the image are kept."""
    namespace, name = _target(target)
    spec: dict[str, Any] = {"namespace": namespace, "name": name,
                            "env": _assignments(assignments, secrets=True)}
    if container:
        spec["container"] = container
    _send(ctx, edge, "deployment.set_env", spec, ttl=ttl, key=idempotency_key, wait=wait,
          timeout=timeout, as_json=as_json)


@cmd_app.command("set-image")
def set_image(ctx: typer.Context, edge: str, target: str,
              container_image: Annotated[str, typer.Argument(help="CONTAINER=IMAGE")], *,
              wait: Wait = False, timeout: Timeout = 60, ttl: Ttl = None,
              idempotency_key: Key = None, as_json: AsJson = False) -> None:
    """Roll one container of a Deployment to a new image."""
    namespace, name = _target(target)
    container, sep, image = container_image.partition("=")
    if not sep:
        err_console.print(f"[red]expected CONTAINER=IMAGE, got {container_image!r}[/red]")
        raise typer.Exit(EXIT_ERROR)
    _send(ctx, edge, "deployment.set_image",
          {"namespace": namespace, "name": name, "container": container, "image": image},
          ttl=ttl, key=idempotency_key, wait=wait, timeout=timeout, as_json=as_json)


@cmd_app.command()
def restart(ctx: typer.Context, edge: str, target: str, *, wait: Wait = False,
            timeout: Timeout = 60, ttl: Ttl = None, idempotency_key: Key = None,
            as_json: AsJson = False) -> None:
    """Restart a Deployment's pods (as `kubectl rollout restart`)."""
    namespace, name = _target(target)
    _send(ctx, edge, "deployment.restart", {"namespace": namespace, "name": name}, ttl=ttl,
          key=idempotency_key, wait=wait, timeout=timeout, as_json=as_json)


@cmd_app.command("patch-configmap")
def patch_configmap(ctx: typer.Context, edge: str, target: str,
                    assignments: Annotated[list[str], typer.Argument(
                        help="KEY=VALUE sets, KEY- removes.")], *,
                    wait: Wait = False, timeout: Timeout = 60, ttl: Ttl = None,
                    idempotency_key: Key = None, as_json: AsJson = False) -> None:
    """Set or remove ConfigMap keys; the other keys are kept."""
    namespace, name = _target(target)
    _send(ctx, edge, "configmap.patch",
          {"namespace": namespace, "name": name, "data": _assignments(assignments)}, ttl=ttl,
          key=idempotency_key, wait=wait, timeout=timeout, as_json=as_json)


@cmd_app.command()
def configure(
    ctx: typer.Context, edge: str, *,
    batch_max_records: Annotated[int | None, typer.Option(help="Records per batch.")] = None,
    batch_max_bytes: Annotated[int | None, typer.Option(help="Bytes per batch.")] = None,
    linger_ms: Annotated[float | None, typer.Option(help="Batch linger, ms.")] = None,
    compression: Annotated[str | None, typer.Option(help="none or zstd.")] = None,
    zstd_level: Annotated[int | None, typer.Option(help="1..19.")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    heartbeat_interval_s: Annotated[float | None, typer.Option(help="Seconds.")] = None,
    stream: Annotated[list[str] | None, typer.Option(
        help="NAME:key=value[,key=value] policy change (overflow, priority, ttl_s); "
        "repeatable.")] = None,
    reset_stream: Annotated[list[str] | None, typer.Option(
        help="Drop NAME's own policy (back to the default); repeatable.")] = None,
    wait: Wait = False, timeout: Timeout = 60, ttl: Ttl = None, idempotency_key: Key = None,
    as_json: AsJson = False,
) -> None:
    """Tune a running bridge (live, persisted): batching, compression, policies, logs."""
    spec: dict[str, Any] = {k: v for k, v in {
        "batch_max_records": batch_max_records, "batch_max_bytes": batch_max_bytes,
        "linger_ms": linger_ms, "compression": compression, "zstd_level": zstd_level,
        "log_level": log_level, "heartbeat_interval_s": heartbeat_interval_s,
    }.items() if v is not None}
    streams: dict[str, Any] = {}
    for item in stream or []:
        name, sep, fields = item.partition(":")
        if not sep:
            err_console.print(f"[red]expected NAME:key=value, got {item!r}[/red]")
            raise typer.Exit(EXIT_ERROR)
        policy: dict[str, Any] = {}
        for pair in fields.split(","):
            key, _, value = pair.partition("=")
            policy[key.strip()] = _scalar(value.strip())
        streams[name] = policy
    for name in reset_stream or []:
        streams[name] = None
    if streams:
        spec["streams"] = streams
    _send(ctx, edge, "bridge.configure", spec, ttl=ttl, key=idempotency_key, wait=wait,
          timeout=timeout, as_json=as_json)


def _scalar(value: str) -> Any:
    if value.lower() in ("null", "none"):
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


@cmd_app.command()
def send(ctx: typer.Context, edge: str, kind: str,
         spec: Annotated[str, typer.Argument(help="The spec as JSON.")], *,
         wait: Wait = False, timeout: Timeout = 60, ttl: Ttl = None, idempotency_key: Key = None,
         as_json: AsJson = False) -> None:
    """Send any kind with a JSON spec, e.g. `send EDGE deployment.scale '{...}'`."""
    try:
        parsed = json.loads(spec)
    except ValueError as exc:
        err_console.print(f"[red]spec is not JSON: {exc}[/red]")
        raise typer.Exit(EXIT_ERROR) from exc
    _send(ctx, edge, kind, parsed, ttl=ttl, key=idempotency_key, wait=wait, timeout=timeout,
          as_json=as_json)


# -- reading --------------------------------------------------------------------------------


@cmd_app.command()
def status(ctx: typer.Context, command_id: str, *, wait: Wait = False, timeout: Timeout = 60,
           as_json: AsJson = False) -> None:
    """Show one command: status, reason or result, timestamps and every report."""
    client = _client(ctx)
    if wait:
        _follow(client, command_id, timeout=timeout, as_json=as_json)
    command = client.request("GET", f"/v1/commands/{command_id}")
    if as_json:
        console.print_json(data=command)
    else:
        table = Table(title=f"command {command['id']}", show_header=False)
        for field in ("edge", "kind", "status", "code", "reason", "issuer", "issued_at",
                      "expires_at", "delivered_at", "finished_at"):
            if command.get(field) is not None:
                table.add_row(field, str(command[field]))
        table.add_row("spec", json.dumps(command["spec"], sort_keys=True))
        if command.get("result") is not None:
            table.add_row("result", json.dumps(command["result"], sort_keys=True))
        console.print(table)
        history = command.get("history") or []
        if history:
            events = Table(title="reports")
            for col in ("reported_at", "status", "code", "reason", "effective"):
                events.add_column(col)
            for e in history:
                events.add_row(e["reported_at"], e["status"], e["code"], e["reason"],
                               "yes" if e["effective"] else "no")
            console.print(events)
    final = command["status"]
    if final in FINAL_STATUSES and final != CommandStatus.APPLIED:
        raise typer.Exit(EXIT_FAILED)


@cmd_app.command("list")
def list_(ctx: typer.Context, edge: str, *,
          status_filter: Annotated[str | None, typer.Option("--status",
                                                            help="Only this status.")] = None,
          limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
          as_json: AsJson = False) -> None:
    """List an edge's commands, newest first."""
    query = f"?limit={limit}" + (f"&status={status_filter}" if status_filter else "")
    commands = _client(ctx).request("GET", f"/v1/edges/{edge}/commands{query}")
    if as_json:
        console.print_json(data=commands)
        return
    table = Table(title=f"commands of {edge}")
    for col in ("id", "kind", "status", "issued_at", "reason / result"):
        table.add_column(col)
    for c in commands:
        table.add_row(c["id"], c["kind"], c["status"], c["issued_at"], _outcome(c).lstrip(": "))
    console.print(table)


@cmd_app.command()
def edges(ctx: typer.Context, *, as_json: AsJson = False) -> None:
    """List edges: online, last seen, backlog, version."""
    rows = _client(ctx).request("GET", "/v1/edges")
    if as_json:
        console.print_json(data=rows)
        return
    table = Table(title="edges")
    for col in ("edge", "online", "last seen", "backlog", "version"):
        table.add_column(col)
    for e in rows:
        table.add_row(e["edge"], "yes" if e["online"] else "no",
                      f"{e['seconds_since_seen']:.0f}s ago", f"{e['unshipped_records']:,}",
                      e["version"])
    console.print(table)


# -- keys -------------------------------------------------------------------------------------


@keys_app.command()
def generate(
    out_dir: Annotated[Path, typer.Option(help="Directory for the key files.")] = Path("."),
    name: Annotated[str, typer.Option(help="Files are NAME.key and NAME.pub.")] = "edgesync",
    force: Annotated[bool, typer.Option(help="Overwrite existing files.")] = False,
) -> None:
    """Write an Ed25519 key pair: NAME.key (private, for the API) and NAME.pub (for bridges)."""
    from broker.errors import ConfigError
    from broker.protocol.commands import generate_key_pair, key_id, load_private_key

    try:
        private, public = generate_key_pair(out_dir, name, force=force)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_ERROR) from exc
    kid = key_id(load_private_key(private).public_key())
    console.print(f"private key: {private} (give to the API: EDGESYNC_API__PRIVATE_KEY_FILE)")
    console.print(f"public key:  {public} (give to bridges: "
                  "EDGESYNC_BRIDGE__CONTROL__PUBLIC_KEY_FILE)")
    console.print(f"key id:      {kid}")
