"""Synthetic on-call incidents over a small fictional shop backend, the records of the RCACopilot demo.

    python demos/incidents.py -n 400 --seed 0 -o incidents.jsonl
    python demos/incidents.py -n 400 --seed 0 --stream -o stream.jsonl     # only the held-out last days

RCACopilot (Microsoft) handles an incident in two stages: incident handlers collect diagnostics by querying
monitoring data, an LLM summarises them, and an LLM picks the root-cause category with the help of the nearest
past incidents (by embedding similarity, decayed with age). To exercise that pipeline without real production
data, this module makes up incidents whose ground truth is known:

* the alert title is a *symptom*, and the same title occurs under several root causes, so the title alone does
  not answer the question;
* the cause shows in the telemetry (logs, metrics, change events), mixed with routine noise, consequences that
  every category shares, and sometimes one misleading line that belongs to another category;
* incidents recur: each has a ``fingerprint`` (the root-cause instance, such as a full disk on one host) and
  most incidents repeat an earlier fingerprint soon after its last occurrence, which is what makes retrieval
  of past incidents useful.

Seeded and stdlib only: the same arguments give the same incidents, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta, timezone
from typing import Any

CATEGORIES: tuple[str, ...] = (
    "network", "disk", "certificate", "dependency", "deployment", "quota", "memory", "config",
)  # fmt: skip
COMPONENTS: tuple[str, ...] = ("api-gateway", "checkout", "payments", "inventory", "search", "auth")
DATASTORES: tuple[str, ...] = ("orders-db", "session-cache")
EXTERNAL: tuple[str, ...] = ("payments-provider", "geo-ip-api")
REGIONS: tuple[str, ...] = ("eu-west", "us-east", "ap-south")
DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "api-gateway": ("auth", "checkout", "search", "inventory", "geo-ip-api"),
    "checkout": ("payments", "inventory", "orders-db", "session-cache"),
    "payments": ("payments-provider", "orders-db"),
    "inventory": ("orders-db", "session-cache"),
    "search": ("inventory", "geo-ip-api", "session-cache"),
    "auth": ("session-cache", "orders-db"),
}
HOSTS_PER_COMPONENT = 4
START = datetime(2026, 9, 1, tzinfo=timezone.utc)
RECENT_DAYS = 20.0
"""A repeat "within RECENT_DAYS" is one this close to the previous occurrence of its fingerprint."""

# Regular expressions (case-insensitive) for each category's evidence in log messages and change events (an event
# reads as "kind: detail"). They are deliberately specific: routine noise matches none of them, while the shared
# consequences of an outage (HTTP 500s, deadline exceeded, failing health checks) are left out, because they say
# nothing about the cause. Anomalous metric values are evidence too, but a regex cannot see them.
EVIDENCE: dict[str, tuple[str, ...]] = {
    "network": (
        r"connection timed out",
        r"packet loss",
        r"tcp retransmits",
        r"i/o timeout",
        r"packets dropped",
        r"dns resolution .* timed out",
    ),
    "disk": (
        r"no space left on device",
        r"ENOSPC",
        r"filesystem \S+ on \S+ is \d+% full",
        r"disk full",
    ),
    "certificate": (
        r"x509:",
        r"tls handshake error",
        r"certificate for \S+ (has )?expired",
        r"cert rotation .* failed",
    ),
    "dependency": (
        r"upstream \S+ returned 5\d\d",
        r"circuit breaker open",
        r"upstream \S+ responded in \d+ms",
        r"dependency \S+ marked unhealthy",
    ),
    "deployment": (
        r"panic:",
        r"rollout of \S+ v\d",
        r"nil pointer dereference",
        r"column \"\S+\" does not exist",
        r"unknown payment status",
        r"NullPointerException",
        r"No enum constant",
    ),
    "quota": (
        r"429 too many requests",
        r"QuotaExceeded",
        r"throttled by",
        r"quota at \d+%",
        r"too many connections",
    ),
    "memory": (
        r"OOMKilled",
        r"OutOfMemoryError",
        r"out of memory",
        r"memory usage \d+% of limit",
        r"GC overhead limit exceeded",
    ),
    "config": (
        r"invalid value for key",
        r"config push",
        r"feature flag \S+ enabled",
        r"failed to parse config",
    ),
}
_EVIDENCE_RE: dict[str, re.Pattern[str]] = {c: re.compile("|".join(p), re.IGNORECASE) for c, p in EVIDENCE.items()}

# Uneven, as in production, but none rare enough that a held-out window lacks it.
_CATEGORY_WEIGHTS: dict[str, float] = {
    "dependency": 0.19, "deployment": 0.17, "config": 0.14, "network": 0.12,
    "memory": 0.11, "quota": 0.10, "disk": 0.09, "certificate": 0.08,
}  # fmt: skip
_P_NEW = 0.2  # plus the new ones forced when a category has nothing to repeat: about a quarter in all
_P_RECENT = 0.8  # of repeats, the target share that picks a fingerprint seen within RECENT_DAYS
_P_FIXED = 0.2  # after each occurrence, the chance that a fingerprint is fixed for good
_P_MISLEADING = 0.2
_P_NO_EVIDENCE_LOGS = 0.04  # the cause then shows only in metrics and events
_MINUTES = tuple(range(-44, 17, 2))  # the metric window: 60 minutes around the alert, one point every 2 minutes
_EVENT_KINDS = ("deployment", "config_push", "feature_flag", "cert_rotation", "scale")


# --- the root-cause instances (fingerprints) -------------------------------------------------------------------


@dataclass(frozen=True)
class _Cause:
    """One root-cause instance. Every incident with this fingerprint shares its component, host and parameters."""

    category: str
    kind: str
    component: str
    host: str
    params: tuple[tuple[str, str], ...]
    fingerprint: str

    def values(self) -> dict[str, str]:
        return {"component": self.component, "host": self.host, **dict(self.params)}


def _host(rng: random.Random, component: str) -> str:
    return f"{component}-{rng.randint(1, HOSTS_PER_COMPONENT)}"


def _owned(component: str) -> list[str]:
    """The datastores and external services a component calls: what can fail beneath it without a code change."""
    return [d for d in DEPENDENCIES[component] if d not in COMPONENTS]


_DOMAINS = {
    "api-gateway": ("api.shop.example", "www.shop.example"),
    "checkout": ("checkout.internal.shop.example", "orders-db.internal.shop.example"),
    "payments": ("payments.internal.shop.example", "pay.provider-mtls.shop.example"),
    "inventory": ("inventory.internal.shop.example",),
    "search": ("search.internal.shop.example", "geo.shop.example"),
    "auth": ("auth.shop.example", "sso.shop.example"),
}
_QUOTAS = {
    "orders-db": ("read units", "write units", "connections"),
    "session-cache": ("ops per second", "connections"),
    "payments-provider": ("API requests per minute",),
    "geo-ip-api": ("daily lookups", "requests per second"),
}
_DISK_PATHS = {
    "/var/log": "application logs at DEBUG level",
    "/var/lib/docker": "unpruned container image layers",
    "/data/tmp": "temporary files from the nightly report export",
    "/var/crash": "core dumps from a crashing sidecar",
}
_CONFIG_KEYS = {
    "api-gateway": ("gateway.route_timeout_ms", "gateway.max_body_kb", "rate_limit.rps"),
    "checkout": ("checkout.cart_ttl_s", "payment.timeout_ms", "checkout.max_items"),
    "payments": ("payment.timeout_ms", "payments.retry_budget", "payments.currency_table"),
    "inventory": ("inventory.sync_interval_s", "inventory.reservation_ttl_s"),
    "search": ("search.max_results", "search.index_alias", "search.geo_boost"),
    "auth": ("auth.token_ttl_s", "auth.jwks_url", "auth.max_sessions"),
}
_FLAGS = {
    "api-gateway": ("new-routing-table", "http3-edge"),
    "checkout": ("one-click-checkout", "new-tax-engine"),
    "payments": ("async-capture", "3ds-v2"),
    "inventory": ("reservation-v2",),
    "search": ("semantic-ranking", "typo-tolerance"),
    "auth": ("passkeys", "session-rotation"),
}
_BUGS = ("nil-pointer", "missing-migration", "unknown-status", "pool-size")
_LEAKS = ("image cache", "session map", "per-request buffer pool", "metrics label set")
_JAVA = frozenset({"payments", "search"})


def _new_cause(rng: random.Random, category: str) -> _Cause:
    """A fresh root-cause instance of a category; its fingerprint names what a later recurrence would share."""
    component = rng.choice(COMPONENTS)
    host = _host(rng, component)
    p: dict[str, str] = {}
    if category == "network":
        kind = rng.choice(("packet-loss", "packet-loss", "nic", "dns"))
        p["dep"] = rng.choice(DEPENDENCIES[component])
        if kind == "packet-loss":
            p["region"], p["peer"] = rng.sample(REGIONS, 2)
            fp = f"network:packet loss {p['region']}<->{p['peer']} on {component}"
        elif kind == "nic":
            p["region"] = rng.choice(REGIONS)
            fp = f"network:NIC saturation on {host}"
        else:
            p["region"] = rng.choice(REGIONS)
            fp = f"network:DNS timeouts in {p['region']} for {component}"
    elif category == "disk":
        kind = rng.choice(tuple(_DISK_PATHS))
        p["path"], p["filler"] = kind, _DISK_PATHS[kind]
        fp = f"disk:{kind} on {host}"
    elif category == "certificate":
        kind = rng.choice(("expired", "expired", "chain"))
        p["domain"] = rng.choice(_DOMAINS[component])
        fp = f"certificate:{p['domain']} on {component}" + (" (chain)" if kind == "chain" else "")
    elif category == "dependency":
        kind = rng.choice(("errors", "errors", "slow"))
        p["dep"] = rng.choice(_owned(component))
        fp = f"dependency:{p['dep']} {'slow' if kind == 'slow' else 'errors'} for {component}"
    elif category == "deployment":
        # Only the services that handle payments can trip over an unknown payment status.
        kind = rng.choice([b for b in _BUGS if b != "unknown-status" or component in ("checkout", "payments")])
        fp = f"deployment:{component} {kind}"
    elif category == "quota":
        p["resource"] = rng.choice(_owned(component))
        p["quota"] = rng.choice(_QUOTAS[p["resource"]])
        kind = "connections" if p["quota"] == "connections" else "rate"
        fp = f"quota:{p['quota']} on {p['resource']} via {component}"
    elif category == "memory":
        p["leak"] = rng.choice(_LEAKS)
        kind = "java" if component in _JAVA else "go"
        fp = f"memory:{p['leak']} leak in {component}"
    elif category == "config":
        kind = rng.choice(("key", "key", "flag"))
        if kind == "key":
            p["key"] = rng.choice(_CONFIG_KEYS[component])
            fp = f"config:{p['key']} on {component}"
        else:
            p["flag"] = rng.choice(_FLAGS[component])
            fp = f"config:flag {p['flag']} on {component}"
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}")
    return _Cause(category, kind, component, host, tuple(p.items()), fp)


# --- text templates ---------------------------------------------------------------------------------------------

# (level, template) lines that point at the cause, keyed by (category, kind) with kind "*" for all kinds.
# Fields come from the cause (component, host, dep, path, ...), the incident (version, value, ...) or _Fresh.
_EVIDENCE_LINES: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("network", "*"): (
        ("ERROR", "dial tcp {ip}:443: connect: connection timed out"),
        ("ERROR", "read tcp {ip}:{port}->{ip2}:5432: i/o timeout"),
        ("WARN", "TCP retransmits on {host} at {retx}/s (baseline 40/s)"),
    ),
    ("network", "packet-loss"): (
        ("WARN", "packet loss {loss}% between {region} and {peer}"),
        ("ERROR", "call to {dep} failed: connect: connection timed out after 3000ms"),
        ("WARN", "mesh: {loss}% packet loss on path {region} -> {peer}, {retx} TCP retransmits/s"),
    ),
    ("network", "nic"): (
        ("WARN", "eth0 on {host}: tx queue full, {n} packets dropped"),
        ("WARN", "{host}: NIC at 99% of 10Gb/s, {n} packets dropped in the last minute"),
    ),
    ("network", "dns"): (
        ("ERROR", "dial tcp: lookup {dep}.internal.shop.example on 10.0.0.2:53: i/o timeout"),
        ("WARN", "DNS resolution for {dep}.internal.shop.example timed out after 5s (resolver 10.0.0.2, {region})"),
    ),
    ("disk", "*"): (
        ("ERROR", "write {path}/{file}: no space left on device"),
        ("ERROR", "write failed: ENOSPC ({path})"),
        ("WARN", "filesystem {path} on {host} is {full}% full"),
        ("ERROR", "failed to flush write-ahead log segment {id}: No space left on device"),
        ("WARN", "logrotate: cannot compress {path}/app.log.1: disk full"),
    ),
    ("certificate", "*"): (
        ("ERROR", "TLS handshake error from {ip}:{port}: remote error: tls: bad certificate"),
        ("WARN", "certificate for {domain} has expired ({hours} hours ago)"),
    ),
    ("certificate", "expired"): (
        ("ERROR", "x509: certificate has expired or is not yet valid: current time {now} is after {expiry}"),
        ("ERROR", "Get \"https://{domain}/health\": x509: certificate has expired or is not yet valid"),
    ),
    ("certificate", "chain"): (
        ("ERROR", "x509: certificate signed by unknown authority (serving {domain})"),
        ("ERROR", "TLS handshake error: incomplete certificate chain for {domain}"),
    ),
    ("dependency", "*"): (
        ("WARN", "circuit breaker open for {dep} ({n} failures in 30s)"),
        ("WARN", "dependency {dep} marked unhealthy by the client-side health checker"),
    ),
    ("dependency", "errors"): (
        ("ERROR", "upstream {dep} returned 503 (request id {id})"),
        ("ERROR", "upstream {dep} returned 502 Bad Gateway on POST /v2/{op}"),
        ("ERROR", "upstream {dep} returned 500: internal error, please retry (request id {id})"),
    ),
    ("dependency", "slow"): (
        ("WARN", "upstream {dep} responded in {slow}ms (SLO 800ms)"),
        ("ERROR", "upstream {dep} returned 504 after {slow}ms"),
    ),
    ("deployment", "*"): (
        ("INFO", "rollout of {component} v{version} started in {region} (canary 10%)"),
        ("INFO", "rollout of {component} v{version} promoted to 100%"),
    ),
    ("deployment", "nil-pointer"): (
        ("FATAL", "{nil_crash}"),
        ("ERROR", "{nil_trace}"),
    ),
    ("deployment", "missing-migration"): (
        ("ERROR", "{sql_error} column \"{column}\" does not exist"),
        ("ERROR", "query failed on orders-db: column \"{column}\" does not exist (v{version})"),
    ),
    ("deployment", "unknown-status"): (
        ("ERROR", "unknown payment status \"{status}\" in response (v{version})"),
        ("FATAL", "{enum_crash}"),
    ),
    ("deployment", "pool-size"): (
        ("ERROR", "{component} v{version}: connection pool exhausted (max_open=2, waiting={n})"),
        ("WARN", "pool settings changed in v{version}: max_open 50 -> 2"),
    ),
    ("quota", "*"): (
        ("ERROR", "{resource} responded 429 Too Many Requests (quota '{quota}')"),
        ("ERROR", "QuotaExceeded: {quota} on {resource} ({used}/{limit})"),
        ("WARN", "request throttled by {resource}, retrying in {ms}ms"),
        ("WARN", "{quota} quota at {full}% on {resource}"),
    ),
    ("quota", "connections"): (
        ("ERROR", "FATAL: sorry, too many connections for role \"{component}\" on {resource}"),
    ),
    ("memory", "*"): (
        ("ERROR", "container {component} on {host} OOMKilled (limit 2Gi, restart {restarts})"),
        ("WARN", "memory usage {full}% of limit on {host}"),
        ("WARN", "{leak} holds {big} entries (expected < 10000)"),
    ),
    ("memory", "java"): (
        ("FATAL", "java.lang.OutOfMemoryError: Java heap space"),
        ("WARN", "java.lang.OutOfMemoryError: GC overhead limit exceeded"),
    ),
    ("memory", "go"): (
        ("FATAL", "fatal error: runtime: out of memory"),
        ("ERROR", "runtime: out of memory: cannot allocate {bytes}-byte block"),
    ),
    ("config", "key"): (
        ("INFO", "config push {push} applied on {host}: {key} = {value}"),
        ("ERROR", "invalid value for key '{key}': {value} (expected {expected})"),
        ("ERROR", "failed to parse config: {key}: {value} is out of range"),
    ),
    ("config", "flag"): (
        ("INFO", "feature flag {flag} enabled for 100% of traffic"),
        ("ERROR", "{flag}: code path failed: {flag_error}"),
        ("INFO", "feature flag {flag} enabled in {region}"),
    ),
}

# Consequences that every outage shares: they say something is wrong, not why.
_CONSEQUENCE_LINES: tuple[tuple[str, str], ...] = (
    ("ERROR", "POST /api/v1/{op} 500 in {ms}ms"),
    ("ERROR", "GET /api/v1/{op} 504 in {ms}ms"),
    ("ERROR", "request {id} failed after 3 retries"),
    ("ERROR", "context deadline exceeded while handling {op}"),
    ("WARN", "health check /healthz failed on {host}"),
    ("WARN", "error budget burn rate {burn}x over the last 5 minutes"),
)
_CRASH_LINES: tuple[tuple[str, str], ...] = (
    ("WARN", "Back-off restarting failed container {component} on {host}"),
    ("WARN", "container {component} on {host} restarted (exit code {exit})"),
)

# Routine lines of a healthy service; none matches an EVIDENCE pattern.
_NOISE_LINES: tuple[tuple[str, str], ...] = (
    ("INFO", "GET /api/v1/products/{n} 200 in {fast}ms"),
    ("INFO", "cache hit ratio {ratio} on session-cache"),
    ("INFO", "scheduled job {job} finished in {n}s"),
    ("WARN", "slow query {ms}ms: SELECT * FROM orders WHERE customer_id = $1"),
    ("WARN", "retrying request {id} (attempt 2/3)"),
    ("INFO", "GC pause {fast}ms"),
    ("DEBUG", "session {id} refreshed"),
    ("WARN", "deprecated endpoint /v1/cart called by client {client}"),
    ("INFO", "connection pool stats: active={n} idle={fast}"),
    ("INFO", "autoscaler: {component} at {replicas} replicas, target cpu 60%"),
    ("WARN", "user {id} locked out after 5 failed logins"),
    ("INFO", "order {id} placed, {n} items"),
    ("DEBUG", "feature evaluation cache refreshed ({n} flags)"),
    ("INFO", "search index alias points to catalog-{id}"),
)

_ALERTS = {
    "5xx": "HTTP 5xx rate above 5% on {service}",
    "latency": "p99 latency above 2s on {service}",
    "health": "Health check failing on {host}",
    "burn": "Error budget burn rate above 10x on {service}",
    "restarts": "Pod restarts above threshold on {service}",
    "synthetic": "Synthetic checkout probe failing in {region}",
    "drop": "Request rate dropped below baseline on {service}",
    "timeouts": "Timeouts calling {dep} from {service}",
    "disk": "Disk usage above 90% on {host}",
    "memory": "Memory usage above 90% on {host}",
    "tls": "TLS errors on {service}",
    "throttled": "Throttled requests on {service}",
}
# Which symptoms each cause raises, with weights: most titles occur under several categories.
_SYMPTOMS: dict[str, dict[str, int]] = {
    "network": {"latency": 3, "timeouts": 2, "health": 1, "synthetic": 1, "drop": 1, "burn": 1},
    "disk": {"health": 3, "latency": 2, "5xx": 1, "disk": 1, "burn": 1},
    "certificate": {"5xx": 2, "health": 2, "synthetic": 2, "drop": 2, "tls": 1},
    "dependency": {"5xx": 3, "latency": 2, "timeouts": 2, "burn": 1, "synthetic": 1},
    "deployment": {"5xx": 3, "restarts": 2, "health": 2, "burn": 1, "latency": 1},
    "quota": {"latency": 2, "5xx": 2, "timeouts": 1, "throttled": 1, "burn": 1},
    "memory": {"restarts": 2, "health": 2, "5xx": 2, "latency": 1, "memory": 1},
    "config": {"5xx": 3, "restarts": 1, "synthetic": 1, "drop": 1, "burn": 1},
}

_RESOLUTIONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("network", "packet-loss"): (
        "Packet loss on the {region}-{peer} inter-region link; the network team moved traffic to the backup path.",
        "Degraded transit between {region} and {peer} caused timeouts in {component}; failed over and opened a ticket "
        "with the carrier.",
    ),
    ("network", "nic"): (
        "NIC on {host} was saturated by a backup job; drained the host and moved the job off-peak.",
        "Host {host} dropped packets at line rate; rescheduled the bulk transfer and capped its bandwidth.",
    ),
    ("network", "dns"): (
        "DNS resolvers in {region} timed out under load; restarted the resolver pool and added a second upstream.",
        "Name resolution for {dep} failed in {region}; enabled the node-local DNS cache on {component}.",
    ),
    ("disk", "*"): (
        "The {path} volume on {host} filled up with {filler}; cleaned up and raised the disk alert threshold.",
        "Disk full on {host} ({path}) because of {filler}; freed space and added a retention policy.",
        "Ran out of space on {path} on {host} ({filler}); cleaned up, cordoned and recycled the node.",
    ),
    ("certificate", "expired"): (
        "The certificate for {domain} expired because the rotation job failed silently; renewed it and added an "
        "expiry alert.",
        "Expired TLS certificate on {domain} served by {component}; reissued and fixed the ACME renewal cron.",
    ),
    ("certificate", "chain"): (
        "After a rotation, {component} served {domain} without the intermediate certificate; redeployed the full "
        "chain.",
        "Incomplete certificate chain for {domain} on {component}; added the intermediate and a chain check to CI.",
    ),
    ("dependency", "errors"): (
        "The {dep} service returned 5xx during its own outage; {component} ran degraded until it recovered.",
        "Outage of {dep} broke {component}; waited for recovery and tuned the circuit breaker.",
    ),
    ("dependency", "slow"): (
        "Slow responses from {dep} (p99 over 5s) exhausted the workers of {component}; lowered the client timeout.",
        "Latency regression in {dep} backed up {component}; added a timeout and a cached fallback.",
    ),
    ("deployment", "*"): (
        "Release v{version} of {component} introduced a regression ({bug}); rolled back to the previous version.",
        "Bad release of {component} ({bug}); rollback fixed it, the fix ships behind a canary check.",
        "Rolled back {component} v{version}: {bug}.",
    ),
    ("quota", "*"): (
        "Calls from {component} exceeded the {quota} quota on {resource}; raised the limit and added backoff.",
        "Traffic growth hit the {quota} limit of {resource}; requested a quota increase and enabled caching.",
    ),
    ("memory", "*"): (
        "Memory leak in the {leak} of {component}; pods were OOMKilled in a loop. Restarted them and bounded the leak.",
        "The {leak} of {component} grew without bound; raised the memory limit temporarily and shipped a fix.",
    ),
    ("config", "key"): (
        "Config push set {key} to an invalid value on {component}; reverted the push and added schema validation.",
        "Bad value for {key} broke {component}; rolled back the config change.",
    ),
    ("config", "flag"): (
        "Enabling the {flag} flag broke {component}; turned the flag off.",
        "Feature flag {flag} exposed an untested code path in {component}; disabled it and fixed the path.",
    ),
}
_BUG_TEXT = {
    "nil-pointer": "a null dereference in the response encoder",
    "missing-migration": "the schema migration did not run before the release",
    "unknown-status": "an unhandled payment status",
    "pool-size": "a connection pool size of 2 in the release config",
}
_FLAG_ERRORS = (
    "tax rate missing for region",
    "nil response from pricing service",
    "unsupported currency EUR",
    "cannot decode legacy session",
)


def _ip(r: random.Random) -> str:
    return f"10.{r.randint(0, 31)}.{r.randint(0, 255)}.{r.randint(2, 254)}"


# Fields that take a fresh random value each time a template uses them: ids, addresses, counts, durations.
_FRESH: dict[str, Callable[[random.Random], str]] = {
    "id": lambda r: f"{r.getrandbits(32):08x}",
    "ip": _ip,
    "ip2": _ip,
    "port": lambda r: str(r.randint(32768, 60999)),
    "n": lambda r: str(r.randint(2, 480)),
    "big": lambda r: str(r.randint(80_000, 4_000_000)),
    "bytes": lambda r: str(r.choice((8192, 65536, 1048576, 4194304))),
    "ms": lambda r: str(r.randint(1200, 9800)),
    "slow": lambda r: str(r.randint(2500, 15000)),
    "fast": lambda r: str(r.randint(3, 90)),
    "loss": lambda r: str(r.randint(4, 28)),
    "retx": lambda r: str(r.randint(300, 2600)),
    "full": lambda r: str(r.randint(95, 100)),
    "used": lambda r: str(r.randint(50_001, 90_000)),
    "limit": lambda r: str(r.choice((20_000, 40_000, 50_000))),
    "hours": lambda r: str(r.randint(1, 30)),
    "restarts": lambda r: str(r.randint(2, 9)),
    "burn": lambda r: str(r.randint(12, 60)),
    "exit": lambda r: r.choice(("1", "2", "137", "139")),
    "ratio": lambda r: f"{r.uniform(0.6, 0.97):.2f}",
    "replicas": lambda r: str(r.randint(3, 12)),
    "file": lambda r: r.choice(("app.log", "events.bin", "export.csv", "segment-0042")),
    "op": lambda r: r.choice(("checkout", "cart", "orders", "search", "payments/capture", "login")),
    "job": lambda r: r.choice(("reindex-catalog", "expire-carts", "send-receipts", "sync-prices")),
    "client": lambda r: r.choice(("ios-4.2", "android-7.1", "partner-feed", "web-legacy")),
}


class _Fresh(dict[str, str]):
    """Template values: the cause's and the incident's fixed ones, and a fresh random value for any _FRESH field."""

    def __init__(self, rng: random.Random, fixed: dict[str, str]) -> None:
        super().__init__(fixed)
        self._rng = rng

    def __missing__(self, key: str) -> str:
        return _FRESH[key](self._rng)


def _fill(rng: random.Random, template: str, fixed: dict[str, str]) -> str:
    return template.format_map(_Fresh(rng, fixed))


# --- the incident ----------------------------------------------------------------------------------------------


@dataclass
class Incident:
    """One incident: the alert, the ground truth, and the telemetry that the monitoring API serves.

    ``telemetry`` holds plain JSON values:

    * ``logs``: ``[{"t", "component", "host", "level", "message"}]`` in time order, over the hour around the alert;
    * ``metrics``: ``{name: {scope: [[minute, value], ...]}}`` where minute is relative to the alert (negative
      before it) and scope is what the series measures: the service (error_rate, p99_latency_ms, requests_per_s,
      restarts, packet_loss_pct, dns_errors_per_s, cert_days_left, config_version), one of its hosts (cpu_pct,
      memory_used_pct, disk_used_pct, tcp_retransmits), or a dependency (upstream_error_rate, upstream_p99_ms,
      quota_used_pct);
    * ``events``: ``[{"t", "kind", "component", "detail"}]`` change events before the alert, in time order.
    """

    id: str
    day: float
    time: str
    service: str
    alert: str
    severity: int
    category: str
    fingerprint: str
    resolution: str
    telemetry: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """All fields as a plain dict that ``json.dumps`` accepts (the telemetry is a deep copy)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["telemetry"] = json.loads(json.dumps(self.telemetry))  # much faster than copy.deepcopy
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Incident:
        """The inverse of ``to_json``. Tuples from other producers become lists, so round trips compare equal."""
        values = dict(data)
        values["telemetry"] = json.loads(json.dumps(values.get("telemetry", {})))
        values["day"] = float(values["day"])
        values["severity"] = int(values["severity"])
        return cls(**values)


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- metrics --------------------------------------------------------------------------------------------------


