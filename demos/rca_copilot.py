"""Batch pipeline exported from rca_copilot.ipynb by `parrot-nb export`.

Each record is a JSON object whose fields are the arguments of run(id: str, day: float, time: str, service: str, alert: str, severity: int, telemetry: dict).
Run it over a JSONL file of records, one application per record:

    parrot-nb run THIS_FILE.py --inputs records.jsonl --output results.jsonl
"""

import parrot_nb
import parrot_nb.pipeline as _pipeline
from parrot_nb import SemanticFunction

# ── cell 1 (markdown)
# # RCACopilot: root-cause analysis of incidents
#
# After RCACopilot (Microsoft's on-call root-cause analysis). For each new incident:
#
# 1. an **incident handler** (a native step: a decision tree of query, scope-switching and mitigation
#    actions over the monitoring data) collects diagnostics;
# 2. the LLM **summarises** them in 120-140 words;
# 3. an **embedding trained on past incidents** (FastText, as in the paper, trained here with gensim)
#    finds the **nearest past incidents**, with a similarity that decays with time (a native step);
# 4. a **chain-of-thought prompt** reads the summary and the neighbours, and picks the root-cause
#    category.
#
# Every incident is an application of its own, and many run at once: the long instructions at the start
# of the prompts are the same for all of them, so the server prefills them once (see the cache hits in
# `%parrot status`). The neighbours' vote (the most frequent category among them, weighted by the
# decayed similarity) comes out too: it is the nearest-neighbour baseline the LLM's answer is scored
# against.
#
# The incidents are synthetic (`incidents.py`, beside this notebook): a small shop backend, eight
# root-cause categories whose alerts are symptoms that several categories share, noisy logs, metrics and
# change events, and root causes that recur as in the paper (most within 20 days, about a quarter new).
#
# Made for export: `run(...)` is the work for one incident record (the fields of `incidents.py`'s JSON;
# the label travels in the record for scoring but is not an argument of `run`).
#
# ```bash
# parrot-nb export demos/rca_copilot.ipynb -o /tmp/rca_copilot.py
# python demos/incidents.py -n 400 --seed 0 --stream -o /tmp/incident_stream.jsonl
# parrot-nb run /tmp/rca_copilot.py --inputs /tmp/incident_stream.jsonl --output /tmp/rca.jsonl --model smollm2
# ```

# ── cell 2: parameters; `parrot-nb run --param NAME=VALUE` overrides them
n_incidents = 400  # the generated timeline: history, then the held-out days
seed = 0
held_out_days = 10.0
k = 5  # past incidents shown to the model
decay_per_day = 0.01  # a past incident's similarity is multiplied by exp(-decay_per_day * age in days)
globals().update(_pipeline.parameters(n_incidents=n_incidents, seed=seed, held_out_days=held_out_days, k=k, decay_per_day=decay_per_day))

# ── cell 3
_pipeline.start(model='smollm2')  # %parrot start

# ── cell 4 (markdown)
# ## Past incidents
#
# The history is every incident before the last `held_out_days` days; the held-out incidents come after
# it, as they would in deployment.

# ── cell 5
import json
import math
import re
import tempfile
import zlib
from collections import Counter
from pathlib import Path

import parrot_nb
import incidents

history, held_out = incidents.split(incidents.generate(n_incidents, seed=seed), held_out_days=held_out_days)
LABELS = list(incidents.CATEGORIES)
print(f"{len(history)} past incidents, {len(held_out)} held out;",
      ", ".join(f"{c} {n}" for c, n in Counter(i.category for i in history).most_common()))

# ── cell 6 (markdown)
# ## The incident handler
#
# A decision tree over the monitoring API (`incidents.Monitor`). It reads the error and warning logs of
# the alerting service, looks for metrics that moved, switches its scope to a dependency that the errors
# name, to the hosts when one of them stands out, and lists the recent changes; it takes a mitigation
# action (draining a host that crash-loops, pausing the rollouts of a service changed in the last half
# hour) and records it. It never sees the label.

# ── cell 7
def _shape(message: str) -> str:
    """A log message with its ids and numbers blanked, so that repeats of one message count together."""
    return re.sub(r"\b[0-9a-f]{6,}\b|\d+(\.\d+)?", "#", message)


