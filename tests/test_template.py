"""Tests for parrot_nb.template: the prompt-template language."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parrot_nb.template import (
    OPTION_KEYS,
    InputChunk,
    OutputChunk,
    ParsedTemplate,
    TemplateError,
    TextChunk,
    parse_template,
    validate_options,
)


def parse_error(template: str, name: str | None = None) -> TemplateError:
    with pytest.raises(TemplateError) as info:
        parse_template(template, name)
    return info.value


# --------------------------------------------------------------------------- basics


def test_plain_input_and_output():
    parsed = parse_template("Summarize: {{input:doc}}\nSummary: {{output:summary}}")
    assert parsed == ParsedTemplate(
        chunks=(
            TextChunk("Summarize: "),
            InputChunk("doc"),
            TextChunk("\nSummary: "),
            OutputChunk("summary"),
        ),
        inputs=("doc",),
        outputs=("summary",),
    )


def test_template_of_only_an_output_has_no_text_chunks():
    assert parse_template("{{output:o}}").chunks == (OutputChunk("o"),)


def test_trailing_text_is_kept():
    assert parse_template("{{output:o}}\nThe end.").chunks == (
        OutputChunk("o"),
        TextChunk("\nThe end."),
    )


def test_inputs_and_outputs_in_order_of_appearance():
    parsed = parse_template(
        "{{input:b}} {{input:a}} -> {{output:y}}. Then {{input:c}} -> {{output:x}}."
    )
    assert parsed.inputs == ("b", "a", "c")
    assert parsed.outputs == ("y", "x")


def test_repeated_input_is_allowed_and_listed_once():
    parsed = parse_template("{{input:q}} and again {{input:q}}: {{output:a}}")
    assert parsed.chunks == (
        InputChunk("q"),
        TextChunk(" and again "),
        InputChunk("q"),
        TextChunk(": "),
        OutputChunk("a"),
    )
    assert parsed.inputs == ("q",)


def test_input_may_follow_an_output():
    parsed = parse_template("Q: {{input:q}} A: {{output:a}} Follow-up: {{input:f}} B: {{output:b}}")
    assert parsed.inputs == ("q", "f")
    assert parsed.outputs == ("a", "b")


def test_whitespace_inside_braces():
    parsed = parse_template("{{  input:x }} -> {{\toutput:y   max_tokens=5\t}}")
    assert parsed.chunks == (
        InputChunk("x"),
        TextChunk(" -> "),
        OutputChunk("y", {"max_tokens": 5}),
    )


def test_newlines_between_options():
    parsed = parse_template("x {{output:y\n    max_tokens=5\n    seed=1\n}}")
    assert parsed.chunks == (TextChunk("x "), OutputChunk("y", {"max_tokens": 5, "seed": 1}))


def test_names_with_digits_and_underscores():
    parsed = parse_template("{{input:doc_2}} {{output:Answer_v3}}")
    assert parsed.inputs == ("doc_2",)
    assert parsed.outputs == ("Answer_v3",)


def test_soft_keywords_are_valid_names():
    # 'match', 'case' and 'type' are soft keywords: fine as keyword arguments.
    parsed = parse_template("{{input:match}} {{input:type}}: {{output:case}}")
    assert parsed.inputs == ("match", "type")


def test_parse_template_rejects_non_string():
    with pytest.raises(TypeError):
        parse_template(b"{{output:o}}")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- options


def test_every_option_kind():
    parsed = parse_template(
        "A: {{output:a max_tokens=64 temperature=0.7 top_p=0.9 top_k=40 seed=3 "
        'stop="." ignore_eos=true}}'
    )
    assert parsed.chunks[1] == OutputChunk(
        "a",
        {
            "max_tokens": 64,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 40,
            "seed": 3,
            "stop": (".",),
            "ignore_eos": True,
        },
    )


def test_option_value_types_are_normalised():
    options = parse_template("{{output:a temperature=0 top_p=1 ignore_eos=false}}").chunks[0].options
    assert options == {"temperature": 0.0, "top_p": 1.0, "ignore_eos": False}
    assert type(options["temperature"]) is float
    assert type(options["top_p"]) is float
    assert options["ignore_eos"] is False


def test_float_forms():
    options = parse_template("{{output:a temperature=.5 top_p=1e-2}}").chunks[0].options
    assert options == {"temperature": 0.5, "top_p": 0.01}


def test_quoted_stop_with_escapes():
    chunk = parse_template(r'{{output:a stop="\n\n" stop="say \"hi\"\t\\"}}').chunks[0]
    assert chunk.options == {"stop": ("\n\n", 'say "hi"\t\\')}


def test_single_quoted_stop():
    chunk = parse_template(r"{{output:a stop='it\'s' stop='\"'}}").chunks[0]
    assert chunk.options == {"stop": ("it's", '"')}


def test_repeated_stop_gives_tuple_in_order():
    chunk = parse_template('{{output:a stop="x" max_tokens=3 stop="y" stop="z"}}').chunks[0]
    assert chunk.options["stop"] == ("x", "y", "z")


def test_single_stop_is_a_tuple():
    assert parse_template('{{output:a stop="END"}}').chunks[0].options == {"stop": ("END",)}


def test_quoted_value_may_contain_closing_braces():
    parsed = parse_template('{{output:a stop="}}"}} tail')
    assert parsed.chunks == (OutputChunk("a", {"stop": ("}}",)}), TextChunk(" tail"))


def test_raw_newline_inside_quotes_is_kept():
    # A template written in a non-raw Python string has real newlines here.
    assert parse_template('{{output:a stop="\n"}}').chunks[0].options == {"stop": ("\n",)}


def test_options_keep_only_what_was_written():
    assert parse_template("{{output:a}}").chunks[0].options == {}


def test_output_chunk_is_hashable_with_options():
    chunk = parse_template('{{output:a stop="x" max_tokens=2}}').chunks[0]
    assert hash(chunk) == hash(OutputChunk("a", {"max_tokens": 2, "stop": ("x",)}))
    assert {chunk} == {OutputChunk("a", {"stop": ("x",), "max_tokens": 2})}


def test_output_chunk_options_are_read_only():
    chunk = OutputChunk("a", {"max_tokens": 2})
    with pytest.raises(TypeError):
        chunk.options["max_tokens"] = 3  # type: ignore[index]


def test_parsed_template_is_hashable_and_picklable():
    parsed = parse_template('{{input:x}} {{output:a stop="." seed=1}}')
    assert hash(parsed) == hash(pickle.loads(pickle.dumps(parsed)))
    assert pickle.loads(pickle.dumps(parsed)) == parsed


def test_option_keys():
    assert OPTION_KEYS == frozenset(
        {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "choices", "regex", "json", "items"}
    )


# --------------------------------------------------------------------------- literal text


JSON_TEMPLATE = """Return JSON like {"name": "x", "tags": ["a"], "nested": {"k": {"v": 1}}}.
Input: {"doc": "{{input:doc}}"}
{"summary": "{{output:summary stop="\\""}}"}"""


