"""Runs the DAG: dispatches ready requests, delivers results, fails what cannot finish.

The executor is driven by the server loop: calls from clients (``submit``,
``activate``), messages from engines (``on_worker_message``, ``on_engine_ready``,
``on_engine_load``) and engine deaths (``on_engine_lost``). A consumer whose
inputs become ready is dispatched right here, inside the handler of its
producer's result: no client message is needed between dependent requests.

A request's program (its prompt cut at variable boundaries, with context keys)
is fixed when it is queued; from then until it finishes or fails it holds a
reference to each of its keys, and a key no request holds any more is released
on the engines that may cache it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine_server.manager import criteria
from engine_server.manager.graph import TERMINAL, Graph, GraphError, RequestNode
from engine_server.manager.prefix import ContextRefs, assign_keys, prefix_lengths
from engine_server.manager.scheduler import Scheduler
from engine_server.protocol import (
    AbortRequest,
    ActivationDone,
    AppStats,
    EngineLoad,
    ExtendPrefill,
    InputLink,
    Message,
    NativeDone,
    NativeFailed,
    Perf,
    ReleaseContexts,
    RequestCancelled,
    RequestDetail,
    RequestDispatched,
    RequestFailed,
    RequestFinished,
    RequestFirstToken,
    RequestQueued,
    RequestSubmitted,
    RunNative,
    RunRequest,
    SubmitCall,
    TokenDelta,
    VarFailed,
    VarReady,
    VarState,
    WorkerDelta,
    WorkerDone,
    WorkerFailed,
    WorkerHello,
    WorkerLoad,
)

if TYPE_CHECKING:
    from engine_server.tools import ToolPool

# A request whose engine died is retried on a fresh engine this many times in all.
MAX_ATTEMPTS = 2
# Known text shorter than this (bytes) is not worth prefilling before a request's inputs are ready.
EARLY_PREFILL_MIN_BYTES = 256

Publish = Callable[[Message], None]
SendToEngine = Callable[[int, Message], None]


class Executor:
    def __init__(
        self, graph: Graph, scheduler: Scheduler, publish: Publish, send_to_engine: SendToEngine,
        *, early_prefill: bool = True,
    ) -> None:  # fmt: skip
        self.graph = graph
        # Prefill the known start of an activated request while its inputs are still computed.
        self.early_prefill = early_prefill
        self.scheduler = scheduler
        self.publish = publish
        self.send_to_engine = send_to_engine
        self.contexts = ContextRefs()
        self._unused_keys: list[str] = []  # released since the last pump, to tell the engines
        self._activated: dict[str, tuple[float, Perf]] = {}  # var id -> when and how it was first requested
        # Whose early prefill holds a known start (its last key, and the input streaming after it):
        # requests that share it wait for that one's contexts instead of prefilling a copy each.
        self._early_holders: dict[tuple[str, str | None], str] = {}
        self.tools: ToolPool | None = None  # where native steps run (the server sets it)

    # ----------------------------------------------------------------- clients

    def submit(self, call: SubmitCall) -> RequestNode:
        """Add a call to its app's DAG. It runs once something downstream is requested."""
        node = self.graph.add_request(call)
        links = {
            name: InputLink(value.var_id, self.graph.variables[value.var_id].producer or "")
            for name, value in call.inputs.items()
            if value.var_id is not None
        }
        app_name = self.graph.apps[node.app_id].name
        # Item variables are listed as outputs too ("queries[0]", ...), so pictures of the DAG show them.
        outputs = {self.graph.variables[v].name: v for v in node.variables}
        self.publish(RequestSubmitted(node.app_id, node.id, node.function.name, links, outputs, time.time(), app_name))
        failed_inputs = [v for v in self.graph.input_variables(node) if v.state == "failed"]
        if failed_inputs:
            self._fail(node, f"input variable {failed_inputs[0].name!r} failed: {failed_inputs[0].error}")
        return node

    def activate(self, var_id: str, perf: Perf) -> None:
        """Request a variable: activate its producers and queue those that are ready."""
        if self.graph.variables[var_id].state in ("pending", "running"):
            self._activated.setdefault(var_id, (time.monotonic(), perf))
            waiting = []
            for node in criteria.activate(self.graph, var_id, perf):
                if node.state == "waiting" and self.graph.is_ready(node):
                    self._enqueue(node)
                elif node.state == "waiting":
                    waiting.append(node)
                elif node.state == "queued":
                    self.scheduler.push(node)  # its criterion was upgraded: re-queue at the new priority
            self.pump()
            # After the requests that can run were sent: an engine takes them first, and the
            # early prefills join their prefill step rather than hold it up.
            for node in waiting:
                self._prefill_early(node)

    def cancel(self, var_ids: list[str], reason: str) -> tuple[list[str], list[str]]:
        """Stop waiting for ``var_ids``: cancel the unfinished requests only they need.

        A request that another requested variable (one not being cancelled) still waits
        on keeps running, and so does the variable it produces. Returns the variables
        that failed as cancelled and the requests that were cancelled.
        """
        targets = {v for v in var_ids if v in self.graph.variables}
        return self._cancel_upstream(self._upstream(targets), targets, reason)

    def close_app(self, app_id: str, reason: str, *, forget: bool = False) -> list[str]:
        """Close an application: it takes no more calls.

        With ``forget`` (its client is gone), every variable of it is dropped and its
        unfinished requests are cancelled, except those another application still waits
        on. Returns the cancelled request ids.
        """
        app = self.graph.apps[app_id]
        app.closed = app.closed or reason
        self.graph.mark_garbage()  # the app itself may go now
        if not forget:
            return []
        self.graph.forget_app(app_id)
        targets = {v for r in app.requests for v in self.graph.requests[r].variables}
        pending = [self.graph.requests[r] for r in app.requests if self.graph.requests[r].state not in TERMINAL]
        return self._cancel_upstream(pending, targets, reason)[1]

    def collect(self) -> int:
        """Free requests, variables and applications nothing can reach; return how many requests went."""
        removed = self.graph.collect()
        for node in removed:
            for var_id in node.variables:
                self._activated.pop(var_id, None)
        for app_id in {node.app_id for node in removed} - set(self.graph.apps):
            self.scheduler.drop_app(app_id)
        if removed:
            self._early_holders = {k: v for k, v in self._early_holders.items() if v in self.graph.requests}
        return len(removed)

    def detail(self, request_id: str) -> RequestDetail:
        """A request's filled prompt, output so far and timings (``GetRequestDetail``)."""
        node = self.graph.requests.get(request_id)
        if node is None:
            raise GraphError(
                f"unknown request {request_id!r}: it was never submitted, or the server freed it once "
                "no variable of it or downstream of it was held"
            )
        outputs = {}
        for name, var_id in node.outputs.items():
            var = self.graph.variables[var_id]
            outputs[name] = var.value if var.value is not None else "".join(node.streamed.get(var_id, ()))
        done = node.result
        started, ended = node.t_dispatched, node.t_ended or time.monotonic()
        return RequestDetail(
            node.app_id, node.id, node.function.name, node.state if node.state != "lost" else "queued",
            self.graph.prompt(node), outputs,
            engine_id=node.engine_id if node.engine_id is not None else -1,
            perf=node.perf or "", group=node.group or "", attempts=node.attempts,
            queue_s=(started or ended) - node.t_queued if node.t_queued else 0.0,
            exec_s=ended - started if started else 0.0,
            prefill_s=done.prefill_s if done else 0.0, decode_s=done.decode_s if done else 0.0,
            ttft_s=done.ttft_s if done else (node.t_first_token - started if node.t_first_token else 0.0),
            prompt_tokens=done.prompt_tokens if done else 0, cached_tokens=done.cached_tokens if done else 0,
            output_tokens=done.output_tokens if done else 0, error=node.error,
        )  # fmt: skip

    def var_state(self, var_id: str) -> VarState:
        var = self.graph.variables[var_id]
        return VarState(var.id, var.state, var.value, var.error, var.json)

    # ----------------------------------------------------------------- engines

    def on_worker_message(self, engine_id: int, msg: Message) -> None:
        request_id = getattr(msg, "request_id", None)
        node = self.graph.requests[request_id] if request_id in self.graph.requests else None
        if node is None or node.state != "running" or node.engine_id != engine_id:
            return  # a late message about a request that was failed or moved elsewhere
        if isinstance(msg, WorkerDelta):
            if not node.t_first_token:
                node.t_first_token = time.monotonic()
                ttft = node.t_first_token - node.t_dispatched
                self.publish(RequestFirstToken(node.app_id, node.id, engine_id, ttft, time.time()))
            node.streamed.setdefault(msg.var_id, []).append(msg.text)
            self.publish(TokenDelta(node.app_id, msg.var_id, msg.text))
            if msg.var_id in node.items and "\n" in msg.text:
                self._resolve_items(node, msg.var_id, None)  # a line completed: its item is ready
            if self.early_prefill and msg.var_id in self.graph.variables:
                # Consumers waiting on this text prefill it as it streams.
                for consumer in self.graph.consumers(msg.var_id):
                    if consumer.state == "waiting" and consumer.perf is not None:
                        self._prefill_early(consumer)
        elif isinstance(msg, WorkerDone):
            self._finish(node, msg)
        elif isinstance(msg, WorkerFailed):
            self._fail(node, f"engine {engine_id} could not run {node.function.name!r}: {msg.error}")
        self.pump()

    def on_native_result(self, msg: NativeDone | NativeFailed) -> None:
        """A tool worker's answer for a native step (or the pool's: a timeout, a dead worker)."""
        node = self.graph.requests.get(msg.request_id)
        if node is None or node.state != "running" or not node.function.native:
            return  # cancelled meanwhile
        if isinstance(msg, NativeDone):
            (var_id,) = node.outputs.values()
            done = WorkerDone(node.id, {var_id: msg.value}, 0, 0, 0.0, msg.run_s, 0.0)
            self._finish(node, done, json_vars={var_id} if msg.json else set())
        else:
            self._fail(node, msg.error)
        self.pump()

    def on_engine_ready(self, hello: WorkerHello, capacity: int | None = None) -> None:
        """An engine registered: it takes up to ``capacity`` requests at once (default: its ``max_running``)."""
        if hello.max_context and not self.graph.max_context:
            self.graph.max_context = hello.max_context
        self.scheduler.engine_ready(hello.engine_id, capacity or hello.max_running, hello.kv_blocks, hello.block_size)
        for node in list(self.graph.requests.values()):  # requested before any engine could take them
            if node.state == "waiting" and node.perf is not None and node.early_engine is None:
                self._prefill_early(node)
        self.pump()

    def on_engine_load(self, load: WorkerLoad) -> None:
        """An engine's load report: keep it for placement, forget the contexts it evicted, publish it."""
        self.scheduler.engine_load(
            load.engine_id, load.running, load.waiting, load.kv_blocks_used, load.kv_blocks_total,
            load.cached_keys, load.evicted_keys, reclaimable=load.kv_blocks_cached,
        )  # fmt: skip
        slot = self.scheduler.engines[load.engine_id]
        self.publish(
            EngineLoad(
                load.engine_id, load.running, load.waiting, load.kv_blocks_used, load.kv_blocks_total,
                load.cached_keys, len(slot.running), time.time(), load.kv_blocks_cached,
            )  # fmt: skip
        )
        self.pump()

    def on_engine_lost(self, engine_id: int, reason: str) -> None:
        """An engine died: retry its requests elsewhere, or fail them with the reason."""
        lost = [self.graph.requests[r] for r in self.scheduler.engine_lost(engine_id)]
        for node in lost:
            node.engine_id = None
            node.state = "lost"  # neither queued nor running until it is re-queued or failed
            if node.attempts < MAX_ATTEMPTS:
                self.scheduler.push(node)
                node.state = "queued"
                self._publish_queued(node)
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
        """Dispatch queued requests to engines with room; tell engines which contexts are no longer needed."""
        for request_id, engine_id in self.scheduler.pop_assignments():
            node = self.graph.requests[request_id]
            node.state = "running"
            node.engine_id = engine_id
            node.attempts += 1
            node.t_dispatched = time.monotonic()
            node.t_first_token = 0.0
            node.streamed = {}  # a retry streams from the start again
            for var_id in node.variables:
                var = self.graph.variables[var_id]
                if var.state != "done":  # an item resolved by an earlier attempt stays resolved
                    var.state = "running"
            assert node.segments is not None  # fixed when it was queued
            adopt = ""
            if node.early_engine == engine_id:
                adopt, node.early_engine, node.early_held = f"{node.id}/prefill", None, []
            else:
                self._drop_stream(node)  # placed elsewhere after all
            self.send_to_engine(engine_id, RunRequest(node.id, node.segments, adopt=adopt))
            self.publish(
                RequestDispatched(node.app_id, node.id, engine_id, time.time(), node.perf or "", node.group or "", node.attempts)
            )
        if self._unused_keys:
            self._release_contexts()

    # ----------------------------------------------------------------- internals

    def _enqueue(self, node: RequestNode) -> None:
        if node.function.native:
            self._run_native(node)
            return
        try:
            self.graph.check_limits(node)  # the model's limits may not have been known at submission
            node.segments = self.graph.program(node)
        except GraphError as exc:  # too much output asked for, or a chat template that rejects the conversation
            self._fail(node, str(exc))
            return
        self.contexts.acquire(assign_keys(node.segments))
        node.prefix = prefix_lengths(node.segments)
        self._drop_early_prefix(node)  # its own references hold those contexts now
        if any(v.forgotten for v in self.graph.input_variables(node)):
            self.graph.mark_garbage()  # its program is fixed: dropped inputs it kept alive can go
        node.state = "queued"
        node.t_queued = time.monotonic()
        self.scheduler.push(node)
        self._publish_queued(node)

    def _prefill_early(self, node: RequestNode) -> None:
        """An activated request waits on an input: prefill what is known of its prompt now, on
        the engine that will run it, so that little is left to prefill once the input arrives.

        What is known: the text up to its first unready input and, while that input's
        producer runs, the text it has streamed so far. The first call opens a prefill-only
        request with the keyed known text (when it is long enough to matter, or an input
        streams into it); later calls send what was added (``ExtendPrefill``). The request
        adopts that KV when it is dispatched there. The contexts stay referenced (not
        released) until the request is queued or ends.
        """
        if not self.early_prefill:
            return
        segments, streaming = self.graph.known_prefix(node)
        if not segments:
            return  # its prompt starts with the input: nothing known to run ahead
        if node.early_engine is not None and not self.scheduler.engines[node.early_engine].alive:
            node.early_engine, node.early_held = None, []  # its engine died, and the prefill with it
            self._drop_early_prefix(node)
        keys = assign_keys(segments)
        holder = self.graph.requests.get(self._early_holders.get((keys[-1], streaming), ""))
        if holder is not None and holder is not node and holder.early_engine is not None and holder.state == "waiting":
            if node.early_engine is not None:  # two began apart and now hold the same start: one is enough
                self._drop_stream(node)
                self._drop_early_prefix(node)
            return  # the holder's prefill caches this start; this request forks it when it runs
        self._early_holders[keys[-1], streaming] = node.id
        texts = [seg.text for seg in segments]
        if streaming is not None:
            producer = self.graph.producer(streaming)
            texts.append("".join(producer.streamed.get(streaming, ())) if producer is not None else "")
        if node.early_engine is None:
            prefix = prefix_lengths(segments)
            if streaming is None and prefix[keys[-1]] < EARLY_PREFILL_MIN_BYTES:
                return  # too little to be worth a trip to the engine
            engine_id = self.scheduler.prefill_engine(prefix)
            if engine_id is None:
                return
            self.contexts.acquire(keys)
            node.early_prefix, node.early_engine, node.early_held = prefix, engine_id, [seg.text for seg in segments]
            self.send_to_engine(engine_id, RunRequest(f"{node.id}/prefill", segments, prefill_only=True))
        pieces = _extension(node.early_held, texts)
        if pieces is None:  # what it holds is no longer the start of the prompt: start over
            self._drop_stream(node)
            self._drop_early_prefix(node)
            self._prefill_early(node)
        elif any(pieces):
            node.early_held = texts
            self.send_to_engine(node.early_engine, ExtendPrefill(f"{node.id}/prefill", pieces))

    def _drop_early_prefix(self, node: RequestNode) -> None:
        if node.early_prefix:
            self._unused_keys += self.contexts.release(node.early_prefix)
            node.early_prefix = {}

    def _drop_stream(self, node: RequestNode) -> None:
        """Free a waiting request's early prefill on its engine (it will not be adopted)."""
        engine_id, node.early_engine, node.early_held = node.early_engine, None, []
        if engine_id is not None and self.scheduler.engines[engine_id].alive:
            self.send_to_engine(engine_id, AbortRequest(f"{node.id}/prefill"))

    def _run_native(self, node: RequestNode) -> None:
        """A native step with its inputs ready goes straight to the tool pool (it queues there)."""
        if self.tools is None:
            self._fail(node, f"native step {node.function.name!r}: this server has no tool workers")
            return
        args, json_args = {}, []
        for name, value in node.inputs.items():
            if value.var_id is None:
                args[name] = value.text or ""
                continue
            var = self.graph.variables[value.var_id]
            args[name] = var.value or ""
            if var.json:
                json_args.append(name)
        node.segments, node.prefix = [], {}
        node.state, node.t_queued = "queued", time.monotonic()
        self._publish_queued(node)
        node.state, node.attempts = "running", node.attempts + 1
        node.t_dispatched, node.t_first_token = time.monotonic(), 0.0
        for var_id in node.outputs.values():
            self.graph.variables[var_id].state = "running"
        self.publish(RequestDispatched(node.app_id, node.id, -1, time.time(), node.perf or "", node.group or "", node.attempts))
        fn = node.function
        self.tools.submit(
            RunNative(node.id, fn.name, fn.native, args, json_args, fn.native_memory_mb), fn.native_timeout_s,
            fn.native_memory_mb,
        )  # fmt: skip

    def _publish_queued(self, node: RequestNode) -> None:
        self.publish(RequestQueued(node.app_id, node.id, node.function.name, time.time(), node.perf or "", node.group or ""))

    def _release_contexts(self) -> None:
        unused = set(self._unused_keys)
        self._unused_keys.clear()
        for slot in self.scheduler.engines.values():
            held = unused & slot.keys
            if held and slot.alive:
                self.send_to_engine(slot.engine_id, ReleaseContexts(sorted(held)))

    def _leave(self, node: RequestNode) -> None:
        """The request no longer waits for or holds an engine: drop its place and its context references."""
        if node.state == "queued":
            self.scheduler.discard(node.id)
        elif node.state == "running" and node.engine_id is not None:
            self.scheduler.finish(node.id, node.engine_id)
        if node.state in ("queued", "running", "lost"):
            self._unused_keys += self.contexts.release(node.prefix)
        self._drop_early_prefix(node)
        self._drop_stream(node)

    def _finish(self, node: RequestNode, done: WorkerDone, json_vars: set[str] | None = None) -> None:
        """A request is done; ``json_vars`` are its outputs whose values are JSON text (default: JSON-schema outputs)."""
        if json_vars is None:
            json_vars = {s.var_id for s in node.segments or () if s.kind == "gen" and s.sampling and s.sampling.json}
        self._leave(node)
        self.graph.settle(node, "done")
        now = node.t_ended = time.monotonic()
        node.result, node.streamed = done, {}  # the values hold the whole output now
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
                cached_tokens=done.cached_tokens,
            )
        )
        app = self.graph.apps[node.app_id]
        app.prompt_tokens += done.prompt_tokens
        app.cached_tokens += done.cached_tokens
        self.publish(self.app_stats(app.id))
        for var_id in node.outputs.values():
            var = self.graph.variables[var_id]
            var.state, var.value, var.json = "done", done.outputs.get(var_id, ""), var_id in json_vars
            self.publish(VarReady(var.app_id, var.id, var.value, var.json))
            self._activation_done(var.app_id, var_id, "done")
        for var_id in node.outputs.values():
            self._start_consumers(var_id)
            if var_id in node.items:
                self._resolve_items(node, var_id, self.graph.variables[var_id].value or "")

    def _start_consumers(self, var_id: str) -> None:
        """Server-side dependency execution: requested consumers of a variable that just resolved run
        at once if it was their last input; those still waiting on another may prefill further."""
        for consumer in self.graph.consumers(var_id):
            if consumer.state == "waiting" and consumer.perf is not None:
                if self.graph.is_ready(consumer):
                    self._enqueue(consumer)
                else:
                    self._prefill_early(consumer)

    def _resolve_items(self, node: RequestNode, var_id: str, final: str | None) -> None:
        """Resolve the item variables of an output whose lines are complete.

        While it streams (``final`` None) the last line may still grow, so only lines ended
        by a newline count; at the end (``final``: the whole text) every line does, and items
        the output did not have fail. Empty lines are skipped; a leading list marker ("- ",
        "* ", "1. ", "2) ") is taken off.
        """
        lines = (final if final is not None else "".join(node.streamed.get(var_id, ()))).split("\n")
        if final is None:
            lines = lines[:-1]
        items = [text for text in map(_item_text, lines) if text]
        item_ids = node.items[var_id]
        for item_id, value in zip(item_ids, items):
            var = self.graph.variables[item_id]
            if var.state == "done":
                continue
            var.state, var.value = "done", value
            self.publish(VarReady(var.app_id, var.id, value))
            self._activation_done(var.app_id, item_id, "done")
            self._start_consumers(item_id)
        if final is not None and len(items) < len(item_ids):
            name = self.graph.variables[var_id].name
            for item_id in item_ids[len(items) :]:
                self._fail_variable(
                    item_id,
                    f"output {name!r} of {node.function.name!r} ended with {len(items)} item(s), not the "
                    f"{len(item_ids)} its items option asks for (one per line); ask for them in the prompt, "
                    "or raise max_tokens",
                )

    def _fail_variable(self, var_id: str, error: str) -> None:
        """Fail one variable of a request that itself did not fail (a missing item), and its consumers."""
        var = self.graph.variables[var_id]
        var.state, var.error = "failed", error
        self.publish(VarFailed(var.app_id, var.id, error))
        self._activation_done(var.app_id, var_id, "failed")
        for consumer in self.graph.consumers(var_id):
            self._fail(consumer, f"input variable {var.name!r} failed: {error}")

    def _fail(self, node: RequestNode, error: str) -> None:
        """Fail a request, its outputs, and everything downstream of them."""
        self._end(node, error, "failed")

    def _end(self, node: RequestNode, error: str, state: str) -> None:
        """End a request as ``failed`` or ``cancelled``; its outputs fail, and so does everything downstream."""
        stack = [(node, error)]
        while stack:
            node, error = stack.pop()
            if node.state in TERMINAL:
                continue
            if state == "cancelled" and node.state == "running" and node.engine_id is not None:
                # Free its sequence and KV now; nothing more is sent for it.
                self.send_to_engine(node.engine_id, AbortRequest(node.id))
            elif node.state == "running" and node.function.native and self.tools is not None:
                self.tools.cancel(node.id)  # its worker is stopped (and replaced)
            self._leave(node)
            self.graph.settle(node, state)
            node.error, node.t_ended = error, time.monotonic()
            if state == "cancelled":
                self.publish(RequestCancelled(node.app_id, node.id, error, time.time()))
            else:
                self.publish(RequestFailed(node.app_id, node.id, error, time.time()))
            for var_id in node.variables:
                var = self.graph.variables[var_id]
                if var.state == "done":
                    continue  # an item resolved before the request failed keeps its value
                var.state, var.error = "failed", error
                self.publish(VarFailed(var.app_id, var.id, error))
                self._activation_done(var.app_id, var_id, "failed")
                for consumer in self.graph.consumers(var_id):
                    what = "was cancelled" if state == "cancelled" else "failed"
                    stack.append((consumer, f"input variable {var.name!r} {what}: {error}"))

    def _upstream(self, var_ids: set[str]) -> list[RequestNode]:
        """The unfinished requests that ``var_ids`` wait on: their producers and those producers' inputs."""
        found: dict[str, RequestNode] = {}
        stack = [self.graph.producer(v) for v in var_ids]
        while stack:
            node = stack.pop()
            if node is None or node.id in found or node.state in TERMINAL:
                continue
            found[node.id] = node
            if node.state == "waiting":  # a queued or running request's inputs are done (and may be freed)
                stack.extend(self.graph.producer(v.id) for v in self.graph.input_variables(node) if v.state != "done")
        return list(found.values())

    def _cancel_upstream(self, candidates: list[RequestNode], targets: set[str], reason: str) -> tuple[list[str], list[str]]:
        """Cancel the candidates that no requested variable outside ``targets`` still waits on."""
        others = {
            v for v in self._activated
            if v not in targets and self.graph.variables[v].state in ("pending", "running")
        }  # fmt: skip
        needed = {node.id for node in self._upstream(others)}
        cancelled = [node for node in candidates if node.id not in needed and node.state not in TERMINAL]
        error = f"cancelled: {reason}"
        for node in cancelled:
            self._end(node, error, "cancelled")
        for var_id in targets:
            self._activated.pop(var_id, None)  # nobody waits for it any more
        failed = [v for v in targets if self.graph.variables[v].state == "failed"]
        self.pump()
        return failed, [node.id for node in cancelled]

    def _activation_done(self, app_id: str, var_id: str, state: str) -> None:
        activated = self._activated.pop(var_id, None)
        if activated is not None:
            t, perf = activated
            self.publish(ActivationDone(app_id, var_id, perf, state, time.monotonic() - t, time.time()))

    def app_stats(self, app_id: str) -> AppStats:
        """An application's progress and prefix-cache hits so far."""
        app = self.graph.apps[app_id]
        hit_rate = app.cached_tokens / app.prompt_tokens if app.prompt_tokens else 0.0
        return AppStats(
            app.id, app.name, app.submitted, app.done, app.failed, app.prompt_tokens, app.cached_tokens, hit_rate,
            time.time(), app.cancelled,
        )  # fmt: skip


def _extension(held: list[str], texts: list[str]) -> list[str] | None:
    """What to append to a prefill holding the segments ``held`` so that it holds ``texts``.

    The first piece continues ``held``'s last segment, each later one starts a segment.
    None when ``held`` is not the start of ``texts`` (a segment changed).
    """
    last = len(held) - 1
    if last < 0 or len(texts) <= last or held[:last] != texts[:last] or not texts[last].startswith(held[last]):
        return None
    return [texts[last][len(held[last]) :], *texts[last + 1 :]]


_LIST_MARKER = re.compile(r"^(?:[-*\u2022]\s+|\d{1,3}[.)]\s+)")


def _item_text(line: str) -> str:
    """One line of an output split into items, without surrounding spaces and a list marker."""
    return _LIST_MARKER.sub("", line.strip(), count=1).strip()
