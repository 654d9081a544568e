"""What a live widget reads: the server's history of an application, then its live events.

A widget subscribes first and asks for the history second, so no event falls between the
two; the live events that arrive while the history is on its way wait in a list and are
applied after it, in order. Every event is applied once, under the widget's lock.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from engine_server.protocol import GetHistory, History, Message
from parrot_nb.client import Client


class EventFeed:
    """Feeds ``replay`` the history of ``app`` ("" for every app), then ``apply`` each live event.

    ``apply`` returns whether the event changed what the widget shows; when it did, the feed
    calls ``changed`` (outside the lock: a throttle's poke). ``received`` counts live events.
    """

    def __init__(
        self,
        client: Client,
        app: str,
        lock: threading.Lock | threading.RLock,
        *,
        replay: Callable[[Message], Any],
        apply: Callable[[Message], bool],
        changed: Callable[[], None],
    ) -> None:
        self.received = 0
        self._lock = lock
        self._apply = apply
        self._changed = changed
        self._early: list[Message] | None = []  # live events that arrive before the history is applied
        self._stop = client.add_listener(self._on_event)
        try:
            history = client.call(GetHistory(app), expect=History)
        except BaseException:
            self._stop()
            raise
        with lock:
            for event in history.ordered():
                replay(event)
            early, self._early = self._early, None
            for event in early:
                apply(event)

    def stop(self) -> None:
        """Stop receiving live events."""
        self._stop()

    def _on_event(self, event: Message) -> None:
        self.received += 1
        with self._lock:
            if self._early is not None:
                self._early.append(event)
                return
            changed = self._apply(event)
        if changed:
            self._changed()