def test_json_survives():
    parsed = parse_template(JSON_TEMPLATE)
    assert parsed.chunks == (
        TextChunk(
            'Return JSON like {"name": "x", "tags": ["a"], "nested": {"k": {"v": 1}}}.\n'
            'Input: {"doc": "'
        ),
        InputChunk("doc"),
        TextChunk('"}\n{"summary": "'),
        OutputChunk("summary", {"stop": ('"',)}),
        TextChunk('"}'),
    )
    assert parsed.render({"doc": "D", "summary": "S"}) == (
        'Return JSON like {"name": "x", "tags": ["a"], "nested": {"k": {"v": 1}}}.\n'
        'Input: {"doc": "D"}\n{"summary": "S"}'
    )


def test_placeholder_inside_json_object_braces():
    parsed = parse_template('{"a": {{input:x}}} {"b": {{{output:y}}}}')
    assert parsed.chunks == (
        TextChunk('{"a": '),
        InputChunk("x"),
        TextChunk('} {"b": {'),
        OutputChunk("y"),
        TextChunk("}}"),
    )


PYTHON_CODE = """def f(x):
    d = {"a": {"b": 1}}
    s = {1, 2}
    e = {}
    nested = {{1, 2}: 3} if False else {x: {y: 1} for y in x}
    return f"{x}{{literal}}" + "}}{{"
"""


def test_python_code_with_dict_and_set_literals_survives():
    parsed = parse_template(PYTHON_CODE + "{{input:q}}\n{{output:answer}}")
    assert parsed.chunks == (
        TextChunk(PYTHON_CODE),
        InputChunk("q"),
        TextChunk("\n"),
        OutputChunk("answer"),
    )


