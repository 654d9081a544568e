"""The widgets in a real kernel, as a front end sees them: their models are rebuilt from comm messages.

A real engine server (the tiny model) on loopback, a real ``parrot-nb`` kernel that connects
to it, and this process reading the kernel's iopub channel like a browser's widget manager.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from kernel_frontend import KernelFrontend

from conftest import ServerProcess

pytestmark = pytest.mark.slow  # a kernel start, then real DAGs on a real server

DAG = "widgets.dag.DagWidget"

FUNCTIONS = '''
import parrot_nb, time
summarize = parrot_nb.SemanticFunction.from_template("summarize", "Summary of {{input:report}}:{{output:summary}}", max_tokens=3)
combine = parrot_nb.SemanticFunction.from_template(
    "combine", "1. {{input:s1}} 2. {{input:s2}} 3. {{input:s3}} All:{{output:final}}", max_tokens=3)
'''


@pytest.fixture(scope="module")
def kernel(shared_server: ServerProcess) -> Iterator[KernelFrontend]:
    frontend = KernelFrontend()
    try:
        frontend.run(f"import parrot_nb; parrot_nb.connect({str(shared_server.connection_file)!r})" + FUNCTIONS)
        yield frontend
    finally:
        frontend.close()


def _open_dag(kernel: KernelFrontend, app: str, name: str = "dag") -> str:
    """Display a DAG widget of ``app`` in a cell; return its comm id."""
    before = set(kernel.widgets(DAG))
    kernel.run(f"{name} = parrot_nb.show_dag({app!r}); display({name})")
    (comm_id,) = set(kernel.widgets(DAG)) - before
    return comm_id


def _nodes(kernel: KernelFrontend, comm_id: str) -> dict[str, dict]:
    return {node["id"]: node for node in kernel.models[comm_id]["graph"]["nodes"]}


def _edges(kernel: KernelFrontend, comm_id: str) -> set[tuple[str, str]]:
    return {(e["source"], e["target"]) for e in kernel.models[comm_id]["graph"]["edges"]}


def test_after_a_map_reduce_the_dag_model_holds_every_node_done_with_its_edges(kernel: KernelFrontend) -> None:
    comm_id = _open_dag(kernel, "mr-shape")
    kernel.run('''
with parrot_nb.app("mr-shape"):
    parts = [summarize(report=f"report {i}") for i in range(3)]
    final = combine(s1=parts[0], s2=parts[1], s3=parts[2])
final.get(timeout=60)
''')
    kernel.wait_until(lambda: {n["state"] for n in _nodes(kernel, comm_id).values()} == {"done"}, "every node done")
    parts, final = kernel.value("[p.id for p in parts]"), kernel.value("final.id")
    nodes, edges = _nodes(kernel, comm_id), _edges(kernel, comm_id)
    assert len(nodes) == 8  # 4 requests, 4 variables
    assert sorted(n["label"] for n in nodes.values() if n["kind"] == "request") == ["combine"] + ["summarize"] * 3
    (reduce_node,) = [i for i, n in nodes.items() if n["label"] == "combine"]
    for var_id in parts:
        (producer,) = [a for a, b in edges if b == f"v:{var_id}"]
        assert nodes[producer]["label"] == "summarize"
        assert (f"v:{var_id}", reduce_node) in edges  # the reduce reads each summary
    assert (reduce_node, f"v:{final}") in edges
    assert len(edges) == 3 + 3 + 1
    assert nodes[f"v:{final}"]["sub"].startswith(".get ")  # the end-to-end latency of the requested variable


def test_a_click_shows_the_requests_filled_prompt_and_output(kernel: KernelFrontend) -> None:
    kernel.run('''
with parrot_nb.app("click"):
    parts = [summarize(report=f"report {i}") for i in range(3)]
    final = combine(s1=parts[0], s2=parts[1], s3=parts[2])
final.get(timeout=60)
''')
    comm_id = _open_dag(kernel, "click", "dag2")  # opened after the run: drawn from the server's history
    final = kernel.value("final.id")
    value = kernel.value("final.get()")
    kernel.send_to_widget(comm_id, {"event": "click", "node": f"v:{final}"})
    kernel.wait_until(lambda: kernel.models[comm_id]["detail"].get("prompt"), "the detail to arrive")
    detail = kernel.models[comm_id]["detail"]
    assert kernel.models[comm_id]["selected"] == f"v:{final}"
    assert detail["function"] == "combine" and detail["state"] == "done"
    assert detail["outputs"] == {"final": value}
    summaries = kernel.value("[p.get() for p in parts]")
    assert detail["prompt"] == f"1. {summaries[0]} 2. {summaries[1]} 3. {summaries[2]} All:{{{{output:final}}}}"
    assert detail["output_tokens"] >= 1 and detail["prompt_tokens"] >= 1 and detail["engine_id"] == 0


def test_a_cancelled_request_shows_cancelled(kernel: KernelFrontend) -> None:
    comm_id = _open_dag(kernel, "cancel-me")
    kernel.run('''
slow = parrot_nb.SemanticFunction.from_template("slow", "Go: {{output:o}}", max_tokens=3000, ignore_eos=True)
with parrot_nb.app("cancel-me"):
    out = slow()
out.activate()
deadline = time.monotonic() + 30
while out.state != "running" and time.monotonic() < deadline:
    time.sleep(0.02)
out.cancel()
''')
    var_id = kernel.value("out.id")
    kernel.wait_until(lambda: _nodes(kernel, comm_id).get(f"v:{var_id}", {}).get("state") == "cancelled", "cancelled")
    (request,) = [n for n in _nodes(kernel, comm_id).values() if n["kind"] == "request"]
    assert request["label"] == "slow" and request["state"] == "cancelled"


def test_a_clicked_running_requests_output_streams_into_the_detail(kernel: KernelFrontend) -> None:
    comm_id = _open_dag(kernel, "stream")
    kernel.run('''
long = parrot_nb.SemanticFunction.from_template("long", "Go: {{output:o}}", max_tokens=3000, ignore_eos=True)
with parrot_nb.app("stream"):
    running = long()
running.activate()
deadline = time.monotonic() + 30
while running.state != "running" and time.monotonic() < deadline:
    time.sleep(0.02)
''')
    var_id = kernel.value("running.id")
    kernel.send_to_widget(comm_id, {"event": "click", "node": f"v:{var_id}"})
    shown = lambda: kernel.models[comm_id]["detail"].get("outputs", {}).get("o", "")  # noqa: E731
    kernel.wait_until(lambda: len(shown()) > 0, "the first output in the detail")
    first = shown()
    kernel.wait_until(lambda: len(shown()) > len(first) + 20, "more output to stream in")
    later, state = shown(), kernel.models[comm_id]["detail"]["state"]
    kernel.run("running.cancel()")
    assert state == "running"
    assert later.startswith(first)  # appended to, never rewritten


def test_updates_from_the_io_thread_carry_the_header_of_the_cell_that_made_the_widget(kernel: KernelFrontend) -> None:
    comm_id = _open_dag(kernel, "parent-check")
    kernel.run('with parrot_nb.app("parent-check"):\n    x = summarize(report="one")\nx.get(timeout=60)')
    kernel.wait_until(lambda: {n["state"] for n in _nodes(kernel, comm_id).values()} == {"done"}, "the call done")
    assert kernel.parents[comm_id] == {kernel.opened_by[comm_id]}


def test_throttling_bounds_the_comm_messages_of_a_500_node_dag(kernel: KernelFrontend) -> None:
    n = 250  # 250 map calls and one reduce: 251 requests and 251 variables, 502 nodes
    kernel.run(f'''
inputs = "".join("{{{{input:s%d}}}} " % i for i in range({n}))
reduce_all = parrot_nb.SemanticFunction.from_template("reduce_all", inputs + "All:{{{{output:final}}}}", max_tokens=2)
''')
    comm_id = _open_dag(kernel, "big")
    start = time.monotonic()
    kernel.run(f'''
with parrot_nb.app("big"):
    maps = [summarize(report=str(i)) for i in range({n})]
    total = reduce_all(**{{"s%d" % i: m for i, m in enumerate(maps)}})
total.get(timeout=240)
''', timeout=300)
    group_done = lambda: any(x["kind"] == "group" and x["state"] == "done" for x in _nodes(kernel, comm_id).values())  # noqa: E731
    kernel.wait_until(group_done, "the collapsed map stage to be drawn done", timeout=30)
    kernel.settle()
    elapsed = time.monotonic() - start
    updates = kernel.updates[comm_id]
    redraws = kernel.trait_updates[(comm_id, "graph")]
    interval = kernel.value("dag.interval")
    events, layouts = kernel.value("dag.events"), kernel.value("dag.layouts")
    print(f"\n500-node DAG: {2 * (n + 1)} nodes, {events} events in {elapsed:.1f} s -> {updates} comm messages "
          f"({redraws} redraws of the graph), {layouts} layouts")  # fmt: skip
    # At most one redraw per interval, plus the first and the last: thousands of events, a few messages.
    assert redraws <= elapsed / interval + 2
    assert updates <= elapsed / interval + 2
    nodes = _nodes(kernel, comm_id)
    (group,) = [x for x in nodes.values() if x["kind"] == "group"]
    assert group["label"] == f"{n} × summarize" and group["sub"] == f"{n}/{n} done"
    assert len(nodes) == 3  # the group, the reduce and its output
    # A click on the group expands it: every map call and its variable come back.
    kernel.send_to_widget(comm_id, {"event": "click", "node": group["id"]})
    kernel.wait_until(lambda: len(_nodes(kernel, comm_id)) == 2 * (n + 1), "the group to expand", timeout=60)
    assert {x["state"] for x in _nodes(kernel, comm_id).values()} == {"done"}
