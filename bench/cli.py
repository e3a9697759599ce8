"""``python -m bench`` / ``edgesync bench``: run the scenarios, show and keep the results."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from bench.data import Pool
from bench.env import BenchEnv, machine_info
from bench.pg_statements import PRELOAD, statement_tables
from bench.procs import start_self_profile, stop_profile
from bench.profiles import PROFILES, Profile
from bench.results import ScenarioResult, markdown, rich_tables
from bench.scenarios import SCENARIOS
from broker.logs import configure_logging
from broker.runtime.embedded_postgres import EmbeddedPostgres

__all__ = ["BENCH_DIR", "README", "RESULTS_END", "RESULTS_START", "build_parser", "main"]

BENCH_DIR: Final = Path(__file__).resolve().parent
README: Final = BENCH_DIR / "README.md"
RESULTS_START: Final = "<!-- results:start -->"
RESULTS_END: Final = "<!-- results:end -->"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of edgesync beside its ceiling and baselines, in one run, "
                    "against its own nats-server and PostgreSQL.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: finishes in under 2 minutes (profile 'quick')")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help="sizes to run: full (default), quick (= --quick), smoke (tests)")
    parser.add_argument("--only", action="append", metavar="SCENARIO",
                        choices=[s.key for s in SCENARIOS],
                        help="run only this scenario (repeatable): "
                             + ", ".join(s.key for s in SCENARIOS))
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results",
                        help="where <timestamp>.json goes (default: bench/results)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where servers and buffers keep data (default: a temporary "
                             "directory, removed at the end)")
    parser.add_argument("--update-readme", action="store_true",
                        help="put this run's tables into bench/README.md")
    parser.add_argument("--service-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an EDGESYNC_* setting for every bridge and ingest process "
                             "(repeatable), to measure a setting beside the baselines")
    parser.add_argument("--pg-fsync", action="store_true",
                        help="run PostgreSQL with fsync=on (production) instead of the embedded "
                             "default fsync=off; the results record which")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                        help="sample every service process and the driver with py-spy "
                             "(collapsed stacks, one file each) into DIR")
    parser.add_argument("--py-spy-gil", action="store_true",
                        help="with --py-spy: sample only the thread holding the GIL, i.e. "
                             "Python's CPU time without I/O waits such as the bridge's fsync "
                             "(which the default sampling counts as busy)")
    parser.add_argument("--pg-statements", action="store_true",
                        help="PostgreSQL preloads pg_stat_statements; the ingest drains "
                             "(scenarios ingest and fleet) report the statements that took "
                             "most of its time in their measured windows")
    parser.add_argument("--fleet-drain-only", action="store_true",
                        help="scenario 7 (fleet) runs only its bulk and fan-in drains, "
                             "not the live fleet: the quick loop for the ingest's fan-in rate")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    profile = PROFILES[args.profile or ("quick" if args.quick else "full")]
    if args.fleet_drain_only:
        profile = dataclasses.replace(profile, fleet_sizes=())
    for item in args.service_env:
        name, sep, _ = item.partition("=")
        if not sep or not name.startswith("EDGESYNC_"):
            build_parser().error(f"--service-env wants EDGESYNC_NAME=VALUE, got {item!r}")
    if args.py_spy_gil and args.py_spy is None:
        build_parser().error("--py-spy-gil needs --py-spy DIR")
    configure_logging("warning", "console")
    return asyncio.run(_run(args, profile, argv))


async def _run(args: argparse.Namespace, profile: Profile, argv: Sequence[str] | None) -> int:
    console = Console()
    started_at = datetime.now(UTC)
    started = time.monotonic()
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="edgesync-bench-")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    selected = [s for s in SCENARIOS if not args.only or s.key in args.only]
    results: list[ScenarioResult] = []
    meta: dict[str, Any] = {
        "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "profile": profile.name,
        "started_at": started_at.isoformat(timespec="seconds"),
        "sizes": _sizes(profile),
        "service_env": dict(item.split("=", 1) for item in args.service_env),
        "postgres_fsync": bool(args.pg_fsync),
        "pg_statements": bool(args.pg_statements),
    }
    try:
        async with EmbeddedPostgres(workdir / "pg", ephemeral=True, fsync=args.pg_fsync,
                                    start_timeout=60.0,  # a busy shared machine starts slowly
                                    synchronous_commit=True,
                                    settings=PRELOAD if args.pg_statements else None,
                                    # a database per scenario, dropped WITH (FORCE)
                                    may_create_databases=True,
                                    superuser=bool(args.pg_statements),
                                    ) as postgres:
            meta["machine"] = machine_info()
            meta["cores_shared_by"] = (
                f"all processes of a phase share the machine's {meta['machine']['nproc']} "
                "cores: the bench driver (SDK producers, baselines, polling), nats-server, "
                "PostgreSQL (postmaster and backends), and that phase's bridge and/or ingest "
                "processes; cpu_seconds says what each used while the phase was measured"
            )
            env = BenchEnv(workdir, postgres, profile_dir=args.py_spy,
                           profile_gil=args.py_spy_gil, service_env=meta["service_env"],
                           pg_statements=args.pg_statements)
            pool = Pool.generate()
            columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                       TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
            with Progress(*columns, console=console, transient=False) as progress:
                overall = progress.add_task("starting", total=len(selected))
                for scenario in selected:
                    step = _stepper(progress, overall, scenario.title)
                    step("starting")
                    spy = (start_self_profile(args.py_spy / f"driver-{scenario.key}.txt",
                                              gil=args.py_spy_gil)
                           if args.py_spy else None)
                    t0 = time.monotonic()
                    try:
                        result = await scenario.run(env, profile, pool, step)
                    except Exception as exc:
                        result = ScenarioResult(scenario.key, scenario.title,
                                                error=f"{type(exc).__name__}: {exc}")
                        progress.console.print(traceback.format_exc())
                    finally:
                        await stop_profile(spy)
                    result.seconds = round(time.monotonic() - t0, 1)
                    results.append(result)
                    mark = "[red]✗[/red]" if result.error else "[green]✓[/green]"
                    progress.console.print(f"{mark} {scenario.title} ({result.seconds:.0f} s)")
                    progress.advance(overall)
                progress.update(overall, description="done")
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    meta["seconds"] = round(time.monotonic() - started, 1)
    meta["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    for table in [*rich_tables(results), *statement_tables(results)]:
        console.print(table)
    path = _write_json(args.results_dir, started_at, meta, results)
    console.print(f"results: {path}")
    if args.update_readme:
        _update_readme(markdown(results, meta))
        console.print(f"updated {README}")
    return 1 if any(r.error for r in results) else 0


def _sizes(profile: Profile) -> dict[str, Any]:
    return {name: getattr(profile, name) for name in profile.__slots__}


def _stepper(progress: Progress, task: Any, title: str) -> Callable[[str], None]:
    def step(text: str) -> None:
        progress.update(task, description=f"{title}: {text}")

    return step


def _write_json(directory: Path, started_at: datetime, meta: dict[str, Any],
                results: list[ScenarioResult]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    document = {
        **meta,
        "scenarios": {r.key: r.to_json() for r in results},
        "targets": [
            {"scenario": r.key, **vars(c)} for r in results for c in r.checks
        ],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def _update_readme(table: str) -> None:
    text = README.read_text()
    head, sep, rest = text.partition(RESULTS_START)
    _, sep2, tail = rest.partition(RESULTS_END)
    if not sep or not sep2:
        raise SystemExit(f"{README} has no {RESULTS_START} ... {RESULTS_END} section")
    README.write_text(f"{head}{RESULTS_START}\n{table}{RESULTS_END}{tail}")

