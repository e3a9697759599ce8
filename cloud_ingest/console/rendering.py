"""Templates and the small formatting filters they use (Jinja2, autoescaped)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, select_autoescape

from broker import __version__
from cloud_ingest.console.charts import FATE_COLOURS, completeness_bar, history_chart

__all__ = ["SECURITY_HEADERS", "Renderer", "human_age", "human_bytes"]

SECURITY_HEADERS: Final = {
    # Scripts and styles only from /ui/static: an injected <script> or style= does nothing.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
"""Sent with every console page and fragment."""


def human_bytes(n: float | None) -> str:
    if n is None:
        return "\u2013"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} TiB"


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "\u2013"
    s = max(0.0, float(seconds))
    if s < 1:
        return "now"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} d"


def _num(n: Any) -> str:
    return "\u2013" if n is None else f"{n:,}"


def _utc(value: datetime | None) -> str:
    if value is None:
        return "\u2013"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Renderer:
    """Renders the console's templates into responses (with the security headers and a
    ``Server-Timing`` of the work behind them)."""

    def __init__(self, static_version: str = __version__) -> None:
        self.env = Environment(
            loader=PackageLoader("cloud_ingest.console", "templates"),
            autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True,
        )
        self.env.filters.update(bytes=human_bytes, age=human_age, num=_num, utc=_utc)
        self.env.globals.update(
            version=__version__, static_version=static_version, fate_colours=FATE_COLOURS,
            completeness_bar=completeness_bar, history_chart=history_chart)

    def text(self, template: str, context: Mapping[str, Any]) -> str:
        return self.env.get_template(template).render(**context)

    def page(self, template: str, context: Mapping[str, Any], *, status: int = 200,
             started: float | None = None, db_s: float | None = None,
             headers: Mapping[str, str] | None = None) -> HTMLResponse:
        render_started = time.perf_counter()
        body = self.text(template, context)
        timing = [f"render;dur={(time.perf_counter() - render_started) * 1000:.1f}"]
        if db_s is not None:
            timing.append(f"db;dur={db_s * 1000:.1f}")
        if started is not None:
            timing.append(f"total;dur={(time.perf_counter() - started) * 1000:.1f}")
        return HTMLResponse(body, status_code=status, headers={
            **SECURITY_HEADERS, "Server-Timing": ", ".join(timing), **(headers or {})})