def _series(
    rng: random.Random, base: float, noise: float, *, onset: float | None = None, peak: float | None = None,
    ramp: float = 4.0, lo: float = 0.0, hi: float | None = None, digits: int = 2,
) -> list[list[float]]:
    """A noisy baseline that, from ``onset`` on, moves to ``peak`` over ``ramp`` minutes (when both are given)."""
    points = []
    for m in _MINUTES:
        level = base
        if onset is not None and peak is not None and m >= onset:
            level = base + (peak - base) * min(1.0, (m - onset + 1) / max(ramp, 1.0))
        value = level + rng.gauss(0.0, noise * (2.0 if level != base else 1.0))  # a disturbed signal is noisier
        value = max(lo, value if hi is None else min(hi, value))
        points.append([float(m), round(value, digits)])
    return points


def _counter(rng: random.Random, onset: float | None, rate: float) -> list[list[float]]:
    """A cumulative count (container restarts) that starts climbing at ``onset``."""
    total, points = 0, []
    for m in _MINUTES:
        if onset is not None and m >= onset and rng.random() < rate:
            total += 1
        points.append([float(m), float(total)])
    return points


def _metrics(rng: random.Random, cause: _Cause, service: str, host: str, dep: str, onset: float) -> dict[str, Any]:
    """Metrics for one incident: the causal series show the anomaly, the service's golden signals show consequences,
    and a random choice of other series stay at plausible baselines so that their presence alone proves nothing."""
    cat, v = cause.category, cause.values()
    err0, lat0, rps0 = rng.uniform(0.1, 0.9), rng.uniform(120, 420), rng.uniform(80, 900)
    # How the golden signals react, per cause: (error rate peak %, latency multiplier, traffic multiplier).
    err_peak, lat_mult, rps_mult = {
        "network": (rng.uniform(3, 15), rng.uniform(5, 12), 0.9),
        "disk": (rng.uniform(2, 10), rng.uniform(3, 9), 1.0),
        "certificate": (rng.uniform(20, 80), 1.0, rng.uniform(0.3, 0.7)),
        "dependency": (rng.uniform(8, 45), rng.uniform(2, 8), 1.0),
        "deployment": (rng.uniform(10, 60), rng.uniform(1.2, 3), 1.0),
        "quota": (rng.uniform(5, 30), rng.uniform(3, 10), rng.uniform(1.3, 2.0)),
        "memory": (rng.uniform(5, 25), rng.uniform(2, 6), 1.0),
        "config": (rng.uniform(10, 70), rng.uniform(1.0, 1.5), rng.uniform(0.6, 1.0)),
    }[cat]  # fmt: skip
    m: dict[str, dict[str, list[list[float]]]] = {
        "error_rate": {service: _series(rng, err0, err0 / 5, onset=onset, peak=err_peak, hi=100)},
        "p99_latency_ms": {service: _series(rng, lat0, lat0 / 12, onset=onset, peak=lat0 * lat_mult, digits=0)},
        "requests_per_s": {service: _series(rng, rps0, rps0 / 25, onset=onset - (15 if cat == "quota" else 0),
                                            peak=rps0 * rps_mult, ramp=10, digits=0)},
        "cpu_pct": {host: _series(rng, rng.uniform(20, 55), 3, hi=100, digits=1)},
    }  # fmt: skip
    mem0 = rng.uniform(35, 70)
    if cat == "memory":
        m["memory_used_pct"] = {host: _series(rng, mem0, 1.5, onset=onset - 30, peak=98, ramp=30, hi=100, digits=1)}
        m["restarts"] = {service: _counter(rng, onset, 0.45)}
    else:
        m["memory_used_pct"] = {host: _series(rng, mem0, 1.5, hi=100, digits=1)}
    # The causal series (memory's are above), missing now and then as real monitoring has gaps.
    if rng.random() < 0.93:
        if cat == "network" and cause.kind == "dns":
            m["dns_errors_per_s"] = {service: _series(rng, 0.1, 0.1, onset=onset, peak=rng.uniform(20, 300), digits=1)}
        elif cat == "network":
            m["packet_loss_pct"] = {service: _series(rng, 0.05, 0.03, onset=onset, peak=rng.uniform(4, 25))}
            m["tcp_retransmits"] = {host: _series(rng, 40, 6, onset=onset, peak=rng.uniform(300, 2500), digits=0)}
        elif cat == "disk":
            m["disk_used_pct"] = {host: _series(rng, rng.uniform(72, 88), 0.3, onset=onset - 20, peak=100, ramp=20,
                                                hi=100, digits=1)}  # fmt: skip
        elif cat == "certificate":
            m["cert_days_left"] = {service: _series(rng, -rng.uniform(0.05, 1.2), 0.0, lo=-30, digits=2)}
        elif cat == "dependency":
            if cause.kind == "slow":
                peak = rng.uniform(4000, 15000)
                m["upstream_p99_ms"] = {dep: _series(rng, 300, 30, onset=onset, peak=peak, digits=0)}
            else:
                m["upstream_error_rate"] = {dep: _series(rng, 0.2, 0.1, onset=onset, peak=rng.uniform(20, 90), hi=100)}
        elif cat == "deployment":
            crashes = cause.kind in ("nil-pointer", "unknown-status")
            m["restarts"] = {service: _counter(rng, onset, 0.3 if crashes else 0.05)}
        elif cat == "quota":
            m["quota_used_pct"] = {v["resource"]: _series(rng, rng.uniform(60, 80), 1.0, onset=onset - 15, peak=100,
                                                          ramp=15, hi=100, digits=1)}  # fmt: skip
        elif cat == "config":
            m["config_version"] = {service: [[float(x), float(100 + (x >= onset))] for x in _MINUTES]}
    # Baselines of other series, so that a series being present is no clue.
    baselines = {
        "disk_used_pct": lambda: {host: _series(rng, rng.uniform(30, 75), 0.2, hi=100, digits=1)},
        "cert_days_left": lambda: {service: _series(rng, rng.uniform(12, 85), 0.0, digits=2)},
        "packet_loss_pct": lambda: {service: _series(rng, 0.05, 0.03)},
        "tcp_retransmits": lambda: {host: _series(rng, 40, 6, digits=0)},
        "upstream_error_rate": lambda: {dep: _series(rng, 0.2, 0.1, hi=100)},
        "quota_used_pct": lambda: {
            rng.choice(DATASTORES + EXTERNAL): _series(rng, rng.uniform(20, 70), 1.0, hi=100, digits=1)
        },
        "restarts": lambda: {service: _counter(rng, None, 0.0)},
        "upstream_p99_ms": lambda: {dep: _series(rng, 300, 30, digits=0)},
        "config_version": lambda: {service: [[float(x), 100.0] for x in _MINUTES]},
        "dns_errors_per_s": lambda: {service: _series(rng, 0.1, 0.1, digits=1)},
    }  # fmt: skip
    for name, make in baselines.items():
        if name not in m and rng.random() < 0.45:
            m[name] = make()
    return dict(sorted(m.items()))


