"""The live DAG widget: ``%parrot dag [APP]`` and ``parrot_nb.show_dag(app=None)``.

Fed by protocol events alone: the ``History`` the server keeps (so a widget opened late,
or in another notebook, draws what happened before it), then every event the client's
I/O thread receives. A click asks the server for the request's detail
(``GetRequestDetail``); the output of a running request then streams in from its
``TokenDelta`` events. Redraws are throttled (``widgets.throttle``), and the layout is
recomputed only when the DAG's shape changes.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import anywidget
import traitlets

from engine_server.protocol import (
    ErrorReply,
    GetRequestDetail,
    Message,
    RequestDetail,
    RequestDispatched,
    TokenDelta,
)
from parrot_nb.client import Client
from widgets.feed import EventFeed
from widgets.dag_model import COLLAPSE_AT, FINAL, DagModel, View
from widgets.layout import Layout, layout
from widgets.svg import COLORS, render_svg
from widgets.throttle import Throttle

STATIC = Path(__file__).parent / "static"


class DagWidget(anywidget.AnyWidget):
    """Requests and variables of one application (or all), coloured by state, as they run."""

    _esm = STATIC / "dag.js"
    _css = STATIC / "dag.css"

    title = traitlets.Unicode("").tag(sync=True)
    graph = traitlets.Dict().tag(sync=True)  # nodes (with positions), edges (with paths), counts, colours
    selected = traitlets.Unicode("").tag(sync=True)  # the node whose detail is shown
    detail = traitlets.Dict().tag(sync=True)  # the selected request's RequestDetail, with its output so far
    note = traitlets.Unicode("").tag(sync=True)  # e.g. how to install graphviz

    def __init__(
        self, client: Client, app: str | None = None, *, interval: float = 0.25, collapse_at: int = COLLAPSE_AT
    ) -> None:
        super().__init__(title=f"DAG of application {app!r}" if app else "DAG of every application")
        self.client = client
        self.app = app
        self.collapse_at = collapse_at
        self.interval = interval  # seconds between redraws, at least
        self.redraws = 0  # graph assignments sent to the front end
        self.layouts = 0  # layouts computed (only when the shape changed)
        self._lock = threading.RLock()  # the model and the detail (I/O, timer and kernel threads)
        self._layout_lock = threading.Lock()  # the layout (timer thread, and a display on the kernel thread)
        self._model = DagModel(app)
        self._expanded: set[str] = set()
        self._shape: tuple | None = None
        self._layout = Layout()
        self._detail: dict[str, Any] = {}
        self._throttle = Throttle(self._flush, interval)
        self._feed = EventFeed(
            client, app or "", self._lock, replay=self._model.apply, apply=self._apply, changed=self._throttle.poke
        )
        self.on_msg(self._on_front_end_message)
        self._flush()  # the first view is complete before it is displayed

    # ----------------------------------------------------------------- events (I/O thread)

    @property
    def events(self) -> int:
        """Live events received."""
        return self._feed.received

    def _apply(self, event: Message) -> bool:
        changed = self._model.apply(event)
        request_id = self._detail.get("request_id")
        if not request_id:
            return changed
        request = self._model.requests.get(request_id)
        if isinstance(event, TokenDelta) and request is not None:
            name = next((n for n, v in request.outputs.items() if v == event.var_id), None)
            if name is not None and not self._detail.get("loading"):
                outputs = dict(self._detail.get("outputs", {}))
                outputs[name] = outputs.get(name, "") + event.text
                self._detail = {**self._detail, "outputs": outputs}
                return True
        elif isinstance(event, RequestDispatched) and event.request_id == request_id:
            self._detail = {**self._detail, "outputs": {}, "state": "running", "engine_id": event.engine_id}
            return True
        elif getattr(event, "request_id", None) == request_id and request is not None and request.state in FINAL:
            self._fetch_detail(request_id)  # the final timings and token counts
        return changed

    # ----------------------------------------------------------------- clicks (kernel thread)

    def _on_front_end_message(self, widget: Any, content: dict, buffers: list) -> None:
        if not isinstance(content, dict) or content.get("event") != "click":
            return
        self.select(str(content.get("node", "")))

    def select(self, node_id: str) -> None:
        """What a click on ``node_id`` does: a group expands (or folds back); a request or variable shows its detail."""
        with self._lock:
            if node_id.startswith("g:"):
                self._expanded ^= {node_id[2:]}
                self.selected = node_id
            else:
                kind, _, ident = node_id.partition(":")
                var = self._model.variables.get(ident) if kind == "v" else None
                request_id = var.producer if var is not None else ident
                if request_id not in self._model.requests:
                    return
                self.selected = node_id
                request = self._model.requests[request_id]
                self._detail = {"request_id": request_id, "function": request.function, "state": request.state, "loading": True}
                self._fetch_detail(request_id)
        self._throttle.poke()

    def _fetch_detail(self, request_id: str) -> None:
        fut = self.client.request(GetRequestDetail(request_id))
        fut.add_done_callback(lambda f: self._on_detail(request_id, f))

    def _on_detail(self, request_id: str, fut: Future[Message]) -> None:
        try:
            reply: Message | None = fut.result()
            problem = reply.message if isinstance(reply, ErrorReply) else ""
        except Exception as exc:  # the server is gone, or the connection closed
            reply, problem = None, str(exc)
        with self._lock:
            if self._detail.get("request_id") != request_id:
                return  # another node was clicked meanwhile
            if isinstance(reply, RequestDetail):
                self._detail = dataclasses.asdict(reply)
            else:
                self._detail = self._local_detail(request_id, problem)
        self._throttle.poke()

    def _local_detail(self, request_id: str, problem: str) -> dict[str, Any]:
        """What the events told this widget, when the server cannot say more."""
        request = self._model.requests[request_id]
        outputs = {n: self._model.variables[v].value or "" for n, v in request.outputs.items() if v in self._model.variables}
        return {
            "request_id": request_id, "function": request.function, "state": request.state, "outputs": outputs,
            "engine_id": request.engine_id, "queue_s": request.queue_s or 0.0, "exec_s": request.exec_s or 0.0,
            "error": "\n".join(x for x in (request.error, f"the server could not say more: {problem}") if x),
        }  # fmt: skip

    # ----------------------------------------------------------------- drawing

    def _flush(self) -> None:
        """Send the current picture (and detail) to the front end: one comm message."""
        graph, note = self._picture()
        with self._lock:
            detail = self._detail
        changed = graph != self.graph
        with self.hold_sync():
            self.graph = graph
            self.detail = detail
            self.note = note
        if changed:
            self.redraws += 1

    def _picture(self) -> tuple[dict[str, Any], str]:
        with self._lock:
            view = self._model.view(self._expanded, self.collapse_at)
            counts = dict(self._model.counts())
            requests = len(self._model.requests)
        with self._layout_lock:
            if view.shape() != self._shape:
                self._layout, self._shape = layout(view), view.shape()
                self.layouts += 1
            lay = self._layout
        return _graph(view, lay, counts, requests), lay.note

    def summary(self) -> str:
        """One line: requests by state."""
        with self._lock:
            counts = self._model.counts()
            total = len(self._model.requests)
        states = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        return f"{self.title}: {total} requests" + (f" ({states})" if states else "")

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """The live widget, plus an SVG of the DAG now and a line of text, for viewers without widgets."""
        bundle = super()._repr_mimebundle_(**kwargs)
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
        graph, note = self._picture()
        data = {**data, "image/svg+xml": render_svg(graph, self.title), "text/plain": self.summary()}
        return data, metadata

    def close(self) -> None:
        """Stop following events and close the widget."""
        self._feed.stop()
        self._throttle.cancel()
        super().close()


def _graph(view: View, lay: Layout, counts: dict[str, int], requests: int) -> dict[str, Any]:
    nodes = []
    for node in view.nodes:
        x, y, w, h = lay.boxes[node.id]
        nodes.append({**dataclasses.asdict(node), "x": round(x, 1), "y": round(y, 1), "w": round(w, 1), "h": round(h, 1)})
    edges = [
        {"source": a, "target": b, "points": [[round(x, 1), round(y, 1)] for x, y in points]} for a, b, points in lay.edges
    ]
    return {
        "nodes": nodes, "edges": edges, "width": round(lay.width, 1), "height": round(lay.height, 1),
        "layout": lay.engine, "counts": counts, "requests": requests, "collapsed": view.collapsed, "colors": COLORS,
    }  # fmt: skip


def show_dag(app: str | None = None, client: Client | None = None) -> DagWidget:
    """A live DAG widget of the application ``app`` (every application when None) on this connection."""
    from parrot_nb import session

    return DagWidget(client or session.require_client(), app)