def _top_messages(lines: list, title: str, top: int = 6) -> list:
    counts = Counter(_shape(line["message"]) for line in lines)
    example = {_shape(line["message"]): line for line in lines}
    out = [f"{title}: {len(lines)} lines, {len(counts)} distinct"]
    for shape, n in counts.most_common(top):
        line = example[shape]
        out.append(f"  {n}x {line['level']} {line.get('host') or line['component']}: {line['message']}")
    return out


def _moved(monitor, scopes: list, top: int = 5) -> list:
    """Metrics whose last 15 minutes differ most from the half hour before, as a z-score."""
    found = []
    for scope in scopes:
        for name in monitor.metric_names(scope):
            series = monitor.metric(name, scope)
            base = [v for t, v in series if t < -15]
            recent = [v for t, v in series if t >= -15]
            if len(base) < 3 or not recent:
                continue
            mean = sum(base) / len(base)
            spread = (sum((v - mean) ** 2 for v in base) / len(base)) ** 0.5
            now = max(recent, key=lambda v: abs(v - mean))
            z = abs(now - mean) / (spread + 1e-6 + 0.02 * abs(mean))
            if z > 4:
                found.append((z, f"  {name} on {scope}: {mean:.4g} before, {now:.4g} now"))
    return [line for _, line in sorted(found, reverse=True)[:top]]


def handle(incident: dict) -> str:
    """Collect diagnostics for one incident: the handler's report, one finding per line."""
    monitor = incidents.Monitor(incident)
    alert = monitor.alert()
    service = alert["service"]
    report = [f"Alert: {alert['title']} (severity {alert['severity']}) on {service} at {alert['time']}"]
    errors = monitor.logs(service, level="ERROR|FATAL|WARN", limit=300)
    report += _top_messages(errors, f"Query: errors and warnings of {service}")
    moved = _moved(monitor, [service])
    report += ["Query: metrics of " + service + " that moved" + ("" if moved else ": none")] + moved
    # Scope switch: a dependency that the errors name.
    text = " ".join(line["message"] for line in errors)
    for dependency in monitor.dependencies(service):
        if dependency in text:
            report.append(f"Scope: {service} -> {dependency} (named in {text.count(dependency)} error lines)")
            report += _top_messages(monitor.logs(dependency, level="ERROR|FATAL|WARN", limit=100), f"Query: errors of {dependency}", 3)
            report += _moved(monitor, [dependency], 3)
    # Scope switch: a host that stands out (most of the errors, or restarts).
    hosts = Counter(line.get("host") for line in errors if line.get("host") and line["level"] != "WARN")
    if hosts:
        host, n = hosts.most_common(1)[0]
        if n >= 3 and n > 0.6 * sum(hosts.values()):
            report.append(f"Scope: {service} -> {host} ({n} of {sum(hosts.values())} errors)")
            report += _moved(monitor, [host], 4)
            restarts = [v for _, v in monitor.metric("restarts", host)] if "restarts" in monitor.metric_names(host) else []
            if restarts and max(restarts) - min(restarts) >= 3:
                report.append(f"Mitigation: drained {host} ({max(restarts) - min(restarts):.0f} restarts)")
    # Changes: what was deployed, pushed or rotated in the last three hours.
    changes = monitor.events(within_minutes=180)
    report.append("Query: changes in the last 3 hours" + ("" if changes else ": none"))
    for event in changes:
        report.append(f"  {event['minutes_before']:.0f} min before: {event['kind']} on {event['component']}: {event['detail']}")
        if event["minutes_before"] <= 30 and event["component"] == service and event["kind"] in ("deployment", "config_push"):
            report.append(f"Mitigation: paused further {event['kind']}s of {service}")
    return "\n".join(report)


collect_diagnostics = parrot_nb.native(handle, name="collect_diagnostics")

# ── cell 8: tagged 'notebook-only', left out