# --- one incident ---------------------------------------------------------------------------------------------


def _runtime_errors(service: str, status: str) -> dict[str, str]:
    """How a crash reads in the service's runtime: Go services panic, the Java ones throw."""
    if service in _JAVA:
        return {
            "nil_crash": 'java.lang.NullPointerException: Cannot invoke "Order.total()" because "order" is null',
            "nil_trace": f"at com.shop.{service}.render.ResponseEncoder.encode(ResponseEncoder.java:212)",
            "enum_crash": f"java.lang.IllegalArgumentException: No enum constant PaymentStatus.{status}",
            "sql_error": "org.postgresql.util.PSQLException: ERROR:",
        }
    return {
        "nil_crash": "panic: runtime error: invalid memory address or nil pointer dereference",
        "nil_trace": f"[signal SIGSEGV: segmentation violation] {service}/internal/render.(*Encoder).Encode",
        "enum_crash": f"panic: unhandled enum value {status} in {service}/internal/orders.StatusFrom",
        "sql_error": "pq:",
    }


def _make_incident(rng: random.Random, index: int, seconds: int, cause: _Cause, previous: str | None) -> Incident:
    """The telemetry of one occurrence of ``cause``: fresh numbers, noise and symptom, the cause's fixed details."""
    at = START + timedelta(seconds=seconds)
    service = cause.component
    host = cause.host if cause.category in ("disk", "memory") or cause.kind == "nic" else _host(rng, service)
    fixed = cause.values()
    fixed["host"] = host
    fixed.setdefault("region", rng.choice(REGIONS))
    fixed.setdefault("dep", fixed.get("resource") or rng.choice(DEPENDENCIES[service]))
    major, minor = rng.randint(1, 4), rng.randint(1, 40)
    status = rng.choice(("PARTIALLY_CAPTURED", "PENDING_REVIEW", "AUTHORIZED_3DS"))
    fixed.update(
        version=f"{major}.{minor}.{rng.randint(0, 9)}",
        previous_version=f"{major}.{minor - 1}.{rng.randint(0, 9)}",
        value=rng.choice(("0", "-1", "\"\"", "30s", "1e9", "null")),
        expected=rng.choice(("a positive integer", "a duration in ms", "an integer between 1 and 500")),
        push=f"cp-{rng.randint(10000, 99999)}",
        column=rng.choice(("shipping_tier", "tax_region", "promo_code_id", "fulfilment_state")),
        status=status,
        flag_error=rng.choice(_FLAG_ERRORS),
        bug=_BUG_TEXT.get(cause.kind, ""),
        **_runtime_errors(service, status),
        now=_iso(at - timedelta(minutes=rng.randint(1, 30))),
        expiry=_iso(at - timedelta(hours=rng.randint(1, 30))),
        service=service,
    )
    onset = float(rng.randint(-30, -4))  # minutes before the alert when the trouble starts
    change_at = onset  # when the causal change went out, for causes that are changes
    if cause.category in ("deployment", "config"):
        onset = float(rng.randint(-24, -4))
        change_at = onset - rng.uniform(0.5, 4)

    def stamp(minute: float) -> str:
        return _iso(at + timedelta(minutes=minute, seconds=rng.randint(0, 59)))

    logs: list[tuple[float, dict[str, str]]] = []

    def log(minute: float, level: str, template: str, values: dict[str, str] = fixed) -> None:
        line = {"t": stamp(minute), "component": values["component"], "host": values["host"], "level": level,
                "message": _fill(rng, template, values)}  # fmt: skip
        logs.append((minute, line))

    # Evidence of the cause, from the onset to a little after the alert.
    if rng.random() >= _P_NO_EVIDENCE_LOGS:
        pool = _EVIDENCE_LINES.get((cause.category, "*"), ()) + _EVIDENCE_LINES.get((cause.category, cause.kind), ())
        for level, template in rng.sample(pool, min(len(pool), rng.randint(2, 4))):
            if level == "INFO":  # the change itself (a rollout, a config push, a flag): logged once, when it happens
                log(change_at + rng.uniform(0, 3), level, template)
                continue
            for _ in range(rng.choice((1, 1, 2, 3))):
                log(rng.uniform(onset - 1, 12), level, template)
    # Consequences every outage shares, and crash loops where the process dies.
    for level, template in rng.sample(_CONSEQUENCE_LINES, rng.randint(2, 4)):
        log(rng.uniform(onset, 15), level, template)
    if cause.category in ("memory", "deployment", "config") and rng.random() < 0.6:
        log(rng.uniform(onset, 15), *rng.choice(_CRASH_LINES))
    # Routine noise over the whole window, from the service and its neighbours.
    neighbours = [c for c in DEPENDENCIES[service] if c in COMPONENTS] or [service]
    for _ in range(rng.randint(5, 12)):
        component = service if rng.random() < 0.6 else rng.choice(neighbours)
        values = {**fixed, "component": component, "host": _host(rng, component)}
        log(rng.uniform(-45, 15), *rng.choice(_NOISE_LINES), values)
    # Now and then one line that points at another cause.
    if rng.random() < _P_MISLEADING:
        other = rng.choice([c for c in CATEGORIES if c != cause.category])
        decoy = _new_cause(rng, other)
        decoy_values = {**fixed, **decoy.values(), "component": service, "host": host}
        pool = _EVIDENCE_LINES.get((other, "*"), ()) + _EVIDENCE_LINES.get((other, decoy.kind), ())
        level, template = rng.choice(pool)
        log(rng.uniform(-40, 10), "WARN" if level == "INFO" else level, template, decoy_values)
    logs.sort(key=lambda item: (item[1]["t"], item[0]))

    events = _events(rng, cause, service, at, onset, change_at, fixed)
    metrics = _metrics(rng, cause, service, host, fixed["dep"], onset)

    weights = _SYMPTOMS[cause.category]
    symptom = rng.choices(list(weights), weights=list(weights.values()))[0]
    alert = _ALERTS[symptom].format_map(fixed)
    severity = rng.choices((1, 2, 3, 4), weights=(1, 3, 4, 2))[0]
    if cause.category == "certificate" or service in ("checkout", "payments"):
        severity = max(1, severity - 1)

    templates = _RESOLUTIONS.get((cause.category, cause.kind)) or _RESOLUTIONS[(cause.category, "*")]
    resolution = _fill(rng, rng.choice(templates), fixed)
    if previous is not None and rng.random() < 0.3:
        resolution += f" Same root cause as {previous}."
    return Incident(
        id=f"INC-{index:04d}",
        day=round(seconds / 86400, 6),
        time=_iso(at),
        service=service,
        alert=alert,
        severity=severity,
        category=cause.category,
        fingerprint=cause.fingerprint,
        resolution=resolution,
        telemetry={"logs": [line for _, line in logs], "metrics": metrics, "events": events},
    )


