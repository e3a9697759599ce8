"""Charts as inline SVG, drawn on the server: no chart library, no script, no style
attribute (the console's Content-Security-Policy allows neither inline script nor
inline style). Each chart is an ``role="img"`` with a label that says in words
what it shows, so a screen reader gets the numbers too.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from typing import Final

from markupsafe import Markup

__all__ = ["FATE_COLOURS", "completeness_bar", "history_chart"]

FATE_COLOURS: Final = {
    "committed": "#1b7f3b",
    "dropped": "#a15c00",
    "dead_lettered": "#7b2d9e",
    "lost": "#4a5a6a",
    "missing": "#c4141c",
}
"""One colour per seq fate (each at least 4.5:1 against white; the legend names them)."""

_LABELS: Final = {"committed": "committed", "dropped": "dropped", "dead_lettered":
                  "dead-lettered", "lost": "lost after commit", "missing": "missing"}


def completeness_bar(ranges: dict[str, list[tuple[int, int]]], highest: int, *,
                     width: int = 480, height: int = 18) -> Markup:
    """One stream's seq space 1..highest as a bar: each seq's fate in its colour.

    Args:
        ranges: per fate (``committed``, ``dropped``, ...), half-open seq ranges.
        highest: the highest seq accounted for (the bar's right end).
    """
    counts = {k: sum(hi - lo for lo, hi in v) for k, v in ranges.items()}
    label = f"seqs 1 to {highest:,}: " + ", ".join(
        f"{counts.get(k, 0):,} {_LABELS[k]}" for k in FATE_COLOURS)
    parts = [f'<svg class="bar" role="img" aria-label="{escape(label)}" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}">',
             f"<title>{escape(label)}</title>",
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#eef0f2"/>']
    if highest > 0:
        scale = width / highest
        # Committed first, the rarer fates over it, at least a pixel wide each: a gap of
        # one seq among millions must still be visible.
        for fate in ("committed", "dropped", "dead_lettered", "lost", "missing"):
            for lo, hi in ranges.get(fate, []):
                x = (lo - 1) * scale
                w = max((hi - lo) * scale, 0.0 if fate == "committed" else 1.5)
                parts.append(f'<rect x="{x:.2f}" y="0" width="{w:.2f}" height="{height}" '
                             f'fill="{FATE_COLOURS[fate]}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))


def history_chart(series: Sequence[tuple[float, int, int]], *, width: int = 480,
                  height: int = 140) -> Markup:
    """Watermark and highest committed seq over time (a gap between the two lines is
    what is missing at that moment).

    Args:
        series: (time as epoch seconds, watermark, highest seq), in time order.
    """
    if not series:
        return Markup('<p class="muted">No commits in the last 15 minutes.</p>')
    left, bottom, top, right = 64, 22, 8, 8
    t0, t1 = series[0][0], series[-1][0]
    v1 = max(*(s[2] for s in series), 1)
    span_t = max(t1 - t0, 1.0)
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(t: float, v: int) -> str:
        return f"{left + (t - t0) / span_t * plot_w:.1f},{top + plot_h - v / v1 * plot_h:.1f}"

    wm = " ".join(xy(t, w) for t, w, _ in series)
    hi = " ".join(xy(t, h) for t, _, h in series)
    _, last_wm, last_hi = series[-1]
    start = datetime.fromtimestamp(t0, UTC).strftime("%H:%M:%S")
    end = datetime.fromtimestamp(t1, UTC).strftime("%H:%M:%S")
    label = (f"From {start} to {end} UTC the watermark rose to {last_wm:,}; highest "
             f"committed seq {last_hi:,}; {last_hi - last_wm:,} not yet accounted for")
    return Markup(
        f'<svg class="chart" role="img" aria-label="{escape(label)}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}"><title>{escape(label)}</title>'
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" '
        f'stroke="#5f6b76"/><line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" '
        f'stroke="#5f6b76"/>'
        f'<text x="{left - 6}" y="{top + 10}" text-anchor="end" font-size="11" '
        f'fill="#1f2933">{v1:,}</text>'
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end" font-size="11" '
        f'fill="#1f2933">0</text>'
        f'<text x="{left}" y="{height - 6}" font-size="11" fill="#1f2933">{start}</text>'
        f'<text x="{width - right}" y="{height - 6}" text-anchor="end" font-size="11" '
        f'fill="#1f2933">{end} UTC</text>'
        f'<polyline points="{hi}" fill="none" stroke="{FATE_COLOURS["missing"]}" '
        f'stroke-width="1.5" stroke-dasharray="4 3"/>'
        f'<polyline points="{wm}" fill="none" stroke="{FATE_COLOURS["committed"]}" '
        f'stroke-width="2"/></svg>'
    )
