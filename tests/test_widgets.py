"""The widgets' parts without a kernel: the DAG model from events, its layout with and without dot, its SVG."""

from __future__ import annotations

import re
import shutil

import pytest

from engine_server.protocol import (
    InputLink,
    RequestDispatched,
    RequestFinished,
    RequestQueued,
    RequestSubmitted,
)
from widgets.dag_model import DagModel
from widgets.layout import INSTALL_HINT, layout
from widgets.svg import COLORS, render_svg


def _map_reduce(n: int, group: str = "reduce") -> list:
    """The events of ``n`` map calls feeding one reduce call, all done."""
    events = []
    for i in range(n):
        events.append(RequestSubmitted("app", f"m{i}", "summarize", {}, {"summary": f"v{i}"}, t=1.0, app_name="mr"))
    inputs = {f"s{i}": InputLink(f"v{i}", f"m{i}") for i in range(n)}
    events.append(RequestSubmitted("app", "reduce", "combine", inputs, {"final": "out"}, t=1.0, app_name="mr"))
    for i in range(n):
        events += [
            RequestQueued("app", f"m{i}", "summarize", 2.0, "latency", group),
            RequestDispatched("app", f"m{i}", 0, 3.0, "latency", group),
            RequestFinished("app", f"m{i}", 0, 10, 3, 0.1, 0.5, 0.05, 4.0),
        ]
    events += [RequestQueued("app", "reduce", "combine", 5.0), RequestFinished("app", "reduce", 0, 30, 3, 0.0, 0.7, 0.1, 6.0)]
    return events


def _model(events: list, app: str | None = None) -> DagModel:
    model = DagModel(app)
    for event in events:
        model.apply(event)
    return model


def test_events_seen_twice_change_nothing_and_a_late_step_does_not_undo_a_final_state() -> None:
    events = _map_reduce(3)
    once = _model(events).view()
    twice = _model(events + events).view()  # the history, then the same events live
    assert once == twice and {n.state for n in once.nodes} == {"done"}
    model = _model(events)
    assert not model.apply(RequestQueued("app", "m0", "summarize", 9.0))
    assert model.requests["m0"].state == "done"


def test_a_dag_of_one_app_leaves_the_others_out() -> None:
    other = RequestSubmitted("app2", "x", "other", {}, {"o": "vx"}, t=1.0, app_name="elsewhere")
    model = _model([*_map_reduce(2), other], app="mr")
    assert set(model.requests) == {"m0", "m1", "reduce"}


def test_from_the_collapse_threshold_on_a_task_group_is_one_node_until_expanded() -> None:
    model = _model(_map_reduce(10))
    assert len(model.view(collapse_at=100).nodes) == 22  # 11 requests, 11 variables
    folded = model.view(collapse_at=22)
    assert [(n.kind, n.label, n.sub, n.state) for n in folded.nodes if n.kind == "group"] == [
        ("group", "10 × summarize", "10/10 done", "done")
    ]
    assert len(folded.nodes) == 3 and folded.edges == [("g:reduce", "r:reduce"), ("r:reduce", "v:out")]
    assert len(model.view({"reduce"}, collapse_at=22).nodes) == 22


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs graphviz's dot (make setup installs it)")
def test_dot_lays_out_every_node_with_each_edge_going_down() -> None:
    view = _model(_map_reduce(3)).view()
    lay = layout(view)
    assert lay.engine == "dot" and lay.note == "" and set(lay.boxes) == {n.id for n in view.nodes}
    for a, b, points in lay.edges:
        assert lay.boxes[a][1] < lay.boxes[b][1] and len(points) >= 2


def test_without_dot_the_layout_is_in_layers_and_says_how_to_install_graphviz(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` anywhere on it
    view = _model(_map_reduce(3)).view()
    lay = layout(view)
    assert lay.engine == "layers" and lay.note == INSTALL_HINT and "apt-get install graphviz" in lay.note
    assert set(lay.boxes) == {n.id for n in view.nodes}
    ys = {node_id: box[1] for node_id, box in lay.boxes.items()}
    assert ys["r:m0"] < ys["v:v0"] < ys["r:reduce"] < ys["v:out"]  # producer above product above consumer
    assert all(ys[a] < ys[b] for a, b, _ in lay.edges)


def test_the_svg_draws_each_node_in_its_states_colour_with_its_label() -> None:
    view = _model(_map_reduce(2)).view()
    lay = layout(view)
    graph = {
        "nodes": [{**n.__dict__, "x": lay.boxes[n.id][0], "y": lay.boxes[n.id][1], "w": lay.boxes[n.id][2],
                   "h": lay.boxes[n.id][3]} for n in view.nodes],
        "edges": [{"source": a, "target": b, "points": p} for a, b, p in lay.edges],
        "width": lay.width, "height": lay.height,
    }  # fmt: skip
    svg = render_svg(graph, "DAG of mr")
    assert svg.startswith("<svg") and "<title>DAG of mr</title>" in svg
    assert len(re.findall(rf"fill='{COLORS['done']}'", svg)) == 1 + 6  # the legend, 3 requests and 3 variables
    assert svg.count(">summarize</text>") == 2 and svg.count(">combine</text>") == 1
    assert svg.count("marker-end='url(#arrow)'") == len(view.edges)


def test_parrot_usage_names_the_widget_commands(ipython_shell, capsys) -> None:
    ipython_shell.run_line_magic("parrot", "help")
    usage = capsys.readouterr().out
    assert "%parrot dag [APP]" in usage and "%parrot stats" in usage


def test_parrot_dag_takes_at_most_one_application(ipython_shell) -> None:
    with pytest.raises(ValueError, match=r"usage: %parrot dag \[APP\]"):
        ipython_shell.run_line_magic("parrot", "dag one two")
