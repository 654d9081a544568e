"""Objectives from the DAG: a requested variable activates everything upstream of it.

Following Parrot, nothing runs until some variable is requested; the request's
performance criterion then propagates in reverse topological order to every
producer it depends on. Latency dominates throughput: a request needed by
anything latency-critical is latency-critical.

Task groups: when a request reads the outputs of several producers (the map
stage of a map-reduce feeding one reduce), what matters is when the last of
them finishes, not the first. Those producers form a task group named after
their consumer; the scheduler lowers that to a batch cap (members are batched
like throughput work, leaving the latency reserve alone) and group dispatch
(the members are placed together, on one engine where they fit), while their
priority class stays the criterion propagated from the consumer.
"""

from __future__ import annotations

from engine_server.manager.graph import TERMINAL, Graph, RequestNode
from engine_server.protocol import Perf


def activate(graph: Graph, var_id: str, perf: Perf) -> list[RequestNode]:
    """Mark ``var_id``'s producers as needed; return the requests newly activated, upgraded or grouped."""
    changed: dict[str, RequestNode] = {}
    stack = [var_id]
    seen: set[str] = set()
    while stack:
        node = graph.producer(stack.pop())
        if node is None or node.id in seen or node.state in TERMINAL:
            continue  # a finished producer needs nothing, and its inputs may have been freed
        seen.add(node.id)
        if node.perf is None or (perf == "latency" and node.perf == "throughput"):
            node.perf = perf
            changed[node.id] = node
        if node.state != "waiting":
            continue  # queued or running: its program is fixed, its inputs are read (and may be freed)
        for member in _task_group(graph, node):
            changed[member.id] = member
        stack.extend(v.var_id for v in node.inputs.values() if v.var_id is not None)
    return list(changed.values())


def _task_group(graph: Graph, consumer: RequestNode) -> list[RequestNode]:
    """Put the unfinished producers of ``consumer``'s inputs in its task group, when there are several.

    A producer stays in the first group it joined (it may feed several consumers).
    Returns the requests that joined.
    """
    producers: dict[str, RequestNode] = {}
    for var in graph.input_variables(consumer):
        producer = graph.producer(var.id)
        if producer is not None and producer.state not in ("done", "failed"):
            producers[producer.id] = producer
    if len(producers) < 2:
        return []
    joined = [p for p in producers.values() if p.group is None]
    for p in joined:
        p.group = consumer.id
    return joined