def _events(
    rng: random.Random, cause: _Cause, service: str, at: datetime, onset: float, change_at: float, fixed: dict[str, str]
) -> list[dict[str, str]]:
    """Change events before the alert: the causal change (for causes that are changes) and routine ones as noise."""
    events: list[tuple[float, dict[str, str]]] = []  # (minutes before the alert, event)

    def add(before: float, kind: str, component: str, detail: str) -> None:
        t = _iso(at - timedelta(minutes=before, seconds=rng.randint(0, 59)))
        events.append((before, {"t": t, "kind": kind, "component": component, "detail": detail}))

    v = fixed
    if cause.category == "deployment" and rng.random() < 0.95:
        detail = f"rollout of {service} v{v['version']} to {v['region']} (from v{v['previous_version']})"
        add(-change_at, "deployment", service, detail)
    elif cause.category == "config" and rng.random() < 0.92:
        if cause.kind == "flag":
            add(-change_at, "feature_flag", service, f"{v['flag']} enabled for 100% of traffic")
        else:
            add(-change_at, "config_push", service, f"{v['push']}: {v['key']} changed to {v['value']}")
    elif cause.category == "certificate" and rng.random() < 0.5:
        detail = f"cert rotation for {v['domain']} failed: ACME order pending"
        add(rng.uniform(24 * 60, 6 * 24 * 60), "cert_rotation", service, detail)
    elif cause.category == "quota" and rng.random() < 0.5:
        detail = f"{service} scaled from {rng.randint(3, 6)} to {rng.randint(10, 16)} replicas"
        add(-onset + rng.uniform(10, 40), "scale", service, detail)

    # Routine changes elsewhere (or long before): hours ago mostly, but now and then inside the last hour.
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        component = rng.choice(COMPONENTS)
        if component == service and cause.category in ("deployment", "config"):
            component = rng.choice([c for c in COMPONENTS if c != service])
        before = rng.uniform(20, 90) if rng.random() < 0.12 else rng.uniform(120, 72 * 60)
        kind = rng.choices(_EVENT_KINDS, weights=(5, 3, 2, 1, 2))[0]
        if kind == "deployment":
            version = f"{rng.randint(1, 4)}.{rng.randint(0, 40)}.{rng.randint(0, 9)}"
            detail = f"rollout of {component} v{version} to {rng.choice(REGIONS)}"
        elif kind == "config_push":
            key = rng.choice(_CONFIG_KEYS[component])
            detail = f"cp-{rng.randint(10000, 99999)}: {key} changed to {rng.randint(2, 900)}"
        elif kind == "feature_flag":
            detail = f"{rng.choice(_FLAGS[component])} enabled for {rng.choice((1, 5, 10, 25))}% of traffic"
        elif kind == "cert_rotation":
            detail = f"cert rotation for {rng.choice(_DOMAINS[component])} succeeded, valid for 90 days"
        else:
            detail = f"{component} scaled from {rng.randint(3, 6)} to {rng.randint(6, 10)} replicas"
        add(before, kind, component, detail)
    events.sort(key=lambda item: -item[0])
    return [e for _, e in events]