def test_jinja_like_and_lone_braces_survive():
    literal = "{{ jinja }} {{foo.bar}} {{ x: 1 }} {{x: 1}} {{a:-1}} {{http://x}} { } {{ }} }} {"
    parsed = parse_template(literal + "{{input:x}}" + literal + "{{output:y}}" + literal)
    assert parsed.chunks == (
        TextChunk(literal),
        InputChunk("x"),
        TextChunk(literal),
        OutputChunk("y"),
        TextChunk(literal),
    )
    assert parsed.render({"x": "X", "y": "Y"}) == literal + "X" + literal + "Y" + literal


def test_placeholder_kind_is_case_sensitive_only_for_the_exact_words():
    # 'input' must be followed directly by ':'; '{{ input :x}}' is not a placeholder.
    parsed = parse_template("{{ input :x}} {{output:y}}")
    assert parsed.chunks == (TextChunk("{{ input :x}} "), OutputChunk("y"))


def test_format_fields_are_not_interpreted():
    parsed = parse_template("{0} {name} {!r} %s {{output:y}}")
    assert parsed.chunks == (TextChunk("{0} {name} {!r} %s "), OutputChunk("y"))


# --------------------------------------------------------------------------- render


def test_render_fills_inputs_and_outputs():
    parsed = parse_template("Q: {{input:q}}\nA: {{output:a max_tokens=3}}\nQ again: {{input:q}}")
    assert parsed.render({"q": "why?", "a": "because"}) == "Q: why?\nA: because\nQ again: why?"


def test_render_shows_missing_outputs_as_placeholders():
    parsed = parse_template("Q: {{input:q}}\nA: {{output:a max_tokens=3}}")
    assert parsed.render({"q": "why?"}) == "Q: why?\nA: {{output:a}}"


def test_render_ignores_unknown_names():
    assert parse_template("{{input:q}}={{output:a}}").render({"q": "1", "a": "2", "z": "3"}) == "1=2"


def test_render_missing_input_raises_key_error():
    with pytest.raises(KeyError, match="'q'"):
        parse_template("{{input:q}} {{output:a}}").render({"a": "x"})


def test_render_non_string_value_raises_type_error():
    with pytest.raises(TypeError, match="'q'"):
        parse_template("{{input:q}} {{output:a}}").render({"q": 3})  # type: ignore[dict-item]


# --------------------------------------------------------------------------- positions


MULTILINE = """Line one.
  Line two {{input:a}}.
\tTab {{output:b max_tokens=8}}
Last {{output:}}"""


def test_error_position_on_later_line():
    err = parse_error(MULTILINE)
    assert (err.line, err.column) == (4, 6)
    assert err.placeholder == "{{output:}}"


def test_error_message_format_with_name():
    err = parse_error(MULTILINE, name="summarize")
    assert str(err) == (
        "template 'summarize', line 4, column 6: {{output:}}: empty output name: "
        "write a name after the colon, e.g. {{output:text}}"
    )
    assert err.template_name == "summarize"


def test_error_message_format_without_name():
    assert str(parse_error("x\n  {{output:}}")).startswith("line 2, column 3: {{output:}}: ")


def test_option_error_points_at_the_option():
    err = parse_error("first\nsecond {{output:b\n    max_tokens=0}}")
    assert (err.line, err.column) == (3, 5)
    assert err.placeholder == "{{output:b\n    max_tokens=0}}"


def test_template_error_is_a_value_error():
    assert isinstance(parse_error("{{output:}}"), ValueError)


# --------------------------------------------------------------------------- errors: kinds and names


def test_unknown_kind_with_suggestion():
    err = parse_error("Hi {{inptu:x}} {{output:y}}", name="f")
    assert (err.line, err.column, err.placeholder) == (1, 4, "{{inptu:x}}")
    assert str(err) == (
        "template 'f', line 1, column 4: {{inptu:x}}: unknown placeholder kind 'inptu': "
        "expected 'input' or 'output'; did you mean 'input'?"
    )


def test_unknown_kind_capitalised():
    err = parse_error("{{Output:x}}")
    assert err.placeholder == "{{Output:x}}"
    assert "unknown placeholder kind 'Output'" in str(err)
    assert "did you mean 'output'?" in str(err)


def test_unknown_kind_without_suggestion():
    err = parse_error("{{var:x}} {{output:y}}")
    assert err.reason == "unknown placeholder kind 'var': expected 'input' or 'output'"


