"""Semantic variables: the futures that calls of semantic functions return."""

from __future__ import annotations

import asyncio
import html
import json
import threading
from collections.abc import Generator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from engine_server.protocol import (
    Activate,
    Cancel,
    ErrorReply,
    Message,
    Perf,
    RequestDispatched,
    TokenDelta,
    VarFailed,
    VarReady,
    VarState,
)

if TYPE_CHECKING:
    from parrot_nb.client import Client

PERFS = ("latency", "throughput")


class SemanticVariableError(RuntimeError):
    """The request that produces a variable failed; the message says why."""


class SemanticVariable:
    """An output of a semantic-function call, computed by the engine server.

    Nothing runs until a variable downstream is requested: ``v.get()``,
    ``await v``, or displaying ``v`` in a notebook cell (which streams the
    tokens as they arrive).

    The value is the output's text; an output constrained by a JSON schema
    (``json=...``, ``is_json``), and a native step that returned something other
    than a str, give the parsed object instead, and ``text`` its JSON text. A
    downstream semantic function reads the text; a downstream native step gets the
    parsed object.
    """

    def __init__(
        self, client: Client, app_id: str, var_id: str, name: str, function: str, *, is_json: bool = False
    ) -> None:
        self._client = client
        self.app_id = app_id
        self.id = var_id
        self.name = name
        self.function = function
        self.is_json = is_json
        self._future: Future[Any] = Future()
        self._state = "pending"
        self._parts: list[str] = []
        self._changed = threading.Condition()
        self._activated: set[str] = set()
        # An output split into items ({{output:x items=N}}): its N item variables, one per line of
        # its text, each ready as soon as its line is complete.
        self.items: tuple[SemanticVariable, ...] = ()

    # ----------------------------------------------------------------- public

    @property
    def state(self) -> str:
        """``pending`` (not started), ``running``, ``done`` or ``failed``."""
        return self._state

    @property
    def ready(self) -> bool:
        return self._future.done()

    @property
    def partial(self) -> str:
        """The text streamed so far (the whole value once done)."""
        return "".join(self._parts)

    @property
    def text(self) -> str:
        """The output's whole text (JSON text for a JSON output); waits like ``get``."""
        self.get()
        return self.partial

    def activate(self, perf: Perf = "latency") -> None:
        """Ask the server for this variable without waiting (what ``get`` does first)."""
        if perf not in PERFS:
            raise ValueError(f"perf must be 'latency' or 'throughput', not {perf!r}")
        if self._future.done() or perf in self._activated:
            return
        self._activated.add(perf)
        self._client.request(Activate(self.app_id, self.id, perf)).add_done_callback(self._on_activated)

    def get(self, perf: Perf = "latency", timeout: float | None = None) -> Any:
        """Block until the value is ready and return it: the text, or for a JSON output the parsed object.

        ``perf`` tells the server what to optimise the requests behind this
        variable for: ``latency`` (someone is waiting) or ``throughput``.
        Raises ``SemanticVariableError`` if the request failed and
        ``TimeoutError`` after ``timeout`` seconds. Interrupting the wait
        (Ctrl-C, the notebook's stop button) cancels the variable.
        """
        self.activate(perf)
        try:
            return self._future.result(timeout)
        except TimeoutError:
            raise TimeoutError(
                f"{self._label()} was not ready within {timeout:g} s (state: {self._state}); "
                "it keeps running: call .get() again to wait longer"
            ) from None
        except KeyboardInterrupt:
            self.cancel("interrupted while waiting in .get()")
            raise

    def cancel(self, reason: str = "cancelled with .cancel()") -> bool:
        """Stop waiting for this variable; False if it had already finished.

        It fails with a "cancelled" error, and the server cancels the requests that only
        it needed (aborting them on their engine, which frees their KV cache); requests
        another requested variable still waits on keep running. Call the function again
        to compute it anew.
        """
        if self._future.done():
            return False
        self._fail(f"cancelled ({reason}); call {self.function}() again to compute it")
        self._client.request(Cancel(self.app_id, [self.id], reason), reply=False)
        return True

    def __await__(self) -> Generator[Any, None, Any]:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        self.activate("latency")
        try:
            # Shielded: a cancelled await must not cancel the shared future, only this wait.
            return await asyncio.shield(asyncio.wrap_future(self._future))
        except asyncio.CancelledError:
            self.cancel("its awaiting task was cancelled")
            raise

    def __repr__(self) -> str:
        if self._state == "done":
            return f"<SemanticVariable {self._label()} done: {self._future.result()!r}>"
        if self._state == "failed":
            return f"<SemanticVariable {self._label()} failed: {self._future.exception()}>"
        return f"<SemanticVariable {self._label()} {self._state}>"

    # ----------------------------------------------------------------- display

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        if self._state == "done":
            text = self.partial
        elif self._state == "failed":
            text = f"[{self._label()} failed] {self._future.exception()}"
        else:
            text = self.partial + f" [{self._label()} {self._state}…]"
        badge = {"done": "#2e7d32", "failed": "#c62828"}.get(self._state, "#757575")
        return {
            "text/plain": text,
            "text/html": (
                f'<div class="parrot-nb-var"><span style="font-size:smaller;color:{badge}">'
                f"{html.escape(self._label())} · {self._state}</span>"
                f'<pre style="white-space:pre-wrap;margin:2px 0">{html.escape(text)}</pre></div>'
            ),
        }

    def _ipython_display_(self) -> None:
        """Display in a cell: request the value and stream tokens into the output until done."""
        from IPython.display import display

        if self._future.done():
            display(self._repr_mimebundle_(), raw=True)
            return
        self.activate("latency")
        handle = display(self._repr_mimebundle_(), raw=True, display_id=True)
        shown = None
        try:
            while True:
                with self._changed:
                    self._changed.wait_for(lambda: self.partial != shown or self._future.done(), timeout=0.5)
                # Read "done" before drawing: the value may land between a draw and the check, and
                # returning then would leave the last drawn state (still running) on screen.
                done = self._future.done()
                if self.partial != shown or done:
                    shown = self.partial
                    handle.update(self._repr_mimebundle_(), raw=True)
                if done:
                    return
        except KeyboardInterrupt:
            # An interrupted cell stops waiting: what only this display needed is cancelled.
            self.cancel("the cell displaying it was interrupted")
            handle.update(self._repr_mimebundle_(), raw=True)

    # ----------------------------------------------------------------- events (client I/O thread)

    def _label(self) -> str:
        return f"{self.function}.{self.name}"

    def _on_event(self, event: Message) -> None:
        if isinstance(event, TokenDelta):
            self._parts.append(event.text)
        elif isinstance(event, VarReady):
            self._resolve(event.value, event.json)
        elif isinstance(event, VarFailed):
            self._fail(event.error)
        elif isinstance(event, RequestDispatched) and not self._future.done():
            # A new attempt (after an engine crash) streams from the start again.
            self._parts = []
            self._state = "running"
        self._notify()  # streamed text changed

    def _on_activated(self, fut: Future[Message]) -> None:
        try:
            reply = fut.result()
        except Exception as exc:
            self._fail(str(exc))
        else:
            if isinstance(reply, ErrorReply):
                self._fail(reply.message)
            elif isinstance(reply, VarState) and reply.state == "done" and reply.value is not None:
                self._resolve(reply.value, reply.json)
            elif isinstance(reply, VarState) and reply.state == "failed":
                self._fail(reply.error or "failed")

    def _resolve(self, value: str, is_json: bool = False) -> None:
        if not self._future.done():
            self._parts = [value]
            if self.is_json or is_json:
                try:
                    result = json.loads(value)
                except json.JSONDecodeError as exc:  # the server checked it: this is a bug, say so
                    self._fail(f"its value should be JSON, yet it is not ({exc}): {value[:200]!r}")
                    return
            else:
                result = value
            self._state = "done"
            self._future.set_result(result)
        self._notify()

    def _fail(self, error: str) -> None:
        if not self._future.done():
            self._state = "failed"
            self._future.set_exception(SemanticVariableError(f"{self._label()}: {error}"))
        self._notify()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()
