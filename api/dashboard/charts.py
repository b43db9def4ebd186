"""Charts as inline SVG, rendered on the server: no JavaScript and nothing fetched from a CDN.

Every piece of text goes through ``markupsafe.escape``; numbers are formatted here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 16, 34
PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706")


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float]]
    """(x, y) pairs, x increasing."""


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(n + 2) if first + i * step <= hi + step * 0.001]


def _fmt(v: float) -> str:
    if abs(v) >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:.3g}"


def _frame(title: str, body: str, legend: Sequence[str]) -> Markup:
    keys = "".join(
        f'<g transform="translate({LEFT + 130 * i},{HEIGHT - 8})">'
        f'<rect width="10" height="10" y="-9" fill="{PALETTE[i % len(PALETTE)]}"/>'
        f'<text x="14" font-size="11">{escape(name)}</text></g>'
        for i, name in enumerate(legend)
    )
    # Safe: every piece of text inside was escaped above; the rest is numbers and literals.
    return Markup(  # noqa: S704
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>{body}{keys}</svg>"
    )


def _axes(
    y_lo: float, y_hi: float, y_of: Callable[[float], float], y_format: Callable[[float], str]
) -> str:
    parts = []
    for t in _ticks(y_lo, y_hi):
        y = y_of(t)
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">'
            f"{escape(y_format(t))}</text>"
        )
    return "".join(parts)


def line_chart(
    title: str,
    series: Sequence[Series],
    *,
    x_label: str = "",
    y_format: Callable[[float], str] = _fmt,
    y_range: tuple[float, float] | None = None,
    x_range: tuple[float, float] | None = None,
    x_names: tuple[str, str] | None = None,
) -> Markup:
    """Lines over a numeric x axis (training step, say). Empty series draw an empty frame.

    ``x_range`` fixes the axis (days without data stay empty); ``x_names`` labels its two ends.
    """
    points = [p for s in series for p in s.points if math.isfinite(p[1])]
    if not points:
        return _frame(
            title,
            f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" fill="#6b7280">'
            "no data yet</text>",
            [],
        )
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x_lo, x_hi = x_range if x_range else (min(xs), max(xs))
    y_lo, y_hi = y_range if y_range else (min(ys), max(ys))
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 1, y_hi + 1
    ticks = _ticks(y_lo, y_hi)
    y_lo, y_hi = min(y_lo, ticks[0]), max(y_hi, ticks[-1])

    def x_of(x: float) -> float:
        span = (x_hi - x_lo) or 1
        return LEFT + (x - x_lo) / span * (WIDTH - LEFT - RIGHT)

    def y_of(y: float) -> float:
        return TOP + (y_hi - y) / (y_hi - y_lo) * (HEIGHT - TOP - BOTTOM)

    body = [_axes(y_lo, y_hi, y_of, y_format)]
    for i, s in enumerate(series):
        pts = [(x_of(x), y_of(y)) for x, y in s.points if math.isfinite(y)]
        if not pts:
            continue
        color = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        body.append(
            f'<polyline class="series" data-series="{escape(s.name)}" fill="none" '
            f'stroke="{color}" stroke-width="2" points="{path}"/>'
        )
        if len(pts) == 1:
            body.append(f'<circle cx="{pts[0][0]:.1f}" cy="{pts[0][1]:.1f}" r="3" fill="{color}"/>')
    first, last = x_names or (_fmt(x_lo), f"{_fmt(x_hi)} {x_label}")
    body.append(
        f'<text x="{LEFT}" y="{HEIGHT - 20}" font-size="11">{escape(first)}</text>'
        f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 20}" font-size="11" text-anchor="end">'
        f"{escape(last)}</text>"
    )
    return _frame(title, "".join(body), [s.name for s in series])


def bar_chart(
    title: str,
    labels: Sequence[str],
    stacks: Sequence[Series],
    *,
    y_format: Callable[[float], str] = _fmt,
) -> Markup:
    """Stacked bars, one per label; ``stacks[i].points[j][1]`` is stack i's height at label j."""
    totals = [sum(s.points[j][1] for s in stacks) for j in range(len(labels))]
    y_hi = max([*totals, 1.0])
    ticks = _ticks(0, y_hi)
    y_hi = max(y_hi, ticks[-1])

    def y_of(y: float) -> float:
        return TOP + (y_hi - y) / y_hi * (HEIGHT - TOP - BOTTOM)

    body = [_axes(0, y_hi, y_of, y_format)]
    slot = (WIDTH - LEFT - RIGHT) / max(len(labels), 1)
    for j, label in enumerate(labels):
        base = 0.0
        x = LEFT + j * slot + slot * 0.15
        for i, s in enumerate(stacks):
            v = s.points[j][1]
            if v > 0:
                y_top, y_bottom = y_of(base + v), y_of(base)
                body.append(
                    f'<rect class="bar" x="{x:.1f}" y="{y_top:.1f}" width="{slot * 0.7:.1f}" '
                    f'height="{y_bottom - y_top:.1f}" fill="{PALETTE[i % len(PALETTE)]}">'
                    f"<title>{escape(label)}: {escape(s.name)} {escape(y_format(v))}</title></rect>"
                )
            base += v
        if len(labels) <= 16 or j % max(1, len(labels) // 8) == 0:
            body.append(
                f'<text x="{x + slot * 0.35:.1f}" y="{HEIGHT - 20}" font-size="10" '
                f'text-anchor="middle">{escape(label)}</text>'
            )
    return _frame(title, "".join(body), [s.name for s in stacks])