# ── cell 9 (markdown)
# ## The embedding, trained on the past incidents
#
# FastText (gensim's implementation, as the paper uses FastText): word vectors with subword n-grams, so
# that a host, a path or an error code never seen in training still gets a vector. An incident's vector
# is the IDF-weighted mean of its words' vectors, less the mean of the past incidents' vectors. It is
# computed from the handler's diagnostics, for past and new incidents alike; the paper embeds the LLM's
# summaries, but summarising every past incident would be most of a CPU run's time. The model and the
# history's vectors go to a directory that the server's native step reads.

# ── cell 10
import numpy as np
from gensim.models import FastText


def words(text: str) -> list:
    return re.findall(r"[a-z]+", text.lower())


def embed(vectors, idf: dict, text: str) -> np.ndarray:
    tokens = words(text)
    if not tokens:
        return np.zeros(vectors.vector_size, dtype=np.float32)
    weights = np.array([idf.get(t, idf["<unknown>"]) for t in tokens], dtype=np.float32)
    matrix = np.stack([vectors[t] / (np.linalg.norm(vectors[t]) + 1e-9) for t in tokens])
    v = weights @ matrix
    return v / (np.linalg.norm(v) + 1e-9)


def _unit(m: np.ndarray) -> np.ndarray:
    return m / (np.linalg.norm(m, axis=-1, keepdims=True) + 1e-9)


past_reports = [handle(i.to_json()) for i in history]
documents = [words(r) for r in past_reports]
model = FastText(documents, vector_size=64, window=5, min_count=2, epochs=20, min_n=3, max_n=5, bucket=50_000,
                 seed=seed, workers=1, hashfxn=lambda s: zlib.crc32(s.encode()))  # not hash(): the same vectors in every process
frequency = Counter(w for d in documents for w in set(d))
idf = {w: math.log((1 + len(documents)) / (1 + n)) + 1 for w, n in frequency.items()}
idf["<unknown>"] = math.log(1 + len(documents)) + 1

index_dir = tempfile.TemporaryDirectory(prefix="rca-index-")  # removed when the kernel exits
model.wv.save(f"{index_dir.name}/fasttext.kv")
past_vectors = np.stack([embed(model.wv, idf, r) for r in past_reports])
center = past_vectors.mean(axis=0)  # word-vector means all point one way: centred, their cosines spread out
np.save(f"{index_dir.name}/center.npy", center)
np.save(f"{index_dir.name}/vectors.npy", _unit(past_vectors - center))
Path(index_dir.name, "history.json").write_text(json.dumps({
    "idf": idf,
    "incidents": [{"id": i.id, "day": i.day, "category": i.category, "resolution": i.resolution} for i in history],
}))
print(f"FastText: {len(model.wv.key_to_index)} words, {model.wv.vector_size} dimensions; index in {index_dir.name}")

# ── cell 11
@parrot_nb.native
def nearest(diagnostics: str, day: float, index: str, k: int, decay_per_day: float) -> list:
    """The k past incidents most similar to these diagnostics, similarity decayed by age in days."""
    from gensim.models.fasttext import FastTextKeyedVectors

    vectors = FastTextKeyedVectors.load(f"{index}/fasttext.kv")
    past = json.loads(Path(index, "history.json").read_text())
    query = _unit(embed(vectors, past["idf"], diagnostics) - np.load(f"{index}/center.npy"))
    similarity = np.load(f"{index}/vectors.npy") @ query
    age = np.array([day - p["day"] for p in past["incidents"]])
    score = np.where(age > 0, similarity * np.exp(-decay_per_day * np.maximum(age, 0)), -np.inf)
    return [
        {**past["incidents"][i], "days_ago": round(float(age[i]), 1), "similarity": round(float(similarity[i]), 3),
         "score": round(float(score[i]), 3)}
        for i in np.argsort(-score)[:k]
    ]  # fmt: skip


@parrot_nb.native
def vote(neighbours: list) -> str:
    """The nearest-neighbour baseline: the category with the most decayed similarity among the neighbours."""
    weight = Counter()
    for n in neighbours:
        weight[n["category"]] += n["score"]
    return weight.most_common(1)[0][0]


