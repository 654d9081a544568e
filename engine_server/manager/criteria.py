"""Objectives from the DAG: a requested variable activates everything upstream of it.

Following Parrot, nothing runs until some variable is requested; the request's
performance criterion then propagates in reverse topological order to every
producer it depends on. Latency dominates throughput: a request needed by
anything latency-critical is latency-critical.
"""

from __future__ import annotations

from engine_server.manager.graph import Graph, RequestNode
from engine_server.protocol import Perf


def activate(graph: Graph, var_id: str, perf: Perf) -> list[RequestNode]:
    """Mark ``var_id``'s producers as needed; return the requests newly activated or upgraded."""
    changed: list[RequestNode] = []
    stack = [var_id]
    seen: set[str] = set()
    while stack:
        node = graph.producer(stack.pop())
        if node is None or node.id in seen:
            continue
        seen.add(node.id)
        if node.perf is None or (perf == "latency" and node.perf == "throughput"):
            node.perf = perf
            changed.append(node)
        stack.extend(v.var_id for v in node.inputs.values() if v.var_id is not None)
    return changed