def test_unknown_kind_with_digit_after_colon():
    err = parse_error("{{x:1}} {{output:y}}")
    assert (err.line, err.column, err.placeholder) == (1, 1, "{{x:1}}")


def test_empty_output_name():
    err = parse_error("A: {{output:}}")
    assert (err.line, err.column, err.placeholder) == (1, 4, "{{output:}}")
    assert "empty output name" in str(err)


def test_empty_input_name():
    err = parse_error("{{ input: }} {{output:y}}")
    assert (err.line, err.column, err.placeholder) == (1, 1, "{{ input: }}")
    assert "empty input name" in str(err)


def test_space_after_colon_is_explained():
    err = parse_error("{{input: doc}} {{output:y}}")
    assert err.placeholder == "{{input: doc}}"
    assert "without a space, e.g. {{input:doc}}" in str(err)


@pytest.mark.parametrize("bad", ["2x", "_x", "my-var", "a.b", "é"])
def test_invalid_name(bad):
    err = parse_error(f"Q: {{{{input:{bad}}}}} {{{{output:y}}}}")
    assert (err.line, err.column, err.placeholder) == (1, 4, f"{{{{input:{bad}}}}}")
    assert f"invalid input name {bad!r}" in str(err)


@pytest.mark.parametrize("kw", ["class", "def", "None", "True", "lambda", "async"])
def test_python_keyword_names_rejected(kw):
    err = parse_error(f"x {{{{output:{kw}}}}}")
    assert (err.line, err.column, err.placeholder) == (1, 3, f"{{{{output:{kw}}}}}")
    assert f"invalid output name {kw!r}: it is a Python keyword" in str(err)


def test_keyword_input_name_rejected():
    err = parse_error("{{input:from}} {{output:y}}")
    assert "invalid input name 'from'" in str(err)


# --------------------------------------------------------------------------- errors: structure


def test_duplicate_output():
    err = parse_error("A {{output:x}}\nB {{output:x}}")
    assert (err.line, err.column, err.placeholder) == (2, 3, "{{output:x}}")
    assert "output 'x' is generated twice (first at line 1, column 3)" in str(err)


def test_input_before_output_of_same_name():
    err = parse_error("{{input:x}}\nThen: {{output:x}}")
    assert (err.line, err.column, err.placeholder) == (2, 7, "{{output:x}}")
    assert "output 'x' is used as an input before it is generated" in str(err)


def test_output_before_input_of_same_name():
    err = parse_error("A: {{output:x}}\nAgain: {{input:x}}")
    assert (err.line, err.column, err.placeholder) == (2, 8, "{{input:x}}")
    assert "its text is already in the prompt after it, so it cannot also be an input" in str(err)


def test_adjacent_outputs():
    err = parse_error("A: {{output:a}}{{output:b}}")
    assert (err.line, err.column, err.placeholder) == (1, 16, "{{output:b}}")
    assert "outputs 'a' and 'b' are adjacent" in str(err)
    assert "put literal text between them" in str(err)


def test_outputs_separated_only_by_whitespace_are_adjacent():
    err = parse_error("A: {{output:a}} \n\t {{output:b}}")
    assert (err.line, err.column) == (2, 3)
    assert "cannot know where 'a' ends" in str(err)


def test_outputs_separated_by_text_are_fine():
    assert parse_template("{{output:a}}\nB: {{output:b}}").outputs == ("a", "b")


def test_output_then_input_with_nothing_between_is_fine():
    assert parse_template("{{output:a}}{{input:b}}{{output:c}}").outputs == ("a", "c")


def test_no_output():
    err = parse_error("Just {{input:x}} and text", name="f")
    assert str(err) == (
        "template 'f': a semantic function needs at least one {{output:...}}; "
        "mark where the model should write, e.g. {{output:answer}}"
    )
    assert (err.line, err.column, err.placeholder) == (1, 1, None)


def test_empty_template_has_no_output():
    assert "needs at least one {{output:...}}" in str(parse_error(""))


def test_unclosed_placeholder_at_end():
    err = parse_error("text\n  {{input:x")
    assert (err.line, err.column, err.placeholder) == (2, 3, "{{input:x")
    assert "unclosed placeholder: no '}}' before the end of the template" in str(err)


