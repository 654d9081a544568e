"""The synthetic incidents of the RCACopilot demo (demos/incidents.py): recurrence, evidence, split, monitoring API."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "demos" / "incidents.py"


def _load() -> ModuleType:
    # demos/ is not a package: load the file as the module "incidents", as `python demos/incidents.py` would see it.
    spec = importlib.util.spec_from_file_location("incidents", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["incidents"] = module
    spec.loader.exec_module(module)
    return module


inc = _load()


@pytest.fixture(scope="module")
def incidents() -> list:
    return inc.generate(400, seed=0)


def _texts(incident) -> list[str]:
    """Log messages and change events ("kind: detail"), the text the EVIDENCE patterns are meant for."""
    telemetry = incident.telemetry
    events = [f"{e['kind']}: {e['detail']}" for e in telemetry["events"]]
    return [line["message"] for line in telemetry["logs"]] + events


def _matches(category: str, texts: list[str]) -> bool:
    return any(re.search(p, t, re.IGNORECASE) for p in inc.EVIDENCE[category] for t in texts)


def _by_category(incidents) -> dict[str, list]:
    groups = defaultdict(list)
    for i in incidents:
        groups[i.category].append(i)
    return groups


# --- determinism and shape ------------------------------------------------------------------------------------


def test_the_same_seed_gives_identical_incidents(incidents) -> None:
    again = inc.generate(400, seed=0)
    assert again == incidents


def test_a_different_seed_gives_different_incidents(incidents) -> None:
    other = inc.generate(400, seed=1)
    assert [i.fingerprint for i in other] != [i.fingerprint for i in incidents]
    assert [i.day for i in other] != [i.day for i in incidents]


def test_categories_are_the_eight_in_order_and_each_is_common(incidents) -> None:
    assert inc.CATEGORIES == ("network", "disk", "certificate", "dependency", "deployment", "quota", "memory", "config")
    counts = Counter(i.category for i in incidents)
    assert set(counts) == set(inc.CATEGORIES)
    assert min(counts.values()) >= 0.05 * len(incidents)
    assert len(set(counts.values())) > 1, "category frequencies should be uneven"


def test_ids_days_and_times_increase_together(incidents) -> None:
    assert [i.id for i in incidents] == [f"INC-{k:04d}" for k in range(1, len(incidents) + 1)]
    days = [i.day for i in incidents]
    assert all(a < b for a, b in zip(days, days[1:]))
    assert 0 <= days[0] and days[-1] < 60
    start = datetime(2026, 9, 1, tzinfo=timezone.utc)
    for i in incidents:
        assert datetime.fromisoformat(i.time.replace("Z", "+00:00")) == start + timedelta(seconds=round(i.day * 86400))
        assert i.time.endswith("Z")


def test_fields_hold_valid_values(incidents) -> None:
    for i in incidents:
        assert i.service in inc.COMPONENTS
        assert 1 <= i.severity <= 4
        assert i.fingerprint.startswith(f"{i.category}:")
        assert i.resolution and i.resolution[0].isupper() and i.resolution.endswith(".")
        assert set(i.telemetry) == {"logs", "metrics", "events"}
        assert {e["kind"] for e in i.telemetry["events"]} <= {
            "deployment", "config_push", "feature_flag", "cert_rotation", "scale",
        }  # fmt: skip
        times = [line["t"] for line in i.telemetry["logs"]]
        assert times == sorted(times)


def test_dependencies_name_components_datastores_or_external_services() -> None:
    assert set(inc.DEPENDENCIES) == set(inc.COMPONENTS)
    known = set(inc.COMPONENTS) | {"orders-db", "session-cache", "payments-provider", "geo-ip-api"}
    for component, deps in inc.DEPENDENCIES.items():
        assert deps and set(deps) <= known and component not in deps


# --- recurrence -----------------------------------------------------------------------------------------------


def test_about_a_quarter_of_incidents_have_a_new_fingerprint(incidents) -> None:
    new = len({i.fingerprint for i in incidents})
    assert 0.15 <= new / len(incidents) <= 0.35


def test_most_repeats_come_within_20_days_but_not_all(incidents) -> None:
    last: dict[str, float] = {}
    gaps = []
    for i in incidents:
        if i.fingerprint in last:
            gaps.append(i.day - last[i.fingerprint])
        last[i.fingerprint] = i.day
    within = sum(g <= 20 for g in gaps) / len(gaps)
    assert 0.7 <= within < 0.95, "retrieval with time decay needs mostly recent repeats and some old ones"


def test_repeats_keep_the_fingerprints_category_and_component(incidents) -> None:
    first: dict[str, tuple[str, str]] = {}
    for i in incidents:
        assert first.setdefault(i.fingerprint, (i.category, i.service)) == (i.category, i.service), i.id
    assert max(Counter(i.fingerprint for i in incidents).values()) > 3


def test_repeats_vary_in_symptom_and_numbers(incidents) -> None:
    groups = defaultdict(list)
    for i in incidents:
        groups[i.fingerprint].append(i)
    repeated = [g for g in groups.values() if len(g) >= 4]
    assert repeated
    assert any(len({i.alert for i in g}) > 1 for g in repeated), "a repeat may fire a different symptom alert"
    for g in repeated:
        assert len({json.dumps(i.telemetry["metrics"], sort_keys=True) for i in g}) == len(g)


@pytest.mark.parametrize(
    ("category", "detail"),
    [
        ("disk", r"disk:(\S+) on "),
        ("certificate", r"certificate:(\S+) on "),
        ("quota", r" on (\S+) via "),
        ("dependency", r"dependency:(\S+) "),
    ],
)
def test_incidents_mention_the_details_of_their_fingerprint(incidents, category: str, detail: str) -> None:
    # A repeat shares the same disk path, certificate domain, quota resource or dependency: that is what makes the
    # nearest past incident useful.
    group = _by_category(incidents)[category]
    mentions = 0
    for i in group:
        name = re.search(detail, i.fingerprint).group(1)
        mentions += any(name in text for text in _texts(i))
    assert mentions >= 0.8 * len(group)


# --- evidence and noise ---------------------------------------------------------------------------------------


def test_each_category_shows_its_own_evidence_in_most_incidents(incidents) -> None:
    for category, group in _by_category(incidents).items():
        found = sum(_matches(category, _texts(i)) for i in group)
        assert found >= 0.8 * len(group), (category, found, len(group))


def test_some_incidents_carry_one_misleading_line_from_another_category(incidents) -> None:
    misled = 0
    for i in incidents:
        messages = [line["message"] for line in i.telemetry["logs"]]
        others = [m for m in messages for c in inc.CATEGORIES if c != i.category and _matches(c, [m])]
        assert len(others) <= 1, (i.id, others)
        misled += bool(others)
    assert 0.1 <= misled / len(incidents) <= 0.3


def test_every_incident_has_routine_lines_that_match_no_evidence(incidents) -> None:
    for i in incidents:
        plain = [x for x in i.telemetry["logs"] if not any(_matches(c, [x["message"]]) for c in inc.CATEGORIES)]
        assert len(plain) >= 5, i.id


def test_evidence_hits_counts_matching_lines_per_category(incidents) -> None:
    i = incidents[0]
    hits = inc.evidence_hits(i)
    assert list(hits) == list(inc.CATEGORIES)
    texts = _texts(i)
    for category in inc.CATEGORIES:
        assert hits[category] == sum(_matches(category, [t]) for t in texts)
    assert inc.evidence_hits(i.to_json()) == hits


def test_alert_titles_are_symptoms_shared_across_categories(incidents) -> None:
    categories_of = defaultdict(set)
    for i in incidents:
        categories_of[i.alert].add(i.category)
    assert any(len(c) >= 2 for c in categories_of.values())
    ambiguous = sum(len(categories_of[i.alert]) >= 2 for i in incidents)
    assert ambiguous >= 0.5 * len(incidents)
    generic = defaultdict(set)
    for i in incidents:
        generic[i.alert.replace(i.service, "{service}")].add(i.category)
    assert len(generic["HTTP 5xx rate above 5% on {service}"]) >= 4


def _extreme(incident, name: str, pick) -> float | None:
    scopes = incident.telemetry["metrics"].get(name)
    if not scopes:
        return None
    return pick(v for series in scopes.values() for _, v in series)


@pytest.mark.parametrize(
    ("fingerprint", "name", "pick", "anomalous"),
    [
        (r"^disk:", "disk_used_pct", max, lambda v: v >= 95),
        (r"^network:(packet loss|NIC)", "packet_loss_pct", max, lambda v: v >= 2),
        (r"^network:DNS", "dns_errors_per_s", max, lambda v: v >= 10),
        (r"^certificate:", "cert_days_left", min, lambda v: v <= 0),
        (r"^dependency:\S+ errors", "upstream_error_rate", max, lambda v: v >= 10),
        (r"^dependency:\S+ slow", "upstream_p99_ms", max, lambda v: v >= 2000),
        (r"^quota:", "quota_used_pct", max, lambda v: v >= 95),
        (r"^memory:", "memory_used_pct", max, lambda v: v >= 90),
    ],
)
def test_the_causal_metric_is_anomalous_only_for_its_cause(incidents, fingerprint, name, pick, anomalous) -> None:
    own = [_extreme(i, name, pick) for i in incidents if re.match(fingerprint, i.fingerprint)]
    category = fingerprint.lstrip("^").split(":")[0]
    others = [_extreme(i, name, pick) for i in incidents if i.category != category]
    assert own
    # Monitoring has gaps: now and then the causal series is missing (and a baseline may stand in for it).
    assert sum(v is not None and anomalous(v) for v in own) >= 0.75 * len(own)
    present = [v for v in others if v is not None]
    assert present, f"{name} also appears as a baseline, so its presence is no clue"
    assert not any(anomalous(v) for v in present)


def test_error_rate_rises_as_a_consequence_in_most_incidents(incidents) -> None:
    rising = 0
    for i in incidents:
        series = next(iter(i.telemetry["metrics"]["error_rate"].values()))
        before = [v for m, v in series if m <= -32]
        after = [v for m, v in series if m >= 0]
        rising += sum(after) / len(after) > 2 * sum(before) / len(before)
    assert rising >= 0.9 * len(incidents)


def test_a_change_shortly_before_the_alert_marks_deployment_and_config(incidents) -> None:
    def recent_change(i, kinds: tuple[str, ...]) -> bool:
        monitor = inc.Monitor(i)
        return any(e["component"] == i.service for k in kinds for e in monitor.events(k, within_minutes=60))

    groups = _by_category(incidents)
    assert sum(recent_change(i, ("deployment",)) for i in groups["deployment"]) >= 0.8 * len(groups["deployment"])
    config_kinds = ("config_push", "feature_flag")
    assert sum(recent_change(i, config_kinds) for i in groups["config"]) >= 0.8 * len(groups["config"])
    for category in ("disk", "memory", "network"):
        assert sum(recent_change(i, ("deployment",)) for i in groups[category]) <= 0.2 * len(groups[category])
    # Routine changes appear as noise, some long before the alert.
    old = [e for i in incidents for e in inc.Monitor(i).events() if e["minutes_before"] > 120]
    assert len(old) > 0.5 * len(incidents)


# --- split ----------------------------------------------------------------------------------------------------


def test_split_holds_out_the_last_days_without_overlap(incidents) -> None:
    history, held_out = inc.split(incidents, held_out_days=10.0)
    assert history and held_out
    assert len(history) + len(held_out) == len(incidents)
    assert {i.id for i in history}.isdisjoint({i.id for i in held_out})
    assert max(i.day for i in history) < min(i.day for i in held_out)
    cutoff = math.ceil(incidents[-1].day) - 10.0
    assert all(i.day < cutoff for i in history) and all(i.day >= cutoff for i in held_out)
    assert inc.split(incidents, held_out_days=20.0)[1][0].day < held_out[0].day


# --- the monitoring API ---------------------------------------------------------------------------------------

ALERT_AT = "2026-09-01T10:00:00Z"


def _at(minutes: float) -> str:
    t = datetime(2026, 9, 1, 10, tzinfo=timezone.utc) + timedelta(minutes=minutes)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def monitor():
    def line(minutes: float, component: str, host: str, level: str, message: str) -> dict:
        return {"t": _at(minutes), "component": component, "host": host, "level": level, "message": message}

    def event(minutes: float, kind: str, component: str, detail: str) -> dict:
        return {"t": _at(minutes), "kind": kind, "component": component, "detail": detail}

    incident = inc.Incident(
        id="INC-0001", day=0.416667, time=ALERT_AT, service="checkout", alert="Health check failing on checkout-3",
        severity=2, category="disk", fingerprint="disk:/var/log on checkout-3", resolution="Freed /var/log.",
        telemetry={
            "logs": [
                line(-20, "checkout", "checkout-3", "INFO", "GET /api/v1/products/1 200 in 12ms"),
                line(-15, "checkout", "checkout-3", "ERROR", "write failed: ENOSPC (/var/log)"),
                line(-10, "payments", "payments-1", "WARN", "dial tcp 10.0.0.1:443: connect: connection timed out"),
                line(-5, "checkout", "checkout-3", "FATAL", "panic: boom"),
                line(5, "checkout", "checkout-1", "ERROR", "POST /api/v1/checkout 500 in 2100ms"),
            ],
            "metrics": {
                "disk_used_pct": {"checkout-3": [[-10.0, 90.0], [0.0, 99.5]]},
                "error_rate": {"checkout": [[-10.0, 0.5], [0.0, 12.0]]},
                "requests_per_s": {"payments": [[-10.0, 50.0]], "checkout": [[-10.0, 300.0]]},
                "upstream_error_rate": {"orders-db": [[-10.0, 0.1], [0.0, 40.0]]},
            },
            "events": [
                event(-180, "config_push", "search", "cp-1: search.max_results changed to 50"),
                event(-30, "deployment", "checkout", "rollout of checkout v2.14.1 to eu-west"),
                event(-2, "feature_flag", "auth", "passkeys enabled for 5% of traffic"),
            ],
        },
    )  # fmt: skip
    return inc.Monitor(incident)


def test_monitor_alert_shows_the_symptom_not_the_cause(monitor) -> None:
    assert monitor.alert() == {"title": "Health check failing on checkout-3", "service": "checkout", "severity": 2,
                               "time": ALERT_AT}  # fmt: skip


def test_monitor_grep_is_case_insensitive_with_alternatives(monitor) -> None:
    messages = [x["message"] for x in monitor.logs(grep="enospc|TIMED OUT")]
    assert messages == ["write failed: ENOSPC (/var/log)", "dial tcp 10.0.0.1:443: connect: connection timed out"]
    assert monitor.logs(grep="x509") == []
    assert [x["message"] for x in monitor.logs(grep="panic:")] == ["panic: boom"]


def test_monitor_level_filter_takes_one_level_or_several(monitor) -> None:
    assert [x["level"] for x in monitor.logs(level="error")] == ["ERROR", "ERROR"]
    assert [x["level"] for x in monitor.logs(level="ERROR|FATAL")] == ["ERROR", "FATAL", "ERROR"]


def test_monitor_component_matches_the_component_or_a_host(monitor) -> None:
    assert len(monitor.logs("checkout")) == 4
    assert [x["message"] for x in monitor.logs("checkout-1")] == ["POST /api/v1/checkout 500 in 2100ms"]
    assert [x["host"] for x in monitor.logs("payments")] == ["payments-1"]


def test_monitor_limit_keeps_the_last_lines_in_time_order(monitor) -> None:
    assert [x["message"] for x in monitor.logs(limit=2)] == ["panic: boom", "POST /api/v1/checkout 500 in 2100ms"]
    assert [x["level"] for x in monitor.logs(level="ERROR|FATAL", limit=1)] == ["ERROR"]
    assert monitor.logs(limit=0) == []


def test_monitor_metric_resolves_the_scope(monitor) -> None:
    assert monitor.metric("disk_used_pct", "checkout-3") == [(-10.0, 90.0), (0.0, 99.5)]
    assert monitor.metric("disk_used_pct", "checkout") == [(-10.0, 90.0), (0.0, 99.5)]  # a host of checkout
    assert monitor.metric("requests_per_s") == [(-10.0, 300.0)]  # the alert's service first
    assert monitor.metric("requests_per_s", "payments") == [(-10.0, 50.0)]
    assert monitor.metric("upstream_error_rate") == [(-10.0, 0.1), (0.0, 40.0)]  # else the first scope
    assert monitor.metric_names() == ["disk_used_pct", "error_rate", "requests_per_s", "upstream_error_rate"]
    assert monitor.metric_names("payments") == ["requests_per_s"]
    assert monitor.metric_names("checkout") == ["disk_used_pct", "error_rate", "requests_per_s"]


def test_monitor_metric_key_error_lists_what_exists(monitor) -> None:
    with pytest.raises(KeyError) as unknown:
        monitor.metric("disk_usage")
    assert "disk_usage" in str(unknown.value)
    for name in ("disk_used_pct", "error_rate", "requests_per_s", "upstream_error_rate"):
        assert name in str(unknown.value)
    with pytest.raises(KeyError) as wrong_scope:
        monitor.metric("error_rate", "search")
    assert "search" in str(wrong_scope.value) and "checkout" in str(wrong_scope.value)


def test_monitor_events_filter_by_kind_and_recency(monitor) -> None:
    assert [e["kind"] for e in monitor.events()] == ["config_push", "deployment", "feature_flag"]
    assert [e["kind"] for e in monitor.events(within_minutes=60)] == ["deployment", "feature_flag"]
    assert [e["kind"] for e in monitor.events(within_minutes=10)] == ["feature_flag"]
    assert [e["component"] for e in monitor.events("deployment")] == ["checkout"]
    assert monitor.events("deployment", within_minutes=10) == []
    assert [e["minutes_before"] for e in monitor.events()] == [180.0, 30.0, 2.0]


def test_monitor_dependencies_and_read_only_answers(monitor) -> None:
    assert monitor.dependencies("checkout") == inc.DEPENDENCIES["checkout"]
    assert monitor.dependencies("checkout-3") == inc.DEPENDENCIES["checkout"]
    assert monitor.dependencies("payments-provider") == ()
    with pytest.raises(KeyError, match="known"):
        monitor.dependencies("billing")
    monitor.logs()[0]["message"] = "changed"
    monitor.events()[0]["kind"] = "changed"
    assert monitor.logs()[0]["message"] == "GET /api/v1/products/1 200 in 12ms"
    assert monitor.events()[0]["kind"] == "config_push"


def test_monitor_accepts_the_json_form_of_an_incident(incidents) -> None:
    i = incidents[10]
    from_object, from_json = inc.Monitor(i), inc.Monitor(json.loads(json.dumps(i.to_json())))
    assert from_json.alert() == from_object.alert() == {"title": i.alert, "service": i.service, "severity": i.severity,
                                                        "time": i.time}  # fmt: skip
    assert from_json.logs(limit=1000) == from_object.logs(limit=1000)
    assert from_json.metric("error_rate") == from_object.metric("error_rate")


# --- serialisation and the command line -----------------------------------------------------------------------


def test_json_round_trip_gives_the_same_incident(incidents) -> None:
    for i in incidents:
        data = json.loads(json.dumps(i.to_json()))
        assert set(data) == {"id", "day", "time", "service", "alert", "severity", "category", "fingerprint",
                             "resolution", "telemetry"}  # fmt: skip
        assert inc.Incident.from_json(data) == i


def test_cli_writes_jsonl_and_a_summary(tmp_path: Path, incidents) -> None:
    out = tmp_path / "all.jsonl"
    run = subprocess.run([sys.executable, str(SCRIPT), "-n", "400", "--seed", "0", "-o", str(out)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [i.to_json() for i in incidents]
    summary = run.stderr.strip()
    assert len(summary.splitlines()) == 1
    for part in ("history", "held-out", "new fingerprints", "within 20 days", *inc.CATEGORIES):
        assert part in summary


def test_cli_stream_writes_only_the_held_out_days(tmp_path: Path) -> None:
    out = tmp_path / "stream.jsonl"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "-n", "120", "--seed", "3", "--stream", "--held-out-days", "15", "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = [inc.Incident.from_json(json.loads(line)) for line in out.read_text().splitlines()]
    _, held_out = inc.split(inc.generate(120, seed=3), held_out_days=15)
    assert rows == held_out
    assert f"held-out {len(held_out)}" in run.stderr


def test_a_monitor_works_on_a_record_without_its_label() -> None:
    incident = inc.generate(40, seed=3)[-1].to_json()
    unlabelled = {k: v for k, v in incident.items() if k not in ("category", "fingerprint", "resolution")}
    monitor = inc.Monitor(unlabelled)
    assert monitor.alert() == inc.Monitor(incident).alert()
    assert monitor.logs(limit=500) == inc.Monitor(incident).logs(limit=500)
