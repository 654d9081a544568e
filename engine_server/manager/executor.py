"""Runs the DAG: dispatches ready requests, delivers results, fails what cannot finish.

The executor is driven by the server loop: calls from clients (``submit``,
``activate``), messages from engines (``on_worker_message``) and engine
deaths (``on_engine_lost``). A consumer whose inputs become ready is
dispatched right here, inside the handler of its producer's result: no client
message is needed between dependent requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from engine_server.manager import criteria
from engine_server.manager.graph import Graph, RequestNode
from engine_server.manager.scheduler import Scheduler
from engine_server.protocol import (
    Message,
    Perf,
    RequestDispatched,
    RequestFailed,
    RequestFinished,
    RequestQueued,
    RunRequest,
    SubmitCall,
    TokenDelta,
    VarFailed,
    VarReady,
    VarState,
    WorkerDelta,
    WorkerDone,
    WorkerFailed,
)

# A request whose engine died is retried on a fresh engine this many times in all.
MAX_ATTEMPTS = 2

Publish = Callable[[Message], None]
SendToEngine = Callable[[int, Message], None]


class Executor:
    def __init__(self, graph: Graph, scheduler: Scheduler, publish: Publish, send_to_engine: SendToEngine) -> None:
        self.graph = graph
        self.scheduler = scheduler
        self.publish = publish
        self.send_to_engine = send_to_engine

    # ----------------------------------------------------------------- clients

    def submit(self, call: SubmitCall) -> RequestNode:
        """Add a call to its app's DAG. It runs once something downstream is requested."""
        node = self.graph.add_request(call)
        failed_inputs = [v for v in self.graph.input_variables(node) if v.state == "failed"]
        if failed_inputs:
            self._fail(node, f"input variable {failed_inputs[0].name!r} failed: {failed_inputs[0].error}")
        return node

    def activate(self, var_id: str, perf: Perf) -> None:
        """Request a variable: activate its producers and queue those that are ready."""
        if self.graph.variables[var_id].state in ("pending", "running"):
            for node in criteria.activate(self.graph, var_id, perf):
                if node.state == "waiting" and self.graph.is_ready(node):
                    self._enqueue(node)
                elif node.state == "queued":
                    self.scheduler.push(node)  # its criterion was upgraded: re-queue at the new priority
            self.pump()

    def var_state(self, var_id: str) -> VarState:
        var = self.graph.variables[var_id]
        return VarState(var.id, var.state, var.value, var.error)

    # ----------------------------------------------------------------- engines

    def on_worker_message(self, engine_id: int, msg: Message) -> None:
        request_id = getattr(msg, "request_id", None)
        node = self.graph.requests[request_id] if request_id in self.graph.requests else None
        if node is None or node.state != "running" or node.engine_id != engine_id:
            return  # a late message about a request that was failed or moved elsewhere
        if isinstance(msg, WorkerDelta):
            self.publish(TokenDelta(node.app_id, msg.var_id, msg.text))
        elif isinstance(msg, WorkerDone):
            self._finish(node, msg)
        elif isinstance(msg, WorkerFailed):
            self._release(node)
            self._fail(node, f"engine {engine_id} could not run {node.function.name!r}: {msg.error}")
        self.pump()

    def on_engine_lost(self, engine_id: int, reason: str) -> None:
        """An engine died: retry its requests elsewhere, or fail them with the reason."""
        slot = self.scheduler.engines[engine_id]
        lost = [self.graph.requests[r] for r in sorted(slot.running)]
        slot.running.clear()
        slot.alive = False
        for node in lost:
            node.engine_id = None
            if node.attempts < MAX_ATTEMPTS:
                self._enqueue(node)
            else:
                self._fail(
                    node,
                    f"engine {engine_id} died while running {node.function.name!r} ({reason}); "
                    f"it was tried {node.attempts} times. Check the server log, then call it again.",
                )
        self.pump()

    def fail_queued(self, error: str) -> None:
        """Fail every request still waiting for an engine (when none is left to run it)."""
        for node in list(self.graph.requests.values()):
            if node.state == "queued":
                self._fail(node, error)

    def pump(self) -> None:
        """Dispatch queued requests to engines with room."""
        for request_id, engine_id in self.scheduler.pop_assignments():
            node = self.graph.requests[request_id]
            node.state = "running"
            node.engine_id = engine_id
            node.attempts += 1
            node.t_dispatched = time.monotonic()
            for var_id in node.outputs.values():
                self.graph.variables[var_id].state = "running"
            self.send_to_engine(engine_id, RunRequest(node.id, self.graph.program(node)))
            self.publish(RequestDispatched(node.app_id, node.id, engine_id, time.time()))

    # ----------------------------------------------------------------- internals

    def _enqueue(self, node: RequestNode) -> None:
        node.state = "queued"
        node.t_queued = time.monotonic()
        self.scheduler.push(node)
        self.publish(RequestQueued(node.app_id, node.id, node.function.name, time.time()))

    def _release(self, node: RequestNode) -> None:
        slot = self.scheduler.engines.get(node.engine_id) if node.engine_id is not None else None
        if slot is not None:
            slot.running.discard(node.id)
            slot.finished += 1

    def _finish(self, node: RequestNode, done: WorkerDone) -> None:
        self._release(node)
        node.state = "done"
        now = time.monotonic()
        self.publish(
            RequestFinished(
                node.app_id,
                node.id,
                node.engine_id if node.engine_id is not None else -1,
                done.prompt_tokens,
                done.output_tokens,
                queue_s=node.t_dispatched - node.t_queued,
                exec_s=now - node.t_dispatched,
                ttft_s=done.ttft_s,
                t=time.time(),
            )
        )
        for var_id in node.outputs.values():
            var = self.graph.variables[var_id]
            var.state, var.value = "done", done.outputs.get(var_id, "")
            self.publish(VarReady(var.app_id, var.id, var.value))
        # Server-side dependency execution: consumers that were requested and are now ready run at once.
        for var_id in node.outputs.values():
            for consumer in self.graph.consumers(var_id):
                if consumer.state == "waiting" and consumer.perf is not None and self.graph.is_ready(consumer):
                    self._enqueue(consumer)

    def _fail(self, node: RequestNode, error: str) -> None:
        """Fail a request, its outputs, and everything downstream of them."""
        stack = [(node, error)]
        while stack:
            node, error = stack.pop()
            if node.state in ("done", "failed"):
                continue
            self.scheduler.discard(node.id)
            node.state = "failed"
            self.publish(RequestFailed(node.app_id, node.id, error, time.time()))
            for var_id in node.outputs.values():
                var = self.graph.variables[var_id]
                var.state, var.error = "failed", error
                self.publish(VarFailed(var.app_id, var.id, error))
                for consumer in self.graph.consumers(var_id):
                    stack.append((consumer, f"input variable {var.name!r} failed: {error}"))