def test_unclosed_placeholder_before_next_placeholder():
    err = parse_error("{{input:x\nDon't stop {{output:y}}")
    assert (err.line, err.column, err.placeholder) == (1, 1, "{{input:x")
    assert "unclosed placeholder: no '}}' before the next '{{'" in str(err)


def test_single_closing_brace_is_unclosed():
    err = parse_error("{{output:a} more")
    assert (err.line, err.column, err.placeholder) == (1, 1, "{{output:a} more")
    assert "unclosed placeholder" in str(err)


def test_first_error_is_reported():
    err = parse_error("{{output:a max_tokens=0}} {{output:}} {{inptu:x}}")
    assert (err.line, err.column) == (1, 12)
    assert "max_tokens" in err.reason


# --------------------------------------------------------------------------- errors: options


def test_unknown_option_lists_allowed():
    err = parse_error("x {{output:a max_token=5}}")
    assert (err.line, err.column, err.placeholder) == (1, 14, "{{output:a max_token=5}}")
    assert err.reason == (
        "unknown option 'max_token' (did you mean 'max_tokens'?); allowed options: "
        "choices, ignore_eos, items, json, max_tokens, regex, seed, stop, temperature, top_k, top_p"
    )


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("max_tokens=0", "option 'max_tokens' must be an int >= 1, got 0"),
        ("max_tokens=2.5", "option 'max_tokens' must be an int >= 1, got 2.5 (float)"),
        ("temperature=-0.1", "option 'temperature' must be a number >= 0, got -0.1"),
        ("temperature=true", "option 'temperature' must be a number >= 0, got True (bool)"),
        ("top_p=0", "option 'top_p' must be a number in (0, 1], got 0"),
        ("top_p=1.01", "option 'top_p' must be a number in (0, 1], got 1.01"),
        ("top_k=-1", "option 'top_k' must be an int >= 0, got -1"),
        ("seed=1.5", "option 'seed' must be an int in 0..9223372036854775807 (2**63-1), got 1.5 (float)"),
        ("seed=-1", "option 'seed' must be an int in 0..9223372036854775807 (2**63-1), got -1"),
        (
            "seed=1180591620717411303424",
            "option 'seed' must be an int in 0..9223372036854775807 (2**63-1), got 1180591620717411303424",
        ),
        ("ignore_eos=1", "option 'ignore_eos' must be a bool (true/false), got 1 (int)"),
        (
            'stop=""',
            "option 'stop' must be a non-empty string or a list of non-empty strings, "
            "got an empty string",
        ),
    ],
)
def test_invalid_option_value(option, expected):
    template = "A: {{output:a " + option + "}}"
    err = parse_error(template)
    assert (err.line, err.column, err.placeholder) == (1, 15, template[3:])
    assert err.reason == expected


def test_quoted_number_is_explained():
    err = parse_error('{{output:a max_tokens="64"}}')
    assert err.reason == (
        "option 'max_tokens' must be an int >= 1, got '64' (str); "
        "write numbers and true/false without quotes, e.g. max_tokens=64"
    )


def test_unquoted_number_stop_is_explained():
    err = parse_error("{{output:a stop=42}}")
    assert err.reason.endswith('; quote it, e.g. stop="42"')


def test_bare_word_value_must_be_quoted():
    err = parse_error("{{output:a stop=END}}")
    assert (err.line, err.column) == (1, 12)
    assert err.reason == (
        "value 'END' of option 'stop' is not a number or true/false; "
        'quote strings, e.g. stop="END"'
    )


@pytest.mark.parametrize("word", ["nan", "inf", "1_000", "0x10"])
def test_non_decimal_numbers_are_not_values(word):
    err = parse_error("{{output:a temperature=" + word + "}}")
    assert f"value {word!r} of option 'temperature' is not a number" in err.reason


def test_repeated_non_stop_option():
    err = parse_error("{{output:a seed=1 seed=2}}")
    assert (err.line, err.column) == (1, 19)
    assert "option 'seed' is given twice (first at line 1, column 12)" in err.reason


def test_options_on_input():
    err = parse_error("Q: {{input:q max_tokens=3}} {{output:a}}")
    assert (err.line, err.column, err.placeholder) == (1, 14, "{{input:q max_tokens=3}}")
    assert err.reason == (
        "inputs take no options (got 'max_tokens=3'); options belong on "
        "{{output:...}} placeholders"
    )


