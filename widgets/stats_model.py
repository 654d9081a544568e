"""What the dashboard plots, gathered from protocol events: per application and per engine.

Pure Python, like ``dag_model``; ``apply`` is idempotent (events are keyed), so the
history and the live events may overlap. Each series keeps its latest ``KEEP`` points.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from engine_server.protocol import (
    ActivationDone,
    AppStats,
    EngineLoad,
    Message,
    RequestFinished,
    RequestSubmitted,
)

KEEP = 2000


@dataclass
class AppSeries:
    name: str
    gets: dict[tuple[str, float], ActivationDone] = field(default_factory=dict)  # (var id, t) -> event
    finished: dict[str, RequestFinished] = field(default_factory=dict)  # request id -> event
    stats: AppStats | None = None
    submitted: int = 0


@dataclass
class AppRow:
    """One application's line of the dashboard's table."""

    name: str
    requests: int
    done: int
    failed: int
    cancelled: int
    gets: int
    get_median_s: float | None
    get_max_s: float | None
    queue_mean_s: float | None
    exec_mean_s: float | None
    ttft_mean_s: float | None
    cache_hit_rate: float | None  # cached / prompt tokens
    tokens_per_s: float | None  # output tokens / execution seconds, over its finished requests


class StatsModel:
    def __init__(self) -> None:
        self.apps: dict[str, AppSeries] = {}
        self.loads: dict[int, dict[float, EngineLoad]] = {}  # engine id -> t -> report

    def apply(self, event: Message) -> bool:
        """Take one event in; True if the dashboard changed."""
        if isinstance(event, RequestSubmitted):
            app = self._app(event.app_id, event.app_name)
            app.submitted += 1
            return True
        if isinstance(event, AppStats):
            app = self._app(event.app_id, event.name)
            if app.stats is not None and app.stats.t >= event.t:
                return False
            app.stats = event
            return True
        if isinstance(event, ActivationDone):
            return _keep(self._app(event.app_id).gets, (event.var_id, event.t), event)
        if isinstance(event, RequestFinished):
            return _keep(self._app(event.app_id).finished, event.request_id, event)
        if isinstance(event, EngineLoad):
            return _keep(self.loads.setdefault(event.engine_id, {}), event.t, event)
        return False

    def _app(self, app_id: str, name: str = "") -> AppSeries:
        app = self.apps.setdefault(app_id, AppSeries(name or app_id[:8]))
        if name:
            app.name = name
        return app

    def rows(self) -> list[AppRow]:
        """One row per application, in the order they appeared."""
        rows = []
        for app in self.apps.values():
            gets = [e.latency_s for e in app.gets.values() if e.state == "done"]
            done = list(app.finished.values())
            s = app.stats
            prompt = s.prompt_tokens if s else sum(e.prompt_tokens for e in done)
            cached = s.cached_tokens if s else sum(e.cached_tokens for e in done)
            exec_total = sum(e.exec_s for e in done)
            rows.append(
                AppRow(
                    app.name,
                    s.requests if s else app.submitted,
                    s.done if s else len(done),
                    s.failed if s else 0,
                    s.cancelled if s else 0,
                    len(app.gets),
                    statistics.median(gets) if gets else None,
                    max(gets) if gets else None,
                    _mean(e.queue_s for e in done),
                    _mean(e.exec_s for e in done),
                    _mean(e.ttft_s for e in done),
                    cached / prompt if prompt else None,
                    sum(e.output_tokens for e in done) / exec_total if exec_total > 0 else None,
                )
            )
        return rows


def _keep(series: dict, key: object, event: Message) -> bool:
    if key in series:
        return False
    series[key] = event
    if len(series) > KEEP:
        del series[next(iter(series))]  # the oldest
    return True


def _mean(values) -> float | None:  # noqa: ANN001
    values = list(values)
    return sum(values) / len(values) if values else None
