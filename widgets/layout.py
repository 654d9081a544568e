"""Where each node of a DAG picture goes: graphviz's ``dot`` when it is installed, else layers.

Both return a ``Layout`` in pixels, y downwards: node boxes (centre and size) and, per edge,
the points of its path (``dot``'s spline control points, or the two ends of a line).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from widgets.dag_model import View

DPI = 72  # dot's "plain" output is in inches
SIZES = {"request": (130, 40), "variable": (110, 30), "group": (150, 44)}  # width, height in pixels
INSTALL_HINT = (
    "graphviz's `dot` was not found, so the DAG is laid out in simple layers; install graphviz for a "
    "better drawing: `apt-get install graphviz` (Debian/Ubuntu), `brew install graphviz`, or "
    "`conda install graphviz`, then open the widget again"
)


@dataclass
class Layout:
    boxes: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)  # id -> x, y, w, h
    edges: list[tuple[str, str, list[tuple[float, float]]]] = field(default_factory=list)
    width: float = 0.0
    height: float = 0.0
    engine: str = "dot"  # dot | layers
    note: str = ""  # why it is not dot's


def layout(view: View) -> Layout:
    """Lay out ``view`` with ``dot``; without the binary, in layers (and say how to install it)."""
    import graphviz

    if not view.nodes:
        return Layout()
    try:
        return _dot(view, graphviz)
    except graphviz.ExecutableNotFound:
        return layers(view, note=INSTALL_HINT)


def _dot(view: View, graphviz) -> Layout:  # noqa: ANN001 (the module, imported lazily)
    names = {node.id: f"n{i}" for i, node in enumerate(view.nodes)}
    ids = {name: node_id for node_id, name in names.items()}
    g = graphviz.Digraph(
        graph_attr={"rankdir": "TB", "nodesep": "0.2", "ranksep": "0.35"},
        node_attr={"shape": "box", "fixedsize": "true", "label": ""},
    )
    for node in view.nodes:
        w, h = SIZES[node.kind]
        g.node(names[node.id], width=f"{w / DPI:.3f}", height=f"{h / DPI:.3f}")
    for a, b in view.edges:
        g.edge(names[a], names[b])
    out = Layout()
    height_in = 0.0
    for line in g.pipe(format="plain", engine="dot").decode().splitlines():
        parts = shlex.split(line)
        if not parts:
            continue
        if parts[0] == "graph":
            out.width, height_in = float(parts[2]) * DPI, float(parts[3])
            out.height = height_in * DPI
        elif parts[0] == "node":
            x, y, w, h = map(float, parts[2:6])
            out.boxes[ids[parts[1]]] = (x * DPI, (height_in - y) * DPI, w * DPI, h * DPI)
        elif parts[0] == "edge":
            n = int(parts[3])
            coords = list(map(float, parts[4 : 4 + 2 * n]))
            points = [(coords[i] * DPI, (height_in - coords[i + 1]) * DPI) for i in range(0, 2 * n, 2)]
            out.edges.append((ids[parts[1]], ids[parts[2]], points))
    return out


def layers(view: View, note: str = "") -> Layout:
    """A layered layout without graphviz: each node one layer below its lowest parent, ordered by its parents."""
    parents: dict[str, list[str]] = {node.id: [] for node in view.nodes}
    for a, b in view.edges:
        parents[b].append(a)
    depth: dict[str, int] = {}

    def depth_of(node_id: str) -> int:
        stack = [node_id]
        while stack:  # iterative: a long chain must not hit the recursion limit
            top = stack[-1]
            pending = [p for p in parents[top] if p not in depth]
            if pending:
                stack.extend(pending)
                continue
            depth[top] = 1 + max((depth[p] for p in parents[top]), default=-1)
            stack.pop()
        return depth[node_id]

    rows: dict[int, list[str]] = {}
    for node in view.nodes:
        rows.setdefault(depth_of(node.id), []).append(node.id)
    kinds = {node.id: node.kind for node in view.nodes}
    gap_x, gap_y, row_h = 20.0, 30.0, 44.0
    out = Layout(engine="layers", note=note)
    x_of: dict[str, float] = {}
    for level in sorted(rows):
        row = rows[level]
        if level:  # under the mean position of its parents, so edges cross less
            row.sort(key=lambda n: sum(x_of[p] for p in parents[n]) / max(1, len(parents[n])))
        x = gap_x
        y = gap_y + level * (row_h + gap_y) + row_h / 2
        for node_id in row:
            w, h = SIZES[kinds[node_id]]
            out.boxes[node_id] = (x + w / 2, y, w, h)
            x_of[node_id] = x + w / 2
            x += w + gap_x
        out.width = max(out.width, x)
    out.height = gap_y + len(rows) * (row_h + gap_y)
    for a, b in view.edges:
        (xa, ya, _, ha), (xb, yb, _, hb) = out.boxes[a], out.boxes[b]
        out.edges.append((a, b, [(xa, ya + ha / 2), (xb, yb - hb / 2)]))
    return out