def test_option_without_value():
    err = parse_error("{{output:a max_tokens}}")
    assert (err.line, err.column, err.placeholder) == (1, 12, "{{output:a max_tokens}}")
    assert err.reason == "option 'max_tokens' has no value: write max_tokens=VALUE"


def test_option_without_name():
    err = parse_error("{{output:a =3}}")
    assert (err.line, err.column) == (1, 12)
    assert err.reason == "missing option name before '='"


def test_option_with_empty_value():
    err = parse_error("{{output:a max_tokens=}}")
    assert (err.line, err.column) == (1, 12)
    assert "option 'max_tokens' has no value after '='" in err.reason


def test_spaces_around_equals():
    err = parse_error("{{output:a max_tokens = 3}}")
    assert (err.line, err.column) == (1, 12)
    assert err.reason == "no spaces are allowed around '=': write max_tokens=VALUE"


def test_unterminated_quote():
    err = parse_error('Go: {{output:a stop="\\n}}\nmore text')
    assert (err.line, err.column, err.placeholder) == (1, 16, '{{output:a stop="\\n}}')
    assert err.reason == "unterminated quoted string in option 'stop': add the closing \""


def test_unsupported_escape():
    err = parse_error(r'{{output:a stop="\q"}}')
    assert (err.line, err.column) == (1, 12)
    assert "unsupported escape '\\q'" in err.reason


def test_text_glued_after_quoted_value():
    err = parse_error('{{output:a stop="x"y}}')
    assert (err.line, err.column) == (1, 12)
    assert err.reason == "expected a space or '}}' after the quoted value of 'stop'"


# --------------------------------------------------------------------------- validate_options


def test_validate_options_normalises():
    assert validate_options(
        {"max_tokens": 8, "temperature": 1, "top_p": 1, "stop": ["a", "b"], "seed": None},
        where="@semantic_function 'f'",
    ) == {"max_tokens": 8, "temperature": 1.0, "top_p": 1.0, "stop": ("a", "b")}


def test_validate_options_single_stop_string():
    assert validate_options({"stop": "\n"}, where="w") == {"stop": ("\n",)}


def test_validate_options_rejects_string_numbers():
    with pytest.raises(TypeError) as info:
        validate_options({"max_tokens": "64"}, where="%%semantic --max-tokens")
    assert str(info.value) == (
        "%%semantic --max-tokens: option 'max_tokens' must be an int >= 1, got '64' (str)"
    )


def test_validate_options_rejects_out_of_range():
    with pytest.raises(ValueError) as info:
        validate_options({"top_p": 0.0}, where="defaults")
    assert str(info.value) == "defaults: option 'top_p' must be a number in (0, 1], got 0.0"


def test_validate_options_rejects_unknown_key():
    with pytest.raises(ValueError) as info:
        validate_options({"temprature": 0.5}, where="defaults")
    assert str(info.value) == (
        "defaults: unknown option 'temprature' (did you mean 'temperature'?); allowed "
        "options: choices, ignore_eos, items, json, max_tokens, regex, seed, stop, temperature, top_k, top_p"
    )


def test_validate_options_rejects_bool_as_int():
    with pytest.raises(TypeError, match="'max_tokens'"):
        validate_options({"max_tokens": True}, where="w")


def test_validate_options_rejects_infinite_temperature():
    with pytest.raises(ValueError, match="'temperature'"):
        validate_options({"temperature": float("inf")}, where="w")


def test_validate_options_rejects_non_string_stop_items():
    with pytest.raises(TypeError, match="'stop'"):
        validate_options({"stop": ["a", 1]}, where="w")


# --------------------------------------------------------------------------- properties


@given(st.text(min_size=1).filter(lambda t: "{{" not in t))
def test_text_without_double_brace_is_one_leading_chunk(text):
    parsed = parse_template(text + "{{output:o}}")
    assert parsed.chunks == (TextChunk(text), OutputChunk("o"))


@given(
    st.lists(
        st.text(alphabet=st.sampled_from("ab {}:\n\"'=x"), max_size=12).filter(
            lambda t: "{{" not in t and not t.endswith("{")
        ),
        min_size=3,
        max_size=3,
    )
)
def test_render_restores_literal_text(parts):
    before, middle, after = parts
    template = before + "{{input:q}}" + middle + "[{{output:a}}]" + after
    parsed = parse_template(template)
    assert parsed.render({"q": "Q", "a": "A"}) == before + "Q" + middle + "[A]" + after
