"""The events pictures need, kept so that a widget opened late can draw the present.

The server records what it publishes (``EventHistory.record``) and answers ``GetHistory``
from it. Memory is bounded three ways: a request's lifecycle events go when the graph
frees the request (``retain``), so they never outnumber the requests the server holds;
the dashboard's series keep the latest ``SERIES`` finished requests and activations per
application and the latest ``LOADS`` load reports per engine; and an application's
history goes with the application once the graph has forgotten it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container
from dataclasses import dataclass, field

from engine_server.protocol import (
    ActivationDone,
    AppClosed,
    AppStats,
    EngineChanged,
    EngineLoad,
    History,
    Message,
    RequestCancelled,
    RequestDispatched,
    RequestFailed,
    RequestFinished,
    RequestFirstToken,
    RequestQueued,
    RequestSubmitted,
)

#: Finished requests and activations kept per application for the dashboard's series.
SERIES = 2000
#: Load reports kept per engine (engines report at most every 0.2 s: a few minutes of them).
LOADS = 600

_LIFECYCLE = (RequestQueued, RequestDispatched, RequestFirstToken, RequestFinished, RequestFailed, RequestCancelled)
_FIELD = {
    RequestSubmitted: "submitted",
    RequestQueued: "queued",
    RequestDispatched: "dispatched",
    RequestFirstToken: "first_tokens",
    RequestFinished: "finished",
    RequestFailed: "failed",
    RequestCancelled: "cancelled",
}


@dataclass
class _App:
    name: str = ""
    requests: dict[str, list[Message]] = field(default_factory=dict)  # request id -> its events, in order
    finished: deque[RequestFinished] = field(default_factory=lambda: deque(maxlen=SERIES))
    activations: deque[ActivationDone] = field(default_factory=lambda: deque(maxlen=SERIES))
    stats: AppStats | None = None
    closed: AppClosed | None = None


class EventHistory:
    """Recent events by application and engine; see the module docstring for what is kept."""

    def __init__(self) -> None:
        self._apps: dict[str, _App] = {}
        self._engines: dict[int, EngineChanged] = {}
        self._loads: dict[int, deque[EngineLoad]] = {}

    def record(self, event: Message) -> None:
        """Keep ``event`` if a picture needs it (token deltas and values are not kept)."""
        if isinstance(event, EngineChanged):
            self._engines[event.engine_id] = event
        elif isinstance(event, EngineLoad):
            self._loads.setdefault(event.engine_id, deque(maxlen=LOADS)).append(event)
        elif isinstance(event, RequestSubmitted):
            app = self._apps.setdefault(event.app_id, _App())
            app.name = event.app_name or app.name
            app.requests[event.request_id] = [event]
        elif isinstance(event, _LIFECYCLE):
            app = self._apps.get(event.app_id)
            events = app.requests.get(event.request_id) if app is not None else None
            if events is not None:
                events.append(event)
            if app is not None and isinstance(event, RequestFinished):
                app.finished.append(event)
        elif isinstance(event, ActivationDone):
            if (app := self._apps.get(event.app_id)) is not None:
                app.activations.append(event)
        elif isinstance(event, AppStats):
            if (app := self._apps.get(event.app_id)) is not None:
                app.stats, app.name = event, event.name
        elif isinstance(event, AppClosed):
            if (app := self._apps.get(event.app_id)) is not None:
                app.closed = event

    def retain(self, requests: Container[str], apps: Container[str]) -> None:
        """Drop the events of requests and applications the graph no longer holds."""
        for app_id in [a for a in self._apps if a not in apps]:
            del self._apps[app_id]
        for app in self._apps.values():
            for request_id in [r for r in app.requests if r not in requests]:
                del app.requests[request_id]

    def reply(self, app_name: str = "") -> History:
        """The kept events of the applications called ``app_name`` ("" for all), and of every engine."""
        history = History(engines=list(self._engines.values()), loads=[e for q in self._loads.values() for e in q])
        finished: dict[str, RequestFinished] = {}  # a held request's, and the series' (the same event, once)
        for app in self._apps.values():
            if app_name and app.name != app_name:
                continue
            for events in app.requests.values():
                for event in events:
                    if isinstance(event, RequestFinished):
                        finished[event.request_id] = event
                    else:
                        getattr(history, _FIELD[type(event)]).append(event)
            finished.update((e.request_id, e) for e in app.finished)
            history.activations += app.activations
            history.app_stats += [app.stats] if app.stats is not None else []
            history.app_closed += [app.closed] if app.closed is not None else []
        history.finished = list(finished.values())
        return history

    def __len__(self) -> int:
        """Events kept now (for tests of the bounds)."""
        per_app = sum(
            sum(map(len, a.requests.values())) + len(a.finished) + len(a.activations) + (a.stats is not None) + (a.closed is not None)
            for a in self._apps.values()
        )
        return per_app + len(self._engines) + sum(map(len, self._loads.values()))