# --- the timeline ---------------------------------------------------------------------------------------------


def _apportion(n: int) -> list[str]:
    """Exactly n categories in the target proportions (largest remainders), so that a small n still has each."""
    quotas = {c: _CATEGORY_WEIGHTS[c] * n for c in CATEGORIES}
    counts = {c: math.floor(q) for c, q in quotas.items()}
    by_remainder = sorted(CATEGORIES, key=lambda c: (-(quotas[c] - counts[c]), CATEGORIES.index(c)))
    for c in by_remainder[: n - sum(counts.values())]:
        counts[c] += 1
    return [c for c in CATEGORIES for _ in range(counts[c])]


def generate(n: int = 400, *, seed: int = 0, days: float = 60.0) -> list[Incident]:
    """``n`` incidents over ``days`` days, sorted by time with ids INC-0001... in that order; the same seed gives
    the same incidents.

    Recurrence follows what RCACopilot reports from production: about a quarter of incidents have a new root
    cause, and a repeat mostly comes within 20 days of the previous occurrence of the same fingerprint. After
    each occurrence a fingerprint may be fixed for good and stop recurring; without that, the first causes of a
    category would keep coming back and crowd out the rest.
    """
    if n < 0 or days <= 0:
        raise ValueError(f"need n >= 0 and days > 0, got n={n}, days={days}")
    span = int(days * 86400)
    if n > span:
        raise ValueError(f"{n} incidents do not fit in {days} days at one per second")
    rng = random.Random(seed)
    times = sorted(rng.sample(range(span), n))
    categories = _apportion(n)
    rng.shuffle(categories)
    causes: dict[str, _Cause] = {}  # every fingerprint so far, fixed or not
    active: dict[str, _Cause] = {}  # the ones that can still recur
    last: dict[str, tuple[float, str]] = {}  # fingerprint -> (day, incident id) of its latest occurrence
    repeats = late = 0
    incidents = []
    for index, (seconds, category) in enumerate(zip(times, categories), start=1):
        day = seconds / 86400
        pool = [c for c in causes.values() if c.category == category]
        # Recent repeats come from fingerprints not yet fixed; a long-quiet one may come back even if it was fixed,
        # as fixes regress and workarounds expire.
        recent = [c for c in pool if c.fingerprint in active and day - last[c.fingerprint][0] <= RECENT_DAYS]
        older = [c for c in pool if day - last[c.fingerprint][0] > RECENT_DAYS]
        cause = None
        if (recent or older) and rng.random() >= _P_NEW:
            # Early in the timeline nothing is older than RECENT_DAYS, so a fixed chance would undershoot the late
            # repeats; catching up on the shortfall whenever an older fingerprint is available keeps the share near
            # the target over the whole timeline.
            behind = late < (1 - _P_RECENT) * (repeats + 1)
            late_pick = bool(older) and (not recent or behind)
            cause = rng.choice(older if late_pick else recent)
            repeats += 1
            late += late_pick
        if cause is None:
            for _ in range(20):
                candidate = _new_cause(rng, category)
                if candidate.fingerprint not in causes:
                    cause = causes[candidate.fingerprint] = active[candidate.fingerprint] = candidate
                    break
            else:  # (nearly) every instance of this category is taken: an earlier one recurs instead
                cause = rng.choice(pool)
        previous = last.get(cause.fingerprint, (0.0, None))[1]
        incident = _make_incident(rng, index, seconds, cause, previous)
        last[cause.fingerprint] = (day, incident.id)
        if rng.random() < _P_FIXED:
            active.pop(cause.fingerprint, None)
        incidents.append(incident)
    return incidents


