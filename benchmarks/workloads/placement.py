"""Where a server's scheduler put requests, read from its event log: the workloads' placement measures.

No imports beyond the standard library, so that tests can load it alone.
"""

from __future__ import annotations

from collections.abc import Callable


def client_name(app_name: str) -> str:
    """The name a side gave a call's client: the notebook's application, or the HTTP body's user
    (the server names that application ``openai/<kind>/<user>``)."""
    return app_name.split("/", 2)[2] if app_name.startswith("openai/") and app_name.count("/") >= 2 else app_name


def placement(events: list[dict], since: float, group_of: Callable[[str], str | None], latency: frozenset[str] = frozenset()) -> dict:
    """Where the scheduler put the requests dispatched since ``since``, from the server's event log.

    ``group_of`` maps a client name (see ``client_name``) to the group it belongs to: one system
    prompt's users, one map-reduce job, all chat users. Returns the engines used; the affinity hit
    rate (a group's dispatches after its first that went to an engine that had already run that
    group, where its prefix is cached) and the mean number of engines per group, both over the
    groups not in ``latency``; and, for the groups in ``latency``, the share of their dispatches
    that landed on an engine running requests of other groups at that moment (lower is better
    isolation)."""
    group: dict[str, str | None] = {}
    running: dict[int, dict[str, str]] = {}  # engine -> running request -> its group
    seen: dict[str, set[int]] = {}  # group -> engines that ran it
    hits = repeats = beside = latency_dispatches = 0
    for e in events:
        kind = e.get("type")
        if kind == "RequestSubmitted":
            group[e["request_id"]] = group_of(client_name(e.get("app_name", "")))
        elif kind == "RequestDispatched" and e["t"] >= since and group.get(e["request_id"]) is not None:
            g, engine = group[e["request_id"]], e["engine_id"]
            if g in seen and g not in latency:
                repeats += 1
                hits += engine in seen[g]
            seen.setdefault(g, set()).add(engine)
            if g in latency:
                latency_dispatches += 1
                beside += any(other not in latency for other in running.get(engine, {}).values())
            running.setdefault(engine, {})[e["request_id"]] = g
        elif kind in ("RequestFinished", "RequestFailed", "RequestCancelled"):
            for on in running.values():
                on.pop(e["request_id"], None)
    out: dict = {"engines_used": sorted({x for s in seen.values() for x in s})}
    if repeats:
        out["affinity_hit_rate"] = round(hits / repeats, 3)
    others = [len(s) for g, s in seen.items() if g not in latency]
    if others:
        out["mean_engines_per_group"] = round(sum(others) / len(others), 2)
    if latency_dispatches:
        out["latency_beside_other_work"] = round(beside / latency_dispatches, 3)
    return out
