"""At most a few redraws a second, however fast events arrive, in the cell that made the widget.

Events arrive on the client's I/O thread, many per second (a 500-call map stage makes
thousands). A widget updates its model under a lock and calls ``Throttle.poke()``; the
throttle runs the widget's ``flush`` (which assigns traits, and so sends comm messages)
once per ``interval`` at most, always once after the last poke, on a timer thread.

The flush runs in a copy of the context the widget was made in: ipykernel keeps the
parent message in a context variable, so the comm messages a flush sends carry the
header of the cell that displayed the widget (ipykernel >= 7.1 makes trait assignment
from another thread safe; a plain thread would take whichever cell runs now as parent).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable


class Throttle:
    def __init__(self, flush: Callable[[], None], interval: float = 0.25) -> None:
        self.interval = interval
        self._flush = flush
        self._context = contextvars.copy_context()
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._timer: threading.Timer | None = None
        self._last = 0.0

    def poke(self) -> None:
        """Something changed: flush now if the last flush is ``interval`` old, else when it is."""
        with self._lock:
            if self._timer is not None:
                return  # a flush is coming, and will see this change
            delay = max(0.0, self._last + self.interval - time.monotonic())
            self._timer = threading.Timer(delay, self._run)
            self._timer.daemon = True
            self._timer.start()

    def _run(self) -> None:
        with self._flushing:  # one flush at a time, even if the last one ran long (a large layout)
            with self._lock:
                # The interval counts from this flush's start: a poke while it runs (the change may
                # be after what it reads) schedules the next one an interval on, not at once.
                self._timer = None
                self._last = time.monotonic()
            self._context.copy().run(self._flush)

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