def split(incidents: Sequence[Incident], *, held_out_days: float = 10.0) -> tuple[list[Incident], list[Incident]]:
    """A time split as in deployment: (history, held_out), held_out being the incidents of the last ``held_out_days``.

    The timeline ends at the end of the day of the last incident (``ceil`` of its day), so with the default 60-day
    timeline the held-out part is days 50 to 60.
    """
    if not incidents:
        return [], []
    cutoff = math.ceil(max(i.day for i in incidents)) - held_out_days
    ordered = sorted(incidents, key=lambda i: i.day)
    return [i for i in ordered if i.day < cutoff], [i for i in ordered if i.day >= cutoff]


def evidence_hits(incident: Incident | dict[str, Any]) -> dict[str, int]:
    """How many log lines and change events match each category's EVIDENCE patterns: a keyword baseline that the
    demo's handlers can start from, and the tests use to check that the evidence is there but not alone."""
    telemetry = incident.telemetry if isinstance(incident, Incident) else incident["telemetry"]
    texts = [line["message"] for line in telemetry["logs"]]
    texts += [f"{e['kind']}: {e['detail']}" for e in telemetry["events"]]
    return {c: sum(1 for text in texts if pattern.search(text)) for c, pattern in _EVIDENCE_RE.items()}


def stats(incidents: Sequence[Incident]) -> dict[str, Any]:
    """Counts per category, the share of incidents with a new fingerprint, and the share of repeats that come
    within RECENT_DAYS of the previous occurrence of their fingerprint."""
    seen: dict[str, float] = {}
    new = recent = 0
    for incident in sorted(incidents, key=lambda i: i.day):
        if incident.fingerprint not in seen:
            new += 1
        elif incident.day - seen[incident.fingerprint] <= RECENT_DAYS:
            recent += 1
        seen[incident.fingerprint] = incident.day
    repeats = len(incidents) - new
    counts = Counter(i.category for i in incidents)
    return {
        "categories": {c: counts.get(c, 0) for c in CATEGORIES},
        "new_share": new / len(incidents) if incidents else 0.0,
        "recent_repeat_share": recent / repeats if repeats else 0.0,
    }


