"""The workloads' placement measures, read from a server's event log (benchmarks/workloads/placement.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "workload_placement", Path(__file__).resolve().parents[1] / "benchmarks" / "workloads" / "placement.py"
)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
client_name, placement = _module.client_name, _module.placement


def _submitted(rid: str, app: str) -> dict:
    return {"type": "RequestSubmitted", "request_id": rid, "app_name": app, "t": 0.0}


def _dispatched(rid: str, engine: int, t: float) -> dict:
    return {"type": "RequestDispatched", "request_id": rid, "engine_id": engine, "t": t}


def _finished(rid: str, t: float) -> dict:
    return {"type": "RequestFinished", "request_id": rid, "t": t}


def _group(client: str) -> str | None:
    return "chat" if client.startswith("chat-") else client.rsplit("-user-", 1)[0] if client.startswith("gpt-") else None


def test_a_clients_name_is_its_application_or_its_http_user() -> None:
    assert client_name("gpt-1-user-7") == "gpt-1-user-7"
    assert client_name("openai/completion/gpt-1-user-7") == "gpt-1-user-7"
    assert client_name("openai/chat") == "openai/chat"


def test_affinity_counts_a_groups_requests_after_its_first_on_an_engine_that_ran_it() -> None:
    events = [_submitted(f"r{i}", f"openai/completion/gpt-{g}-user-{i}") for i, g in enumerate([0, 0, 0, 1, 1])]
    events += [_dispatched("r0", 0, 1.0), _dispatched("r1", 0, 1.1), _dispatched("r2", 1, 1.2),
               _dispatched("r3", 1, 1.3), _dispatched("r4", 1, 1.4)]  # fmt: skip
    p = placement(events, since=0.5, group_of=_group)
    # gpt-0: r1 on engine 0 (hit), r2 on engine 1 (miss); gpt-1: r4 on engine 1 (hit).
    assert p["affinity_hit_rate"] == round(2 / 3, 3)
    assert p["mean_engines_per_group"] == 1.5  # gpt-0 on two engines, gpt-1 on one
    assert p["engines_used"] == [0, 1]
    assert "latency_beside_other_work" not in p


def test_a_latency_request_counts_as_beside_other_work_only_while_that_work_runs() -> None:
    events = [_submitted("m", "gpt-0-user-0"), _submitted("c1", "chat-1"), _submitted("c2", "chat-2"), _submitted("c3", "chat-3")]
    events += [_dispatched("m", 0, 1.0), _dispatched("c1", 0, 1.1), _dispatched("c2", 1, 1.2), _finished("m", 1.3),
               _dispatched("c3", 0, 1.4)]  # fmt: skip
    p = placement(events, since=0.5, group_of=_group, latency=frozenset({"chat"}))
    assert p["latency_beside_other_work"] == round(1 / 3, 3)  # only c1 ran beside m
    assert p["mean_engines_per_group"] == 1.0  # the chat group is left out of it


def test_dispatches_before_the_window_are_left_out() -> None:
    events = [_submitted("a", "gpt-0-user-0"), _submitted("b", "gpt-0-user-1"), _dispatched("a", 0, 1.0), _dispatched("b", 1, 5.0)]
    p = placement(events, since=2.0, group_of=_group)
    assert p["engines_used"] == [1]
    assert "affinity_hit_rate" not in p  # b is the group's first request inside the window
