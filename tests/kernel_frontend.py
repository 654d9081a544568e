"""A real kernel driven the way a notebook front end drives it, with the widgets' models it would hold.

``KernelFrontend`` starts a kernel (the ``parrot-nb`` kernelspec), runs code in it, and
reads every iopub message: widget models are rebuilt from ``comm_open`` and ``update``
messages exactly as a browser's widget manager would, and comm messages are counted per
widget, so tests assert on what would reach the page.
"""

from __future__ import annotations

import json
import os
import queue
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager

REPO = Path(__file__).resolve().parent.parent


class KernelFrontend:
    def __init__(self, kernel_name: str = "parrot-nb") -> None:
        self.km = KernelManager(kernel_name=kernel_name)
        # The worktree's packages first, whatever is installed (the kernel runs with cwd = REPO).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.km.start_kernel(env=env, cwd=str(REPO))
        try:
            self.kc = self.km.client()
            self.kc.start_channels()
            self.kc.wait_for_ready(timeout=60)
        except BaseException:
            self.close()
            raise
        self.models: dict[str, dict[str, Any]] = {}  # comm id -> widget state
        self.updates: Counter[str] = Counter()  # comm id -> update messages received
        self.trait_updates: Counter[tuple[str, str]] = Counter()  # (comm id, trait) -> messages carrying it
        self.opened_by: dict[str, str] = {}  # comm id -> msg id of the cell that made the widget
        self.parents: dict[str, set[str]] = {}  # comm id -> parent msg ids of its update messages

    def close(self) -> None:
        try:
            if getattr(self, "kc", None) is not None:
                self.kc.stop_channels()
        finally:
            if self.km.has_kernel:
                self.km.shutdown_kernel(now=True)

    # ----------------------------------------------------------------- running code

    def run(self, code: str, timeout: float = 120) -> str:
        """Execute ``code``; return its stdout. Fails with the kernel's traceback on an error."""
        msg_id = self.kc.execute(code)
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self._next(deadline, f"cell did not finish within {timeout} s:\n{code}")
            parent = msg["parent_header"].get("msg_id")
            content = msg["content"]
            if parent == msg_id and msg["msg_type"] == "stream":
                out.append(content["text"])
            elif parent == msg_id and msg["msg_type"] == "error":
                raise AssertionError("the cell failed:\n" + "\n".join(content["traceback"]))
            elif parent == msg_id and msg["msg_type"] == "status" and content["execution_state"] == "idle":
                return "".join(out)

    def value(self, expression: str) -> Any:
        """The JSON value of ``expression`` in the kernel."""
        return json.loads(self.run(f"import json as _json; print(_json.dumps({expression}))").strip().splitlines()[-1])

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
        """Read iopub until ``condition()`` holds."""
        deadline = time.monotonic() + timeout
        while not condition():
            try:
                self._next(deadline, f"timed out waiting for {what}", block=0.1)
            except queue.Empty:
                continue

    def settle(self, quiet: float = 1.0) -> None:
        """Read iopub until nothing has arrived for ``quiet`` seconds."""
        while True:
            try:
                self._handle(self.kc.get_iopub_msg(timeout=quiet))
            except queue.Empty:
                return

    def send_to_widget(self, comm_id: str, content: dict) -> None:
        """What a view's ``model.send(content)`` does: a custom message to the kernel-side widget."""
        data = {"method": "custom", "content": content}
        msg = self.kc.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
        self.kc.shell_channel.send(msg)

    # ----------------------------------------------------------------- widget models

    def widgets(self, anywidget_id: str) -> list[str]:
        """Comm ids of the widgets whose anywidget class is ``anywidget_id`` (module.Class)."""
        return [cid for cid, state in self.models.items() if state.get("_anywidget_id") == anywidget_id]

    def _next(self, deadline: float, what: str, block: float | None = None) -> dict:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(what)
        msg = self.kc.get_iopub_msg(timeout=min(remaining, block) if block is not None else remaining)
        self._handle(msg)
        return msg

    def _handle(self, msg: dict) -> None:
        content = msg["content"]
        if msg["msg_type"] == "comm_open" and content.get("target_name") == "jupyter.widget":
            self.models[content["comm_id"]] = dict(content["data"].get("state", {}))
            self.opened_by[content["comm_id"]] = msg["parent_header"].get("msg_id", "")
        elif msg["msg_type"] == "comm_msg" and content["comm_id"] in self.models:
            data = content["data"]
            if data.get("method") == "update":
                comm_id = content["comm_id"]
                self.models[comm_id].update(data["state"])
                self.updates[comm_id] += 1
                for trait in data["state"]:
                    self.trait_updates[(comm_id, trait)] += 1
                self.parents.setdefault(comm_id, set()).add(msg["parent_header"].get("msg_id", ""))
