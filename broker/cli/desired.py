"""``edgesync desired ...``, ``edgesync rollout ...`` and ``edgesync edges label``: desired
state for the fleet, through the operator API (where it is and the token: as for
``edgesync cmd``, see :mod:`broker.cli.commands`).

| exit | meaning                                                         |
| ---- | --------------------------------------------------------------- |
| 0    | done (``rollout start --wait``: completed)                      |
| 1    | ``rollout start --wait``: halted or aborted; ``diff``: drift    |
| 2    | refused by the API (4xx), API unreachable, bad usage            |
| 3    | ``--wait``: not finished when ``--timeout`` ran out             |
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from broker.cli.commands import (
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_TIMEOUT,
    AsJson,
    Timeout,
    _client,
    _options,
    console,
    err_console,
)

__all__ = [
    "desired_app",
    "diff",
    "get",
    "label_edge",
    "rollout_app",
    "rollout_status",
    "set_",
    "start",
]

desired_app = typer.Typer(no_args_is_help=True,
                          help="Declare what edges run (one edge, or a labelled group).")
rollout_app = typer.Typer(no_args_is_help=True,
                          help="Roll a desired version out in health-gated waves.")
desired_app.callback()(_options)
rollout_app.callback()(_options)

_Group = Annotated[bool, typer.Option("--group", help="TARGET is a group, not an edge.")]


def _labels(items: list[str], *, removable: bool = False) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if sep and key:
            out[key] = value
        elif removable and item.endswith("-") and len(item) > 1:
            out[item[:-1]] = None
        else:
            err_console.print(f"[red]expected KEY=VALUE{' or KEY-' if removable else ''}, "
                              f"got {item!r}[/red]")
            raise typer.Exit(EXIT_ERROR)
    return out


def label_edge(
    ctx: typer.Context,
    edge: Annotated[str, typer.Argument(help="The edge id.")],
    labels: Annotated[list[str], typer.Argument(help="KEY=VALUE sets, KEY- removes.")],
    *,
    api_url: Annotated[str | None, typer.Option(help="Operator API URL.")] = None,
    token: Annotated[str | None, typer.Option(help="Operator token.")] = None,
    state_dir: Annotated[Path, typer.Option(help="Where `edgesync up` wrote runtime.json.")]
    = Path(".edgesync"),
) -> None:
    """Label an edge (region=eu tier=store; KEY- removes one): groups select edges by label."""
    _options(ctx, api_url=api_url, token=token, state_dir=state_dir)
    found = _client(ctx).request("PUT", f"/v1/edges/{edge}/labels",
                                 {"labels": _labels(labels, removable=True)})
    console.print(f"{edge}: " + (" ".join(f"{k}={v}" for k, v in found["labels"].items())
                                 or "(no labels)"))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        err_console.print(f"[red]cannot read {path}: {exc}[/red]")
        raise typer.Exit(EXIT_ERROR) from exc


@desired_app.command("set")
def set_(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="An edge id, or a group name with --group.")],
    *,
    file: Annotated[Path, typer.Option("--file", "-f", help="The document (JSON).")],
    group: _Group = False,
    selector: Annotated[list[str] | None, typer.Option(
        "--selector", "-l", help="The group's labels, KEY=VALUE (repeat).")] = None,
    overrides: Annotated[Path | None, typer.Option(
        help="JSON {edge: merge patch} of per-edge overrides (groups).")] = None,
    note: Annotated[str, typer.Option(help="Why, for the record.")] = "",
) -> None:
    """Store a new desired version. An edge's is sent to it at once; a group's is sent
    by `edgesync rollout start`."""
    client = _client(ctx)
    body: dict[str, Any] = {"document": _read_json(file), "note": note}
    if group:
        if selector:
            body["selector"] = _labels(selector)
        if overrides is not None:
            body["overrides"] = _read_json(overrides)
        found = client.request("POST", f"/v1/desired/groups/{target}", body)
        console.print(f"group {target} version {found['version']} (id {found['id']}); roll "
                      f"it out with: edgesync rollout start {found['id']}")
    else:
        if selector or overrides is not None:
            err_console.print("[red]--selector and --overrides are for groups (--group)[/red]")
            raise typer.Exit(EXIT_ERROR)
        found = client.request("POST", f"/v1/desired/edges/{target}", body)
        console.print(f"edge {target} version {found['version']} (id {found['id']}) sent as "
                      f"revision {found['revision']}")


@desired_app.command()
def get(ctx: typer.Context, target: Annotated[str, typer.Argument()], *, group: _Group = False,
        version: Annotated[int | None, typer.Option(help="A group's version number.")] = None,
        as_json: AsJson = False) -> None:
    """Show the desired state: an edge's (sent, reported, drift) or a group's version."""
    client = _client(ctx)
    if group:
        query = "" if version is None else f"?version={version}"
        found = client.request("GET", f"/v1/desired/groups/{target}{query}")
    else:
        found = client.request("GET", f"/v1/desired/edges/{target}")
    if as_json:
        console.print_json(data=found)
        return
    if group:
        console.print(f"group {target} version {found['version']} (id {found['id']}), "
                      f"selector {found['selector']}, {len(found['edges'])} edge(s)")
        console.print_json(data={"document": found["document"],
                                 "overrides": found["overrides"]})
        return
    sent = found["sent"] or {}
    console.print(f"edge {target}: version id {found['version_id']}, revision "
                  f"{found['revision']}, reported {found['reported_status']} (revision "
                  f"{found['reported_revision']}), in sync: {found['in_sync']}")
    console.print_json(data=sent.get("document") or {})
    _print_drift(found["drift"])


def _print_drift(drift: list[dict[str, Any]]) -> None:
    if not drift:
        return
    table = Table("field", "desired", "observed", "since", "last command")
    for d in drift:
        table.add_row(d["path"], json.dumps(d["desired"]), json.dumps(d["observed"]),
                      str(d["since"]), d.get("command_kind") or "")
    console.print(table)


@desired_app.command()
def diff(ctx: typer.Context, target: Annotated[str, typer.Argument()], *,
         group: _Group = False,
         as_json: AsJson = False) -> None:
    """Per-field drift of an edge, or of each edge of a group (exit 1 if any)."""
    found = _client(ctx).request("GET", f"/v1/desired/{'groups' if group else 'edges'}/"
                                 f"{target}/diff")
    if as_json:
        console.print_json(data=found)
    else:
        for edge in found["edges"]:
            console.print(f"{edge['edge']}: {edge['reported_status'] or 'no report'}"
                          f"{'' if edge['in_sync'] else ' (not in sync)'}")
            _print_drift(edge["drift"])
    if any(e["drift"] or not e["in_sync"] for e in found["edges"]):
        raise typer.Exit(EXIT_FAILED)


@rollout_app.command()
def start(
    ctx: typer.Context,
    version_id: Annotated[int, typer.Argument(help="The desired version's id.")],
    *,
    selector: Annotated[list[str] | None, typer.Option(
        "--group", "-l", help="Only edges with these labels, KEY=VALUE (repeat); default: "
        "the group's selector.")] = None,
    waves: Annotated[str, typer.Option(help="Cumulative wave targets.")] = "1,10%,50%,100%",
    max_failures: Annotated[str, typer.Option(help="Failed edges tolerated (n or n%).")] = "0",
    wave_deadline: Annotated[float, typer.Option(help="Seconds per wave.")] = 600.0,
    offline_deadline: Annotated[float, typer.Option(
        help="Seconds offline edges stay pending.")] = 7 * 86400.0,
    wait: Annotated[bool, typer.Option("--wait", help="Follow until it ends.")] = False,
    timeout: Timeout = 3600.0,
) -> None:
    """Start a rollout of a desired version."""
    client = _client(ctx)
    body: dict[str, Any] = {"version_id": version_id, "waves": waves.split(","),
                            "max_failures": max_failures, "wave_deadline_s": wave_deadline,
                            "offline_deadline_s": offline_deadline}
    if selector:
        body["selector"] = _labels(selector)
    found = client.request("POST", "/v1/rollouts", body)
    console.print(f"rollout {found['id']} started over {len(found['edges'])} edge(s)")
    if not wait:
        return
    deadline = time.monotonic() + timeout
    while True:
        found = client.request("GET", f"/v1/rollouts/{found['id']}")
        if found["state"] in ("completed", "halted", "aborted"):
            _print_rollout(found)
            raise typer.Exit(0 if found["state"] == "completed" else EXIT_FAILED)
        if time.monotonic() >= deadline:
            _print_rollout(found)
            raise typer.Exit(EXIT_TIMEOUT)
        time.sleep(1.0)


def _print_rollout(found: dict[str, Any]) -> None:
    console.print(f"rollout {found['id']}: {found['state']} (version id {found['version_id']}, "
                  f"wave {found['current_wave']}, failures tolerated {found['failure_budget']})"
                  + (f" - {found['reason']}" if found["reason"] else ""))
    table = Table("wave", "edges", "waiting", "pending", "healthy", "failed", "superseded",
                  "rolled back")
    for w in found["waves_progress"]:
        table.add_row(*(str(w[k]) for k in ("wave", "edges", "waiting", "pending", "healthy",
                                            "failed", "superseded", "rolled_back")))
    console.print(table)
    for e in found["edges"]:
        if e["status"] in ("failed", "rolling_back"):
            console.print(f"  {e['edge']}: {e['status']} {e['reason']}")


@rollout_app.command("status")
def rollout_status(ctx: typer.Context, rollout_id: Annotated[int, typer.Argument()], *,
                   as_json: AsJson = False) -> None:
    """A rollout's state and per-wave progress."""
    found = _client(ctx).request("GET", f"/v1/rollouts/{rollout_id}")
    if as_json:
        console.print_json(data=found)
    else:
        _print_rollout(found)


def _action(action: str) -> None:
    def run(ctx: typer.Context, rollout_id: Annotated[int, typer.Argument()]) -> None:
        found = _client(ctx).request("POST", f"/v1/rollouts/{rollout_id}/{action}")
        console.print(f"rollout {rollout_id}: {found['state']}")

    run.__doc__ = {"pause": "Pause: no further wave starts (edges already sent go on).",
                   "resume": "Resume a paused rollout.",
                   "abort": "Abort: roll the reached edges back to their previous version."
                   }[action]
    rollout_app.command(action)(run)


for _name in ("pause", "resume", "abort"):
    _action(_name)
