"""Templates and the small formatting filters they use (Jinja2, autoescaped).

Most of what the console shows comes from edges (edge ids and stream names are
tokens, but versions, record keys and payloads, reasons and reports are free text
of any length), so besides autoescaping every value printed is *finalized*:
Unicode's bidirectional embedding, override and isolate controls (U+202A-202E,
U+2066-2069) are shown as ``[U+202E]`` instead of reordering what the operator
reads (a ``failed`` reason made to read as ``applied``). And the templates
:func:`clip` free text to a length that fits its place, so one edge's 1 MB
version string does not make the fleet page 1 MB or push it sideways.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from broker import __version__
from cloud_ingest.console.charts import FATE_COLOURS, completeness_bar, history_chart

__all__ = ["BIDI_CONTROLS", "SECURITY_HEADERS", "Renderer", "clip", "human_age", "human_bytes",
           "visible_controls"]

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


BIDI_CONTROLS: Final = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
"""The characters that reorder the text after them (embeddings, overrides, isolates)."""

_SHOWN: Final = {ord(c): f"[U+{ord(c):04X}]" for c in BIDI_CONTROLS}


def visible_controls(value: Any) -> Any:
    """The Jinja ``finalize`` hook: a string with its bidi controls made visible (markup
    the console made itself, such as a chart, is left as it is)."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return value.translate(_SHOWN)
    return value


def clip(value: Any, limit: int = 200) -> str:
    """``value`` as text, at most ``limit`` characters (cut with an ellipsis)."""
    text = "" if value is None else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


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
            finalize=visible_controls,
        )
        self.env.filters.update(bytes=human_bytes, age=human_age, num=_num, utc=_utc, clip=clip)
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
