"""Structured outputs: choices, regular expressions and JSON schemas, enforced by the engine.

The rules (engine_server/constraints.py) and the template syntax are checked on their own;
the engine runs the tiny model, whose unconstrained text is noise that matches nothing, and
compares with an independent reference: greedy decoding that recomputes the whole sequence
at every step and masks the logits with a fresh llguidance matcher.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pydantic
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llguidance import LLMatcher

from engine_server.constraints import ConstraintError, grammar, normalize
from engine_server.engine.engine import Engine, EngineConfig, Failed, Finished, GenSegment, TextSegment
from engine_server.engine.sampler import SamplingParams
from engine_server.engine.tokenizer import ByteTokenizer
from engine_server.protocol import ChunkSpec, FunctionSpec, SamplingSpec, SubmitCall, decode, encode
from parrot_nb.function import SemanticFunction, semantic_function
from parrot_nb.template import NameRef, TemplateError, parse_template
from tests.engine_reference import context_sensitive_tiny_model, score

PROMPT = "Incident: the disk is full.\nCategory: "
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 130}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


class Person(pydantic.BaseModel):
    name: str
    age: int


# --------------------------------------------------------------------------- the rules


def test_choices_split_at_bars_or_come_as_a_list():
    assert normalize("choices", "network|disk|certificate") == ("network", "disk", "certificate")
    assert normalize("choices", ["a b", "c|d"]) == ("a b", "c|d")


@pytest.mark.parametrize(
    ("value", "message"),
    [("a||b", "needs non-empty choices"), ("yes|no|yes", "lists 'yes' twice")],
)
def test_bad_choices_say_what_is_wrong(value, message):
    with pytest.raises(ConstraintError, match=message):
        normalize("choices", value)


def test_choices_of_the_wrong_type_are_a_type_error():
    with pytest.raises(TypeError, match="option 'choices' must be a string of choices separated by '|'"):
        normalize("choices", 3)


def test_a_bad_regex_is_refused_with_the_reason_and_where():
    with pytest.raises(ConstraintError) as info:
        normalize("regex", "[0-9]+(a")
    assert str(info.value) == (
        "option 'regex' is not a regular expression this engine can match: unclosed group\n    [0-9]+(a\n          ^"
    )


def test_look_around_is_refused_because_the_engine_cannot_match_it():
    with pytest.raises(ConstraintError, match="look-around, including look-ahead and look-behind, is not supported"):
        normalize("regex", "(?=a)a")


def test_a_json_schema_is_kept_as_canonical_text_whatever_form_it_came_in():
    text = json.dumps(PERSON, separators=(",", ":"))
    assert normalize("json", PERSON) == text
    assert normalize("json", json.dumps(PERSON, indent=2)) == text
    assert normalize("json", True) == "{}"
    assert json.loads(normalize("json", Person)) == Person.model_json_schema()


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ({"type": "objekt"}, ConstraintError, "option 'json' does not compile: .*objekt"),
        ("{not json", ConstraintError, "option 'json': the schema is not valid JSON"),
        (["a"], TypeError, "option 'json' must be a JSON schema: a dict, its JSON text"),
    ],
)
def test_a_bad_json_schema_is_refused_with_the_reason(value, error, message):
    with pytest.raises(error, match=message):
        normalize("json", value)


def test_two_constraints_on_one_output_are_refused():
    with pytest.raises(ValueError, match="options 'choices' and 'regex' both constrain the output"):
        SamplingSpec(choices=["a"], regex="b").check()
    with pytest.raises(ValueError, match="options 'regex' and 'json' both constrain the output"):
        SamplingParams(regex="b", json=True)


def test_a_constraint_crosses_the_wire_unchanged():
    spec = SamplingSpec(max_tokens=9, json=normalize("json", PERSON), choices=[])
    function = FunctionSpec("f", [ChunkSpec("text", text="x"), ChunkSpec("output", name="y", sampling=spec)])
    msg = SubmitCall("app", "r1", function, {}, {"y": "v1"})
    assert decode(encode(msg, b"key"), b"key").msg == msg
    assert SamplingParams(choices=["x", "y"]).constraint == ("choices", ("x", "y"))


# --------------------------------------------------------------------------- the template


def test_placeholder_options_carry_each_kind_of_constraint():
    parsed = parse_template('A {{output:c choices="net|disk"}} B {{output:r regex="\\d+\\.\\d*"}} C {{output:j json=true}}')
    options = [dict(c.options) for c in parsed.chunks if hasattr(c, "options")]
    assert options == [{"choices": ("net", "disk")}, {"regex": r"\d+\.\d*"}, {"json": "{}"}]


def test_a_regex_keeps_its_backslashes_but_quotes_and_newlines_still_escape():
    (chunk,) = [c for c in parse_template('x {{output:r regex="\\w+\\"\\n\\\\"}}').chunks if hasattr(c, "options")]
    assert chunk.options["regex"] == '\\w+"\n\\'


def test_a_bare_name_is_a_reference_resolved_at_definition():
    (chunk,) = [c for c in parse_template("x {{output:plan json=Plan}}").chunks if hasattr(c, "options")]
    assert chunk.options["json"] == NameRef("Plan", 1, 22, "{{output:plan json=Plan}}")
    fn = SemanticFunction("f", "x {{output:plan json=Plan}}", namespace={"Plan": PERSON})
    assert fn.sampling("plan").json == normalize("json", PERSON)


def test_a_dotted_name_resolves_through_attributes():
    class Schemas:
        person = Person
        labels = ["a", "b"]

    fn = SemanticFunction("f", "x {{output:p json=S.person}} y {{output:c choices=S.labels}}", namespace={"S": Schemas})
    assert json.loads(fn.sampling("p").json) == Person.model_json_schema()
    assert fn.sampling("c").choices == ["a", "b"]
    with pytest.raises(TemplateError, match="choices=S.nothing: type object has no attribute 'nothing'"):
        SemanticFunction("g", "x {{output:c choices=S.nothing}}", namespace={"S": Schemas})


def test_an_undefined_name_is_a_template_error_at_its_placeholder():
    with pytest.raises(TemplateError) as info:
        SemanticFunction("classify", "Text: {{input:t}}\nLabel: {{output:label choices=LABELS}}", namespace={})
    err = info.value
    assert (err.line, err.column, err.placeholder) == (2, 31, "{{output:label choices=LABELS}}")
    assert "choices=LABELS names a Python object, but 'LABELS' is not defined" in str(err)


def test_a_named_object_of_the_wrong_kind_is_a_template_error_naming_the_option():
    with pytest.raises(TemplateError, match=r"json=Plan: option 'json' must be a JSON schema"):
        SemanticFunction("f", "x {{output:p json=Plan}}", namespace={"Plan": 42})


def test_a_bad_regex_in_a_placeholder_names_the_placeholder_and_its_line():
    with pytest.raises(TemplateError) as info:
        parse_template('Code:\n{{output:code regex="[A-Z"}}', name="f")
    assert (info.value.line, info.value.column, info.value.placeholder) == (2, 15, '{{output:code regex="[A-Z"}}')
    assert "unclosed character class" in str(info.value)


def test_two_constraints_in_one_placeholder_point_at_the_second():
    with pytest.raises(TemplateError) as info:
        parse_template('x {{output:c choices="a|b" json=true}}')
    assert info.value.column == 28 and "both constrain the output" in info.value.reason


def test_a_placeholder_constraint_replaces_the_functions_default_constraint():
    fn = SemanticFunction("f", 'x {{output:a}} y {{output:b choices="p|q"}}', json=PERSON)
    assert fn.sampling("a").json is not None and fn.sampling("a").choices == []
    assert fn.sampling("b").choices == ["p", "q"] and fn.sampling("b").json is None


def test_the_decorator_resolves_names_in_its_module():
    @semantic_function
    def who(text):
        """Text: {{input:text}} Person: {{output:person json=PERSON}}"""

    assert who.sampling("person").json == normalize("json", PERSON)


# --------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def model():
    return context_sensitive_tiny_model()


@pytest.fixture(scope="module")
def engine(model, tok):
    return Engine(model, tok, EngineConfig(num_blocks=256, max_running=16))


def reference(model, tok, prompt: str, key: str, value, max_tokens: int) -> str:
    """Greedy text under the constraint, recomputing the sequence at every step, with a fresh matcher."""
    from llguidance import LLTokenizer, TokenizerWrapper

    from engine_server.engine.grammar import _ByteVocabulary

    vocab = model.config.vocab_size
    matcher = LLMatcher(LLTokenizer(TokenizerWrapper(_ByteVocabulary(tok)), n_vocab=vocab), grammar(key, normalize(key, value)))
    ids, out = [tok.bos_id, *tok.encode(prompt)], []
    for _ in range(max_tokens):
        logits = score(model, ids)[-1].float()
        mask = matcher.compute_bitmask()
        allowed = torch.tensor([mask[i // 8] >> (i % 8) & 1 for i in range(vocab)], dtype=torch.bool)
        token = int(torch.argmax(logits.masked_fill(~allowed, float("-inf"))))
        assert matcher.consume_token(token)
        if token == tok.eos_id:
            break
        out.append(token)
        ids.append(token)
        if matcher.is_stopped():
            break
    return tok.decode(out)


def run(engine, prompt: str, **params) -> str:
    return engine.run([TextSegment(prompt), GenSegment("a", SamplingParams(**params))]).outputs["a"]


@pytest.mark.parametrize(
    ("key", "value", "check"),
    [
        ("choices", "network|disk|certificate", lambda s: s in ("network", "disk", "certificate")),
        ("regex", r"[0-9]{3}-[a-z]{2,5}", lambda s: re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", s)),
        ("json", PERSON, lambda s: jsonschema.validate(json.loads(s), PERSON) is None),
    ],
)
def test_a_constrained_output_matches_where_the_unconstrained_text_does_not(engine, model, tok, key, value, check):
    free = run(engine, PROMPT, max_tokens=40)
    with pytest.raises(Exception):  # noise from the tiny model: no label, no pattern, no JSON
        assert check(free)
    text = run(engine, PROMPT, max_tokens=80, **{key: value})
    assert check(text), text
    assert text == reference(model, tok, PROMPT, key, value, 80)


def test_sampled_outputs_keep_to_their_choices(engine):
    texts = {run(engine, PROMPT, choices="alpha|beta|gamma|delta", temperature=1.5, seed=s) for s in range(12)}
    assert texts <= {"alpha", "beta", "gamma", "delta"} and len(texts) > 1


REGEX_PIECES = st.sampled_from(["[a-c]", "[0-9]", "x", "-", "(ab|cd)", "[A-Z]", "\\.", "q"])
BOUNDED = st.sampled_from(["", "?", "{1,3}", "{2}"])  # at most 6 characters a piece: 30 in all


def regexes(quantifiers):
    return st.lists(st.tuples(REGEX_PIECES, quantifiers), min_size=1, max_size=5).map(lambda parts: "".join(p + q for p, q in parts))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=regexes(BOUNDED), prompt=st.sampled_from(["Code: ", "ID? ", "\n"]))
def test_every_output_under_a_bounded_regex_matches_it(engine, pattern, prompt):
    text = run(engine, prompt, regex=pattern, max_tokens=48)
    assert re.fullmatch(pattern, text), (pattern, text)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=regexes(st.sampled_from(["", "*", "+", "{1,3}"])))
def test_an_unbounded_regex_output_matches_or_fails_saying_max_tokens_cut_it(engine, pattern):
    """A grammar never forces an end: '[a-c]*x' may go on with 'b' for ever. Then the request fails, saying so."""
    try:
        text = run(engine, "Code: ", regex=pattern, max_tokens=24)
    except RuntimeError as exc:
        assert "ended at max_tokens=24 before its regex" in str(exc) and "raise max_tokens" in str(exc)
    else:
        assert re.fullmatch(pattern, text), (pattern, text)


LEAVES = st.one_of(
    st.just({"type": "boolean"}),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span}, st.integers(-50, 50), st.integers(0, 500)),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.lists(st.sampled_from(["red", "green", 3, None, True]), min_size=1, max_size=4, unique=True).map(lambda v: {"enum": v}),
)
SCHEMAS = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.builds(lambda item, n: {"type": "array", "items": item, "maxItems": n}, inner, st.integers(0, 3)),
        st.dictionaries(st.sampled_from(["id", "name", "tags", "ok"]), inner, min_size=1, max_size=3).map(
            lambda props: {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}
        ),
    ),
    max_leaves=5,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS)
def test_every_output_under_a_json_schema_parses_and_validates(engine, schema):
    text = run(engine, "Answer in JSON: ", json=schema, max_tokens=200)
    jsonschema.validate(json.loads(text), schema)


def test_constraints_in_a_batch_of_forks_give_what_each_gives_alone(model, tok):
    """Masks go to the right rows: eight requests forked from one context, each with its own constraint."""
    constraints = [
        {"choices": "network|disk|certificate"},
        {"regex": "[a-z]{2,4}(;[a-z]{2,4})*", "stop": (";",)},  # the stop cuts inside: rollback, still valid
        {"json": PERSON},
        {},
        {"regex": "[0-9]+", "max_tokens": 6},
        {"choices": "yes|no"},
        {"json": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
        {"regex": "(ab|cd)+x"},
    ]

    def program(i, c):
        return [TextSegment("Shared context for every request. ", "k-shared"), TextSegment(f"Task {i}: "), GenSegment("a", SamplingParams(**{"max_tokens": 64, **c}))]

    alone = Engine(model, tok, EngineConfig(num_blocks=256))
    expected = [alone.run(program(i, c)).outputs["a"] for i, c in enumerate(constraints)]
    batched = Engine(model, tok, EngineConfig(num_blocks=256, max_running=16))
    batched.run(program(99, {}))  # the context is cached, so the eight fork it
    for i, c in enumerate(constraints):
        batched.add(f"r{i}", program(i, c))
    results = {}
    while batched.has_work():
        for event in batched.step():
            assert not isinstance(event, Failed), event.error
            if isinstance(event, Finished):
                results[event.request_id] = event.result
    assert [results[f"r{i}"].outputs["a"] for i in range(len(constraints))] == expected
    assert all(r.cached_tokens > 0 for r in results.values())
    assert ";" not in expected[1] and re.fullmatch("[a-z]{2,4}", expected[1])


def test_a_stop_string_that_cuts_the_constraint_short_fails_the_request_clearly(engine):
    with pytest.raises(RuntimeError) as info:
        run(engine, PROMPT, regex="(ab|cd)+xy", stop=("x",), max_tokens=40)
    assert "a constrained output ended at a stop string before its regex '(ab|cd)+xy' was satisfied" in str(info.value)
    assert "remove the stop strings that can occur inside it" in str(info.value)


def test_max_tokens_that_cut_the_constraint_short_fail_the_request_clearly(engine):
    with pytest.raises(RuntimeError, match=r"ended at max_tokens=3 before its JSON schema was satisfied, with '\{\"n'; raise max_tokens"):
        run(engine, PROMPT, json=PERSON, max_tokens=3)


def test_a_constraint_complete_before_max_tokens_ends_the_output(engine):
    result = engine.run([TextSegment(PROMPT), GenSegment("a", SamplingParams(choices="disk", max_tokens=50))])
    assert result.outputs["a"] == "disk" and result.output_tokens["a"] == 4
    assert result.finish_reasons["a"] == "stop"


def test_ignore_eos_does_not_stretch_a_constrained_output_past_its_end(engine):
    assert run(engine, PROMPT, choices="ab|cd", ignore_eos=True, max_tokens=30) in ("ab", "cd")


def test_each_output_of_a_program_has_its_own_constraint(engine):
    result = engine.run([
        TextSegment("Name: "), GenSegment("name", SamplingParams(regex="[A-Z][a-z]{1,6}")),
        TextSegment("\nAge: "), GenSegment("age", SamplingParams(regex="[1-9][0-9]?")),
        TextSegment("\nFree: "), GenSegment("free", SamplingParams(max_tokens=5, ignore_eos=True)),
    ])  # fmt: skip
    assert re.fullmatch("[A-Z][a-z]{1,6}", result.outputs["name"])
    assert re.fullmatch("[1-9][0-9]?", result.outputs["age"])
    assert result.output_tokens["free"] == 5


def test_a_constraint_is_compiled_once_per_engine(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64))
    for _ in range(3):
        run(engine, PROMPT, json=PERSON, max_tokens=80)
    run(engine, PROMPT, choices="a|b")
    assert engine.grammars.compiled == 2


# --------------------------------------------------------------------------- spaces before a constrained output


def test_the_space_that_ends_the_prompt_is_written_by_the_model_and_left_out_of_the_value(model, tok):
    """'Category: ' then a constraint: the grammar starts with the space, so a tokenizer that spells
    ' disk' as one token can write it; the value is 'disk', and its deltas never carry the space."""
    engine = Engine(model, tok, EngineConfig(num_blocks=64))
    engine.add("r", [TextSegment("Category:  "), GenSegment("a", SamplingParams(regex="[a-z]{3}( [a-z]{3})?", stop=(" ",)))])
    deltas, result = [], None
    while engine.has_work():
        for event in engine.step():
            assert not isinstance(event, Failed), event.error
            if isinstance(event, Finished):
                result = event.result
            elif hasattr(event, "text"):
                deltas.append(event.text)
    text = result.outputs["a"]
    assert re.fullmatch("[a-z]{3}", text)  # the stop string " " counts only after the moved spaces
    assert "".join(deltas) == text and result.output_tokens["a"] == 3  # the spaces are neither streamed nor counted
    assert text == reference(model, tok, "Category:  ", "regex", "[a-z]{3}( [a-z]{3})?", 3)


def test_a_keyed_prompt_ending_in_a_space_is_not_forked_into_a_constrained_output(model, tok):
    """The keyed text loses its trailing space, so it no longer matches its key's cached context."""
    program = [TextSegment("Shared: ", "k-shared"), GenSegment("a", SamplingParams(choices="yes|no|maybe"))]
    fresh = Engine(model, tok, EngineConfig(num_blocks=64)).run(program).outputs["a"]
    engine = Engine(model, tok, EngineConfig(num_blocks=64))
    engine.run([TextSegment("Shared: ", "k-shared"), GenSegment("a", SamplingParams(max_tokens=4))])  # caches k-shared
    again = engine.run(program)
    assert again.outputs["a"] == fresh and again.cached_tokens == 0


