"""What a scenario measured, the targets it is held to, and how both are shown.

A :class:`ScenarioResult` holds figures (rows of the table), target checks,
the CPU seconds each process used while it was measured (which is how the
results state what shared the machine's cores), and the raw numbers for the
JSON file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Final

from rich.table import Table

__all__ = [
    "TARGETS_TITLE",
    "Check",
    "Figure",
    "ScenarioResult",
    "format_value",
    "markdown",
    "rich_tables",
]

TARGETS_TITLE = "targets: speed and memory (bench/README.md)"
"""Title of the table that checks each figure against its target."""


@dataclass
class Figure:
    """One measured figure: a row of the results table."""

    label: str
    value: float | None
    unit: str
    note: str = ""


@dataclass
class Check:
    """One speed or memory target edgesync is held to (bench/README.md, "Targets") and
    whether this run met it (None: not measured)."""

    figure: str
    target: str
    measured: str
    met: bool | None
    note: str = ""


@dataclass
class ScenarioResult:
    key: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    cpu_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per measured phase: CPU seconds of each process on the machine's cores."""
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    def add(self, label: str, value: float | None, unit: str, note: str = "") -> None:
        self.figures.append(Figure(label, value, unit, note))

    def check(self, figure: str, target: str, measured: str, met: bool | None,
              note: str = "") -> None:
        self.checks.append(Check(figure, target, measured, met, note))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_FORMATS: Final[dict[str, str]] = {
    "rec/s": "{:,.0f} rec/s",
    "x": "{:.2f}x",
    "MiB": "{:.1f} MiB",
    "ms": "{:.1f} ms",
    "s": "{:.2f} s",
    "B": "{:,.1f} B",
    "%": "{:.1f} %",
    "µs": "{:.2f} µs",
    "% of a core": "{:.2f} % of a core",
}
"""How a figure of each unit is written; any other unit: six significant digits."""


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if (spec := _FORMATS.get(unit)) is not None:
        return spec.format(value)
    return f"{value:,.6g} {unit}".strip()


def _met(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "n/a"}[met]


def _cpu_line(phases: dict[str, dict[str, float]]) -> str:
    parts = []
    for phase, groups in phases.items():
        used = ", ".join(f"{name} {secs:.1f}" for name, secs in groups.items() if name != "wall")
        parts.append(f"{phase} ({groups.get('wall', 0):.1f} s wall): {used}")
    return "; ".join(parts)


def rich_tables(results: list[ScenarioResult]) -> list[Table]:
    """The figures table and the targets table."""
    figures = Table(title="edgesync beside its baselines", show_lines=False)
    for col in ("scenario", "measurement", "value", "note"):
        figures.add_column(col, overflow="fold")
    for res in results:
        first = True
        if res.error:
            figures.add_row(res.title, "[red]failed[/red]", "", res.error[:200])
            continue
        for fig in res.figures:
            figures.add_row(res.title if first else "", fig.label,
                            format_value(fig.value, fig.unit), fig.note)
            first = False
        figures.add_section()
    targets = Table(title=TARGETS_TITLE)
    for col in ("figure", "target", "measured", "result"):
        targets.add_column(col, overflow="fold")
    for res in results:
        for chk in res.checks:
            style = {True: "green", False: "red", None: "yellow"}[chk.met]
            targets.add_row(chk.figure, chk.target, chk.measured,
                            f"[{style}]{_met(chk.met)}[/{style}]")
    return [figures, targets]


def markdown(results: list[ScenarioResult], meta: dict[str, Any]) -> str:
    """The results as Markdown, for ``bench/README.md``."""
    machine = meta.get("machine", {})
    lines = [
        f"Run `{meta.get('command', 'python -m bench')}` started {meta.get('started_at', '?')}, "
        f"took {meta.get('seconds', 0):.0f} s (profile `{meta.get('profile', '?')}`).",
        "",
        f"Machine: {machine.get('nproc', '?')} cores ({machine.get('cpu_model', '?')}), "
        f"{machine.get('ram_gib', '?')} GiB RAM, Linux {machine.get('kernel', '?')}, "
        f"Python {machine.get('python', '?')}, {machine.get('nats-server', 'nats-server ?')}, "
        f"{machine.get('postgres', 'postgres ?')}.",
        "",
        f"Code: {machine.get('code', '?')}. "
        f"Service settings beyond the defaults: {meta.get('service_env') or 'none'}. "
        f"PostgreSQL fsync: {'on' if meta.get('postgres_fsync') else 'off (embedded default)'}.",
        "",
        "| scenario | measurement | value | note |",
        "| --- | --- | --- | --- |",
    ]
    for res in results:
        if res.error:
            lines.append(f"| {res.title} | failed | | {_cell(res.error[:300])} |")
            continue
        for i, fig in enumerate(res.figures):
            lines.append(f"| {res.title if i == 0 else ''} | {_cell(fig.label)} | "
                         f"{format_value(fig.value, fig.unit)} | {_cell(fig.note)} |")
    lines += ["", "| figure | target | measured | result |", "| --- | --- | --- | --- |"]
    for res in results:
        for chk in res.checks:
            lines.append(f"| {_cell(chk.figure)} | {_cell(chk.target)} | {_cell(chk.measured)} "
                         f"| **{_met(chk.met)}** |")
    lines += ["", "Processes sharing the cores while each phase was measured "
              "(CPU seconds used in that phase):", ""]
    for res in results:
        if res.cpu_seconds:
            lines.append(f"- **{res.title}**: {_cell(_cpu_line(res.cpu_seconds))}")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
