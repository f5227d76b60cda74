"""Dependency-free SVG scatter plots for the report (one point per cell, coloured by method)."""

from __future__ import annotations

import html

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
MARKERS = {"style": "circle", "object": "square", "shape": "diamond", "concept": "triangle"}


def _marker(kind: str, x: float, y: float, colour: str) -> str:
    shape = MARKERS.get(kind, "circle")
    if shape == "square":
        return f"<rect x='{x - 5:.1f}' y='{y - 5:.1f}' width='10' height='10' fill='{colour}'/>"
    if shape == "diamond":
        return f"<polygon points='{x:.1f},{y - 6:.1f} {x + 6:.1f},{y:.1f} {x:.1f},{y + 6:.1f} {x - 6:.1f},{y:.1f}' fill='{colour}'/>"
    if shape == "triangle":
        return f"<polygon points='{x:.1f},{y - 6:.1f} {x + 6:.1f},{y + 5:.1f} {x - 6:.1f},{y + 5:.1f}' fill='{colour}'/>"
    return f"<circle cx='{x:.1f}' cy='{y:.1f}' r='5' fill='{colour}'/>"


Bar = tuple[float, float] | None  # (low, high) of a 95% interval, or None


def scatter_svg(points: list[tuple[float, float, str, str]], x_label: str, y_label: str, title: str,
                width: int = 560, height: int = 380, errors: list[tuple[Bar, Bar]] | None = None) -> str:
    """points: (x, y, series label, kind); errors: per point, the (x, y) intervals drawn as error bars.
    Returns an inline <svg> element."""
    left, right, top, bottom = 60, 170, 30, 50
    errors = errors or [(None, None)] * len(points)
    xs = [p[0] for p in points] + [v for bar, _ in errors if bar for v in bar]
    ys = [p[1] for p in points] + [v for _, bar in errors if bar for v in bar]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x0, x1 = (x0 - 0.05, x1 + 0.05) if x1 - x0 < 1e-9 else (x0 - 0.05 * (x1 - x0), x1 + 0.05 * (x1 - x0))
    y0, y1 = (y0 - 0.05, y1 + 0.05) if y1 - y0 < 1e-9 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (width - left - right)

    def sy(v: float) -> float:
        return height - bottom - (v - y0) / (y1 - y0) * (height - top - bottom)

    labels = sorted({p[2] for p in points})
    colours = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' font-size='11'>",
           f"<text x='{width / 2 - 60}' y='16' font-size='13'>{html.escape(title)}</text>",
           f"<line x1='{left}' y1='{height - bottom}' x2='{width - right}' y2='{height - bottom}' stroke='black'/>",
           f"<line x1='{left}' y1='{top}' x2='{left}' y2='{height - bottom}' stroke='black'/>"]
    for i in range(5):
        vx, vy = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        out.append(f"<text x='{sx(vx) - 12:.1f}' y='{height - bottom + 14}'>{vx:.2f}</text>")
        out.append(f"<text x='{left - 40}' y='{sy(vy) + 4:.1f}'>{vy:.2f}</text>")
    out.append(f"<text x='{(left + width - right) / 2 - 30}' y='{height - 12}'>{html.escape(x_label)}</text>")
    out.append(f"<text x='12' y='{top - 10}'>{html.escape(y_label)}</text>")
    for (x, y, label, kind), (x_bar, y_bar) in zip(points, errors, strict=True):
        colour = colours[label]
        if x_bar is not None:
            out.append(f"<line x1='{sx(x_bar[0]):.1f}' y1='{sy(y):.1f}' x2='{sx(x_bar[1]):.1f}' y2='{sy(y):.1f}' "
                       f"stroke='{colour}' stroke-opacity='0.6'/>")
        if y_bar is not None:
            out.append(f"<line x1='{sx(x):.1f}' y1='{sy(y_bar[0]):.1f}' x2='{sx(x):.1f}' y2='{sy(y_bar[1]):.1f}' "
                       f"stroke='{colour}' stroke-opacity='0.6'/>")
        out.append(_marker(kind, sx(x), sy(y), colour))
    for i, label in enumerate(labels):
        y = top + 14 * i
        out.append(f"<circle cx='{width - right + 14}' cy='{y + 6}' r='5' fill='{colours[label]}'/>")
        out.append(f"<text x='{width - right + 24}' y='{y + 10}'>{html.escape(label)}</text>")
    kinds = sorted({p[3] for p in points})
    legend_y = top + 14 * len(labels) + 10
    for j, kind in enumerate(kinds):
        out.append(_marker(kind, width - right + 14, legend_y + 14 * j + 6, "#555"))
        out.append(f"<text x='{width - right + 24}' y='{legend_y + 14 * j + 10}'>{html.escape(kind)} task</text>")
    out.append("</svg>")
    return "\n".join(out)
