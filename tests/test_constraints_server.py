"""Structured outputs through a real engine server (the tiny model), as a notebook uses them."""

from __future__ import annotations

import json

import jsonschema
import pytest

from engine_server.protocol import ChunkSpec, FunctionSpec, OpenApp, SamplingSpec, SubmitCall, new_id
from parrot_nb.client import ServerError
from parrot_nb.function import SemanticFunction
from parrot_nb.variable import SemanticVariableError
from tests.tiny_oracle import expected

PLAN = {
    "type": "object",
    "properties": {
        "steps": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3},
        "risk": {"enum": ["low", "high"]},
    },
    "required": ["steps", "risk"],
    "additionalProperties": False,
}


def test_a_json_output_arrives_as_the_parsed_object_and_flows_downstream_as_text(connected) -> None:
    plan = SemanticFunction.from_template(
        "plan", "Goal: {{input:goal}}\nPlan: {{output:plan json=PLAN max_tokens=120}}", namespace={"PLAN": PLAN}
    )
    review = SemanticFunction.from_template("review", "Plan: {{input:plan}}\nVerdict: {{output:verdict}}", max_tokens=8)
    p = plan(goal="ship it")
    verdict = review(plan=p)
    value = p.get(timeout=120)
    jsonschema.validate(value, PLAN)
    text = expected(plan, goal="ship it")["plan"]
    assert value == json.loads(text) and p.text == text
    assert verdict.get(timeout=120) == expected(review, plan=text)["verdict"]


def test_a_choices_output_is_one_of_its_choices(connected) -> None:
    classify = SemanticFunction.from_template(
        "classify", 'Incident: {{input:incident}}\nCategory: {{output:category choices="network|disk|certificate"}}'
    )
    incidents = ["TLS handshake fails after renewal", "no space left on device", "packets dropped at the switch"]
    labels = [classify(incident=i) for i in incidents]
    for incident, label in zip(incidents, labels):
        assert label.get(timeout=120) == expected(classify, incident=incident)["category"]
        assert label.get() in ("network", "disk", "certificate")


def test_a_json_output_cut_by_max_tokens_fails_saying_so(connected) -> None:
    plan = SemanticFunction.from_template("short_plan", "Plan: {{output:plan json=true max_tokens=2}}")
    with pytest.raises(SemanticVariableError, match="ended at max_tokens=2 before its JSON schema was satisfied"):
        plan().get(timeout=120)


def test_the_server_refuses_a_call_whose_constraint_does_not_compile(shared_server) -> None:
    """A client that skips the notebook's checks still gets a clear refusal, naming the output."""
    client = shared_server.client()
    try:
        app_id = client.call(OpenApp("t")).app_id
        chunks = [ChunkSpec("text", text="x"), ChunkSpec("output", name="y", sampling=SamplingSpec(regex="a(b"))]
        call = SubmitCall(app_id, new_id(), FunctionSpec("f", chunks), {}, {"y": new_id()})
        with pytest.raises(ServerError, match=r"\{\{output:y\}\}: option 'regex' is not a regular expression .*unclosed group"):
            client.call(call)
    finally:
        client.close()