@parrot_nb.native
def describe(neighbours: list) -> str:
    """The neighbours as the prompt shows them."""
    return "\n".join(
        f"- {n['id']}, {n['days_ago']:g} days ago, similarity {n['similarity']:.2f}: category {n['category']}. "
        f"{n['resolution']}" for n in neighbours
    )  # fmt: skip

# ── cell 12 (markdown)
# ## The prompts
#
# The summary's instructions and the prediction's category guide are the same for every incident: a
# shared prefix, prefilled once. The prediction is a completion prompt rather than a chat: with
# SmolLM2-135M, a chat form's reasoning repeated the neighbour list and its answer was the same category
# for almost every incident. `benchmarks/rca_accuracy.py` scores this one against the neighbours' vote
# (`benchmarks/results/demo_apps.md`).

# ── cell 13: %%semantic summarize --chat --temperature 0
summarize = SemanticFunction.from_template(
    'summarize',
    """\
{{role:system}}You are an on-call site reliability engineer for an online shop's backend. You read the
diagnostics that the incident handlers collected (log queries, metrics that moved, scope switches to
dependencies or hosts, recent changes, mitigation actions) and write a summary for the engineer who
takes over: the symptom, the strongest evidence of the cause, what changed recently and what was done.
Write 120 to 140 words, in plain sentences, without lists.
{{role:user}}Diagnostics:
{{input:diagnostics}}{{output:summary max_tokens=200}}""",
    chat=True,
    temperature=0.0,
)

# ── cell 14: %%semantic predict --temperature 0
predict = SemanticFunction.from_template(
    'predict',
    'You find the root cause of incidents in an online shop\'s backend. The root-cause categories:\n- network: packet loss, TCP retransmits, connection or DNS timeouts between services or regions;\n- disk: a filesystem full (no space left on device, ENOSPC), writes failing;\n- certificate: an expired or invalid TLS certificate, x509 errors, failed certificate rotation;\n- dependency: a downstream or external service slow or failing (upstream 5xx, circuit breaker open);\n- deployment: a new version rolled out shortly before, with panics, null pointers or schema errors;\n- quota: a rate limit or quota reached (429 Too Many Requests, QuotaExceeded, throttling, too many connections);\n- memory: memory exhausted (OOMKilled, OutOfMemoryError, out of memory, GC overhead);\n- config: a bad configuration push or feature flag (invalid value for a key, failed to parse config).\nPast incidents with the same root cause usually look alike and recur within a few weeks.\n\nPast incidents most similar to the new one, with their root-cause categories:\n{{input:neighbours}}\n\nNew incident:\n{{input:summary}}\nReasoning, step by step: {{output:reasoning max_tokens=64 stop="\\n"}}\nRoot-cause category of the new incident: {{output:category choices=LABELS}}',
    temperature=0.0,
    namespace=globals(),
)

# ── cell 15
def run(id: str, day: float, time: str, service: str, alert: str, severity: int, telemetry: dict):
    """The work for one incident: diagnostics, summary, neighbours, then the category and its reasoning."""
    incident = {"id": id, "day": day, "time": time, "service": service, "alert": alert, "severity": severity,
                "telemetry": telemetry}  # fmt: skip
    diagnostics = collect_diagnostics(incident=incident)
    summary = summarize(diagnostics=diagnostics)
    neighbours = nearest(diagnostics=diagnostics, day=day, index=index_dir.name, k=k, decay_per_day=decay_per_day)
    answer = predict(summary=summary, neighbours=describe(neighbours=neighbours))
    return {"category": answer.category, "reasoning": answer.reasoning, "neighbour_vote": vote(neighbours=neighbours),
            "summary": summary, "neighbours": neighbours}  # fmt: skip

# ── cell 16 (markdown)
# ## A few held-out incidents, at once
#
# Each incident runs as an application of its own; all of them are submitted before any is waited for.
# These cells are tagged `notebook-only`.

# ── cell 17: tagged 'notebook-only', left out

# ── cell 18: tagged 'notebook-only', left out

# ── cell 19: tagged 'notebook-only', left out

# ── cell 20: tagged 'notebook-only', left out

# ── cell 21
_pipeline.show_status()  # %parrot status

# ── cell 22
_pipeline.stop()  # %parrot stop
