"""The latency and cache dashboard: ``%parrot stats``.

Per application: the end-to-end latency of each ``.get`` (``ActivationDone``), where a
request's time goes (queueing, time to first token, execution: ``RequestFinished``), the
prefix-cache hit rate (``AppStats``) and tokens per second. Per engine: load and KV-cache
use over time (``EngineLoad``). Plotly's ``FigureWidget`` draws the charts (its front end
ships inside the plotly package, so nothing is fetched when a notebook opens); a table
gives the numbers, and is also what viewers without widgets show.
"""

from __future__ import annotations

import datetime
import html
import threading
from typing import Any

import ipywidgets
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from parrot_nb.client import Client
from widgets.feed import EventFeed
from widgets.stats_model import AppRow, StatsModel
from widgets.throttle import Throttle

PHASES = ("queueing", "time to first token", "rest of execution")
COLUMNS = (
    ("application", "name"),
    ("requests", "requests"),
    ("done", "done"),
    ("failed", "failed"),
    ("cancelled", "cancelled"),
    (".get calls", "gets"),
    (".get median", "get_median_s"),
    (".get max", "get_max_s"),
    ("queueing (mean)", "queue_mean_s"),
    ("first token (mean)", "ttft_mean_s"),
    ("execution (mean)", "exec_mean_s"),
    ("prefix-cache hits", "cache_hit_rate"),
    ("tokens/s", "tokens_per_s"),
)


class StatsDashboard(ipywidgets.VBox):
    """Live charts and a table of every application's latency and cache use, and of the engines' load."""

    def __init__(self, client: Client, *, interval: float = 0.5) -> None:
        self.client = client
        self.redraws = 0
        self._lock = threading.Lock()
        self._model = StatsModel()
        self._table = ipywidgets.HTML()
        # One figure with four panels: a figure per chart in an HBox draws blank when JupyterLab
        # renders it off screen (a "Run All" past the visible cells), one full-width figure does not.
        self._charts = go.FigureWidget(make_subplots(rows=2, cols=2, vertical_spacing=0.16, subplot_titles=(
            "end-to-end latency of each .get (s)", "where a request's time goes (mean s)",
            "engine load (sequences)", "KV cache use (%)",
        )))  # fmt: skip
        self._charts.update_layout(
            height=600, barmode="stack", margin={"t": 40, "b": 30, "l": 50, "r": 10},
            legend={"orientation": "h", "y": -0.12},
        )  # fmt: skip
        self._charts.update_yaxes(range=[0, 100], row=2, col=2)
        for name in PHASES:
            self._charts.add_bar(name=name, x=[], y=[], row=1, col=2)
        super().__init__([ipywidgets.HTML("<b>parrot-nb: latency and prefix cache</b>"), self._table, self._charts])
        self.add_class("parrot-nb-dashboard")
        self._throttle = Throttle(self._flush, interval)
        self._feed = EventFeed(
            client, "", self._lock, replay=self._model.apply, apply=self._model.apply, changed=self._throttle.poke
        )
        self._flush()

    def rows(self) -> list[AppRow]:
        with self._lock:
            return self._model.rows()

    def _flush(self) -> None:
        with self._lock:
            rows = self._model.rows()
            gets = {a.name: sorted(a.gets.values(), key=lambda e: e.t) for a in self._model.apps.values()}
            finished = {a.name: list(a.finished.values()) for a in self._model.apps.values()}
            loads = {e: sorted(series.values(), key=lambda r: r.t) for e, series in self._model.loads.items()}
        self._table.value = table_html(rows)
        lines = [(f"{name} .get", [_time(e.t) for e in es], [e.latency_s for e in es], (1, 1)) for name, es in gets.items() if es]
        for engine, reports in loads.items():
            t = [_time(r.t) for r in reports]
            lines.append((f"engine {engine} running", t, [r.running for r in reports], (2, 1)))
            lines.append((f"engine {engine} waiting", t, [r.waiting for r in reports], (2, 1)))
            kv = [100 * r.kv_blocks_used / r.kv_blocks_total if r.kv_blocks_total else 0 for r in reports]
            lines.append((f"engine {engine} KV used", t, kv, (2, 2)))
        names = [name for name, fs in finished.items() if fs]
        phases = [
            [_avg([f.queue_s for f in finished[n]]) for n in names],
            [_avg([f.ttft_s for f in finished[n]]) for n in names],
            [_avg([max(0.0, f.exec_s - f.ttft_s) for f in finished[n]]) for n in names],
        ]
        traces = {trace.name: trace for trace in self._charts.data}
        for name, xs, ys, (row, col) in lines:
            if name not in traces:  # a new application or engine gets its line
                self._charts.add_scatter(name=name, x=xs, y=ys, mode="lines+markers", row=row, col=col)
        with self._charts.batch_update():  # one message for every change
            for name, xs, ys, _ in lines:
                if name in traces:
                    traces[name].x, traces[name].y = xs, ys
            for phase, ys in zip(PHASES, phases):
                traces[phase].x, traces[phase].y = names, ys
        self.redraws += 1

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """The live dashboard, plus the table as HTML and text, for viewers without widgets."""
        bundle = super()._repr_mimebundle_(**kwargs)
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
        rows = self.rows()
        return {**data, "text/html": table_html(rows), "text/plain": table_text(rows)}, metadata

    def close(self) -> None:
        self._feed.stop()
        self._throttle.cancel()
        for child in (self._table, self._charts):
            child.close()
        super().close()


def show_stats(client: Client | None = None) -> StatsDashboard:
    """The live dashboard of every application on this connection's server."""
    from parrot_nb import session

    return StatsDashboard(client or session.require_client())


# --------------------------------------------------------------------------- tables


def _cell(row: AppRow, attr: str) -> str:
    value = getattr(row, attr)
    if value is None:
        return "–"
    if attr == "cache_hit_rate":
        return f"{value:.0%}"
    if attr == "tokens_per_s":
        return f"{value:.1f}"
    if attr.endswith("_s"):
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    return str(value)


def table_html(rows: list[AppRow]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row, attr))}</td>" for _, attr in COLUMNS) + "</tr>" for row in rows
    )
    empty = f"<tr><td colspan='{len(COLUMNS)}'>no application has made a call yet</td></tr>"
    return f"<table class='parrot-nb-stats'><thead><tr>{head}</tr></thead><tbody>{body or empty}</tbody></table>"


def table_text(rows: list[AppRow]) -> str:
    table = [[title for title, _ in COLUMNS]] + [[_cell(row, attr) for _, attr in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    return "\n".join(lines if rows else [*lines, "(no application has made a call yet)"])


# --------------------------------------------------------------------------- charts


def _time(t: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t)


def _avg(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