# --- the monitoring API ---------------------------------------------------------------------------------------


class Monitor:
    """The monitoring API that incident handlers query, over one incident's telemetry (read-only).

    Metrics are stored per scope (``{name: {scope: series}}``, see ``Incident``): a scope is the service, one of
    its hosts (``checkout-3``), or a dependency (``orders-db``). ``metric(name, component)`` takes the scope
    exactly, or a component name, which also finds the series of that component's hosts. Without a component
    it returns the alert's service's series, else that of a host of the service, else the first scope that has
    the metric. Every answer is a copy, so a handler cannot alter what the next one sees.
    """

    def __init__(self, incident: Incident | dict[str, Any]) -> None:
        if not isinstance(incident, Incident):
            # A new incident has no label yet: what the handlers may see is the alert and the telemetry.
            unknown = {"category": "", "fingerprint": "", "resolution": ""}
            incident = Incident.from_json({**unknown, **incident})
        self._incident = incident
        self._at = _parse_iso(self._incident.time)

    def alert(self) -> dict[str, Any]:
        """The alert as the on-call engineer first sees it: title, service, severity and time."""
        i = self._incident
        return {"title": i.alert, "service": i.service, "severity": i.severity, "time": i.time}

    def logs(
        self, component: str | None = None, *, level: str | None = None, grep: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Log lines in time order, the last ``limit`` that match, as ``tail`` shows them.

        ``component`` matches the line's component or host; ``level`` is a level or '|'-separated levels
        ("ERROR|FATAL"), case-insensitive; ``grep`` is a case-insensitive substring, or '|'-separated
        alternatives of which any may match (plain text, not a regex).
        """
        levels = {x.strip().upper() for x in level.split("|") if x.strip()} if level else None
        needles = [x.strip().lower() for x in grep.split("|") if x.strip()] if grep else None
        found = []
        for line in self._incident.telemetry["logs"]:
            if component is not None and component not in (line["component"], line.get("host")):
                continue
            if levels is not None and line["level"].upper() not in levels:
                continue
            if needles is not None and not any(n in line["message"].lower() for n in needles):
                continue
            found.append(dict(line))
        return found[-limit:] if limit > 0 else []

    def metric_names(self, component: str | None = None) -> list[str]:
        """The metric names, sorted; with ``component``, only those it has a series for (see the class docstring)."""
        metrics = self._incident.telemetry["metrics"]
        return sorted(name for name, scopes in metrics.items() if component is None or self._scope(scopes, component))

    def metric(self, name: str, component: str | None = None) -> list[tuple[float, float]]:
        """The series ``[(minute, value)]`` of a metric, minute relative to the alert (negative before it).

        Raises KeyError naming the available metrics (or the scopes that have this one) when there is no match.
        """
        metrics = self._incident.telemetry["metrics"]
        if name not in metrics:
            raise KeyError(f"no metric {name!r}; available: {', '.join(sorted(metrics))}")
        scopes = metrics[name]
        if component is None:
            scope = self._scope(scopes, self._incident.service) or next(iter(scopes))
        else:
            scope = self._scope(scopes, component)
            if scope is None:
                raise KeyError(f"metric {name!r} has no series for {component!r}; it has: {', '.join(scopes)}")
        return [(float(m), float(v)) for m, v in scopes[scope]]

    def events(self, kind: str | None = None, *, within_minutes: float | None = None) -> list[dict[str, Any]]:
        """Change events in time order, each with ``minutes_before`` the alert added; ``kind`` filters on the kind
        (deployment, config_push, feature_flag, cert_rotation, scale), ``within_minutes`` keeps the last N minutes."""
        found = []
        for event in self._incident.telemetry["events"]:
            before = (self._at - _parse_iso(event["t"])).total_seconds() / 60
            if kind is not None and event["kind"] != kind:
                continue
            if within_minutes is not None and not 0 <= before <= within_minutes:
                continue
            found.append({**event, "minutes_before": round(before, 1)})
        return found

    def dependencies(self, component: str) -> tuple[str, ...]:
        """What ``component`` (or a host of it) calls; datastores and external services call nothing we monitor."""
        name = _component_of(component)
        if name in DEPENDENCIES:
            return DEPENDENCIES[name]
        if name in DATASTORES or name in EXTERNAL:
            return ()
        raise KeyError(f"unknown component {component!r}; known: {', '.join(COMPONENTS + DATASTORES + EXTERNAL)}")

    @staticmethod
    def _scope(scopes: dict[str, Any], component: str) -> str | None:
        if component in scopes:
            return component
        return next((s for s in scopes if _component_of(s) == component), None)


def _component_of(scope: str) -> str:
    """``checkout-3`` -> ``checkout``; anything else unchanged."""
    match = re.fullmatch(r"(.+)-\d+", scope)
    return match.group(1) if match and match.group(1) in COMPONENTS else scope


# --- command line ---------------------------------------------------------------------------------------------


def _summary(incidents: Sequence[Incident], history: Sequence[Incident], held_out: Sequence[Incident]) -> str:
    s = stats(incidents)
    per_category = ", ".join(f"{c} {k}" for c, k in s["categories"].items())
    return (
        f"{len(incidents)} incidents: {per_category} | history {len(history)}, held-out {len(held_out)} | "
        f"new fingerprints {s['new_share']:.1%} | repeats within {RECENT_DAYS:g} days {s['recent_repeat_share']:.1%}"
    )


def _write(incidents: Iterable[Incident], path: str) -> None:
    text = "".join(json.dumps(i.to_json()) + "\n" for i in incidents)
    if path == "-":
        sys.stdout.write(text)
    else:
        with open(path, "w") as f:
            f.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=400, help="how many incidents (default 400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--days", type=float, default=60.0, help="length of the timeline in days (default 60)")
    parser.add_argument("--held-out-days", type=float, default=10.0, help="the last days held out (default 10)")
    parser.add_argument("--stream", action="store_true", help="write only the held-out incidents")
    parser.add_argument("-o", "--output", default="-", help="the JSONL file to write (default: stdout)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.days <= 0 or args.held_out_days < 0:
        parser.error("need -n >= 1, --days > 0 and --held-out-days >= 0")
    incidents = generate(args.n, seed=args.seed, days=args.days)
    history, held_out = split(incidents, held_out_days=args.held_out_days)
    _write(held_out if args.stream else incidents, args.output)
    print(_summary(incidents, history, held_out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
