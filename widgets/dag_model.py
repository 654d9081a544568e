"""The DAG as protocol events describe it: requests, variables, edges and states.

Pure Python and thread-agnostic (the widget holds a lock around it): ``apply`` takes any
event, in the order the server published it or from a ``History`` reply, and is
idempotent, so an event seen both in the history and live changes nothing the second
time. ``view`` turns it into the nodes and edges to draw, with task groups collapsed
when the picture is large.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from engine_server.protocol import (
    ActivationDone,
    AppStats,
    InputLink,
    Message,
    RequestCancelled,
    RequestDispatched,
    RequestFailed,
    RequestFinished,
    RequestFirstToken,
    RequestQueued,
    RequestSubmitted,
    VarFailed,
    VarReady,
)

#: Node states, in the order a request goes through them; the last three are final.
STATES = ("waiting", "queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")
#: From this many nodes on, each task group is drawn as one node (until it is expanded).
COLLAPSE_AT = 500


@dataclass
class RequestInfo:
    id: str
    app_id: str
    function: str
    inputs: dict[str, InputLink]
    outputs: dict[str, str]  # output name -> variable id
    state: str = "waiting"
    group: str = ""
    engine_id: int = -1
    queue_s: float | None = None
    exec_s: float | None = None
    error: str = ""


@dataclass
class VariableInfo:
    id: str
    name: str = ""
    producer: str = ""  # request id ("" when its producer is not in this picture)
    state: str = "waiting"  # used only without a producer in the picture
    value: str | None = None  # from VarReady: what a detail shows when the server is gone
    latency_s: float | None = None  # end to end, when it was requested (.get, await, display)


@dataclass
class Node:
    id: str  # "r:<request id>", "v:<variable id>" or "g:<task group>"
    kind: str  # request | variable | group
    label: str
    sub: str  # the second line: latency, or progress
    state: str


@dataclass
class View:
    nodes: list[Node] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)
    collapsed: int = 0  # task groups drawn as one node

    def shape(self) -> tuple:
        """What the layout depends on: node ids and kinds, and edges (not states or labels)."""
        return tuple((n.id, n.kind) for n in self.nodes), tuple(self.edges)


class DagModel:
    """Requests and variables of one application (``app_name``) or of all (None)."""

    def __init__(self, app_name: str | None = None) -> None:
        self.app_name = app_name
        self.requests: dict[str, RequestInfo] = {}
        self.variables: dict[str, VariableInfo] = {}
        self.app_names: dict[str, str] = {}  # app id -> name

    def apply(self, event: Message) -> bool:
        """Take one event into the picture; True if it changed what is drawn."""
        if isinstance(event, RequestSubmitted):
            return self._submitted(event)
        if isinstance(event, AppStats):
            self.app_names[event.app_id] = event.name
            return False
        if isinstance(event, (VarReady, VarFailed)):
            var = self.variables.get(event.var_id)
            if var is None:
                return False
            if isinstance(event, VarReady):
                var.value = event.value
            if var.producer:
                return False  # its producer's events say the same
            new = "done" if isinstance(event, VarReady) else "failed"
            changed, var.state = var.state != new, new
            return changed
        if isinstance(event, ActivationDone):
            var = self.variables.get(event.var_id)
            if var is None or var.latency_s == event.latency_s:
                return False
            var.latency_s = event.latency_s
            return True
        request = self.requests.get(getattr(event, "request_id", ""))
        if request is None:
            return False
        before = (request.state, request.group, request.exec_s)
        if request.state in FINAL:
            return False  # a final state is final; a late or repeated event changes nothing
        if isinstance(event, RequestQueued):
            request.state, request.group = "queued", event.group
        elif isinstance(event, (RequestDispatched, RequestFirstToken)):
            request.state, request.engine_id = "running", event.engine_id
            request.group = getattr(event, "group", request.group)
        elif isinstance(event, RequestFinished):
            request.state, request.queue_s, request.exec_s = "done", event.queue_s, event.exec_s
            request.engine_id = event.engine_id
        elif isinstance(event, RequestFailed):
            request.state, request.error = "failed", event.error
        elif isinstance(event, RequestCancelled):
            request.state, request.error = "cancelled", event.reason
        return (request.state, request.group, request.exec_s) != before

    def _submitted(self, event: RequestSubmitted) -> bool:
        self.app_names[event.app_id] = event.app_name
        if (self.app_name is not None and event.app_name != self.app_name) or event.request_id in self.requests:
            return False
        self.requests[event.request_id] = RequestInfo(
            event.request_id, event.app_id, event.function, dict(event.inputs), dict(event.outputs)
        )
        for name, var_id in event.outputs.items():
            var = self.variables.setdefault(var_id, VariableInfo(var_id))
            var.name, var.producer = name, event.request_id
        for link in event.inputs.values():
            var = self.variables.setdefault(link.var_id, VariableInfo(link.var_id))
            if link.producer in self.requests:
                var.producer = link.producer
        return True

    # ----------------------------------------------------------------- drawing

    def state_of(self, var: VariableInfo) -> str:
        producer = self.requests.get(var.producer)
        return producer.state if producer is not None else var.state

    def counts(self) -> Counter[str]:
        """Requests by state."""
        return Counter(r.state for r in self.requests.values())

    def view(self, expanded: frozenset[str] | set[str] = frozenset(), collapse_at: int = COLLAPSE_AT) -> View:
        """The nodes and edges to draw; at ``collapse_at`` nodes or more, each task group not in
        ``expanded`` becomes one node."""
        collapse = len(self.requests) + len(self.variables) >= collapse_at
        members: dict[str, list[RequestInfo]] = {}
        if collapse:
            for r in self.requests.values():
                if r.group and r.group not in expanded:
                    members.setdefault(r.group, []).append(r)
            members = {g: rs for g, rs in members.items() if len(rs) > 1}
        where: dict[str, str] = {}  # node id -> the group node that stands for it
        view = View(collapsed=len(members))
        for group, rs in members.items():
            gid = f"g:{group}"
            for r in rs:
                where[f"r:{r.id}"] = gid
                where.update((f"v:{v}", gid) for v in r.outputs.values())
            function = Counter(r.function for r in rs).most_common(1)[0][0]
            done = sum(r.state == "done" for r in rs)
            view.nodes.append(Node(gid, "group", f"{len(rs)} × {function}", f"{done}/{len(rs)} done", _group_state(rs)))
        for r in self.requests.values():
            if f"r:{r.id}" not in where:
                view.nodes.append(Node(f"r:{r.id}", "request", r.function, _request_sub(r), r.state))
        for v in self.variables.values():
            if f"v:{v.id}" not in where:
                sub = f".get {_seconds(v.latency_s)}" if v.latency_s is not None else ""
                view.nodes.append(Node(f"v:{v.id}", "variable", v.name or "(another app's)", sub, self.state_of(v)))
        edges: dict[tuple[str, str], None] = {}  # ordered, without repeats
        for r in self.requests.values():
            rid = f"r:{r.id}"
            for link in r.inputs.values():
                edges[(where.get(f"v:{link.var_id}", f"v:{link.var_id}"), where.get(rid, rid))] = None
            for var_id in r.outputs.values():
                edges[(where.get(rid, rid), where.get(f"v:{var_id}", f"v:{var_id}"))] = None
        view.edges = [e for e in edges if e[0] != e[1]]
        return view


def _request_sub(r: RequestInfo) -> str:
    if r.state == "done" and r.exec_s is not None:
        return _seconds(r.exec_s)
    return r.state


def _seconds(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def _group_state(rs: list[RequestInfo]) -> str:
    states = {r.state for r in rs}
    if len(states) == 1:
        return states.pop()
    for state in ("failed", "cancelled"):
        if state in states:
            return state
    if states & {"running", "done"}:
        return "running"
    return "queued" if "queued" in states else "waiting"