def test_a_busy_constraint_gets_more_compiled_roots_and_a_quiet_one_compiles_once(tok):
    """Copies of one compiled matcher compute their masks one at a time (a shared lexer lock), so a
    constraint used while other sequences are in the engine is compiled again, up to ROOTS times."""
    from engine_server.engine.grammar import ROOTS, Grammars

    grammars = Grammars(tok, 259)
    for _ in range(5):
        grammars.matcher("choices", ("a", "b"))
    assert grammars.compiled == 1
    for running in range(3 * ROOTS):
        matcher = grammars.matcher("choices", ("a", "b"), running=running)
        assert matcher.consume_tokens([ord("a")]) and matcher.is_accepting()
    assert grammars.compiled == ROOTS


def test_a_batch_of_outputs_with_one_constraint_spreads_over_several_roots(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=512, max_running=32))
    for i in range(24):
        engine.add(f"r{i}", [TextSegment(f"Item {i}: "), GenSegment("a", SamplingParams(choices="yes|no"))])
    while engine.has_work():
        for event in engine.step():
            assert not isinstance(event, Failed), event.error
    from engine_server.engine.grammar import ROOTS

    assert engine.grammars.compiled == min(24, ROOTS)  # the first request alone: one root; the others take turns


def test_compiled_roots_are_bounded_in_all_by_dropping_the_least_recently_used_constraints(tok, monkeypatch):
    from engine_server.engine import grammar

    monkeypatch.setattr(grammar, "ROOTS", 4)
    monkeypatch.setattr(grammar, "MAX_COMPILED", 6)
    grammars = grammar.Grammars(tok, 259)
    for choices in (("a", "b"), ("c", "d")):
        for running in range(4):
            grammars.matcher("choices", choices, running=running)
    assert [len(r.matchers) for r in grammars._compiled.values()] == [4]  # (a, b) went to make room
    assert grammars.matcher("choices", ("c", "d")).consume_tokens([ord("c")])
