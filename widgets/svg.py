"""The DAG picture as a standalone SVG: what an exported notebook, GitHub or a terminal-less viewer shows.

It draws the same ``graph`` dictionary the widget's front end draws (``DagWidget.graph``),
with the same colours (``COLORS``, which the front end receives inside that dictionary).
"""

from __future__ import annotations

from html import escape

#: Fill colour of each node state; a legend explains them.
COLORS = {
    "waiting": "#eeeeee",
    "queued": "#ffe9a8",
    "running": "#90caf9",
    "done": "#a5d6a7",
    "failed": "#ef9a9a",
    "cancelled": "#cfc4bf",
}
FONT = "font-family='sans-serif' font-size='11'"


def path_d(points: list[list[float]]) -> str:
    """An SVG path through an edge's points: a cubic B-spline from dot (1 + 3k points), else lines."""
    if len(points) >= 4 and (len(points) - 1) % 3 == 0:
        rest = " ".join(f"{x:.1f},{y:.1f}" for x, y in points[1:])
        return f"M{points[0][0]:.1f},{points[0][1]:.1f} C{rest}"
    return "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in points)


def render_svg(graph: dict, title: str = "") -> str:
    """``graph`` (nodes with x, y, w, h, label, sub, state, kind; edges with points) as SVG text."""
    legend_h = 22
    width = max(float(graph.get("width", 0)), 460.0) + 10
    height = float(graph.get("height", 0)) + legend_h + 10
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height:.0f}' "
        f"viewBox='0 0 {width:.0f} {height:.0f}'>",
        f"<title>{escape(title or 'parrot-nb DAG')}</title>",
        "<defs><marker id='arrow' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' markerHeight='7' "
        "orient='auto-start-reverse'><path d='M0,0 L10,5 L0,10 z' fill='#555'/></marker></defs>",
    ]
    x = 5.0
    for state, color in COLORS.items():
        out.append(f"<rect x='{x:.0f}' y='4' width='12' height='12' rx='2' fill='{color}' stroke='#666'/>")
        out.append(f"<text x='{x + 16:.0f}' y='14' {FONT}>{state}</text>")
        x += 22 + 7 * len(state)
    out.append(f"<g transform='translate(5,{legend_h + 5})'>")
    for edge in graph.get("edges", []):
        out.append(f"<path d='{path_d(edge['points'])}' fill='none' stroke='#555' marker-end='url(#arrow)'/>")
    for node in graph.get("nodes", []):
        x0, y0 = node["x"] - node["w"] / 2, node["y"] - node["h"] / 2
        fill = COLORS.get(node["state"], "#fff")
        dash = " stroke-dasharray='4 2'" if node["state"] == "cancelled" else ""
        if node["kind"] == "variable":
            out.append(
                f"<ellipse cx='{node['x']:.1f}' cy='{node['y']:.1f}' rx='{node['w'] / 2:.1f}' ry='{node['h'] / 2:.1f}' "
                f"fill='{fill}' stroke='#444'{dash}/>"
            )
        else:
            extra = " stroke-width='2.5'" if node["kind"] == "group" else ""
            out.append(
                f"<rect x='{x0:.1f}' y='{y0:.1f}' width='{node['w']:.1f}' height='{node['h']:.1f}' rx='5' "
                f"fill='{fill}' stroke='#444'{extra}{dash}/>"
            )
        lines = [node["label"], node["sub"]] if node["sub"] else [node["label"]]
        for i, line in enumerate(lines):
            dy = (i - (len(lines) - 1) / 2) * 13 + 4
            weight = " font-weight='bold'" if i == 0 and node["kind"] != "variable" else ""
            out.append(
                f"<text x='{node['x']:.1f}' y='{node['y'] + dy:.1f}' text-anchor='middle' {FONT}{weight}>"
                f"{escape(_short(line))}</text>"
            )
    out.append("</g></svg>")
    return "\n".join(out)


def _short(text: str, limit: int = 22) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
