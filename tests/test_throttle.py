"""The widgets' throttle: at most one flush per interval, and never a change left unflushed."""

from __future__ import annotations

import threading
import time

from widgets.throttle import Throttle


def _poke_for(throttle: Throttle, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        throttle.poke()
        time.sleep(0.002)


def test_flushes_start_an_interval_apart_even_when_pokes_arrive_during_a_slow_flush() -> None:
    starts: list[float] = []

    def flush() -> None:
        starts.append(time.monotonic())
        time.sleep(0.08)  # a large layout: pokes keep arriving while it runs

    throttle = Throttle(flush, interval=0.2)
    _poke_for(throttle, 1.5)
    time.sleep(0.5)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(starts) >= 5
    assert min(gaps) >= 0.2 - 0.01, gaps


def test_a_flush_longer_than_the_interval_is_followed_by_one_flush_not_a_burst() -> None:
    starts: list[float] = []

    def flush() -> None:
        starts.append(time.monotonic())
        time.sleep(0.3)

    throttle = Throttle(flush, interval=0.1)
    _poke_for(throttle, 1.0)
    time.sleep(0.8)
    # Each flush takes 0.3 s and pokes never stop, so flushes run back to back, one at a time.
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= 0.3 - 0.01, gaps
    assert len(starts) <= 1.0 / 0.3 + 2


def test_the_last_poke_is_always_flushed() -> None:
    seen: list[int] = []
    state = {"value": 0}
    done = threading.Event()

    def flush() -> None:
        seen.append(state["value"])
        if state["value"] == 100:
            done.set()

    throttle = Throttle(flush, interval=0.05)
    for i in range(1, 101):
        state["value"] = i
        throttle.poke()
        time.sleep(0.001)
    assert done.wait(2.0), seen
    assert seen[-1] == 100
    assert len(seen) < 100  # throttled: fewer flushes than pokes


def test_cancel_drops_a_pending_flush() -> None:
    flushed = threading.Event()
    throttle = Throttle(flushed.set, interval=30.0)
    throttle.poke()  # the first poke flushes at once
    assert flushed.wait(5.0)
    flushed.clear()
    throttle.poke()  # within the interval: scheduled 30 s on, not run
    throttle.cancel()
    assert not flushed.wait(0.4)
