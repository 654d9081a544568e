"""Semantic functions called like Python functions; variables as futures."""

from __future__ import annotations

import asyncio

import pytest

import parrot_nb
from engine_server.protocol import SamplingSpec
from parrot_nb import NotConnectedError, SemanticFunction, SemanticVariable, TemplateError, semantic_function
from tests.tiny_oracle import expected, expected_text

ASK = "Context: {{input:context}}\nQuestion: {{input:question}}\nAnswer: {{output:answer}}"


def test_from_template_exposes_name_inputs_and_outputs_in_order() -> None:
    fn = SemanticFunction.from_template("ask", ASK)
    assert (fn.name, fn.inputs, fn.outputs) == ("ask", ("context", "question"), ("answer",))


def test_decorator_uses_the_docstring_as_template_and_takes_defaults() -> None:
    @semantic_function(max_tokens=7)
    def summarize(doc):  # noqa: ANN001
        """
        Summarize: {{input:doc}}
        Summary: {{output:summary temperature=0.5}}
        """

    assert isinstance(summarize, SemanticFunction)
    assert summarize.template == "Summarize: {{input:doc}}\nSummary: {{output:summary temperature=0.5}}"
    assert summarize.sampling("summary") == SamplingSpec(max_tokens=7, temperature=0.5)


def test_placeholder_options_override_function_defaults() -> None:
    fn = SemanticFunction.from_template("f", 'X {{output:a max_tokens=3 stop="\\n"}} Y {{output:b}}', max_tokens=9, stop="END")
    assert fn.sampling("a") == SamplingSpec(max_tokens=3, stop=["\n"])
    assert fn.sampling("b") == SamplingSpec(max_tokens=9, stop=["END"])


def test_invalid_default_is_refused_at_definition() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        SemanticFunction.from_template("f", "{{output:a}}", max_tokens=0)


def test_unknown_default_is_refused_at_definition() -> None:
    with pytest.raises(ValueError, match="max_tokenz"):
        SemanticFunction.from_template("f", "{{output:a}}", max_tokenz=3)


def test_bad_template_raises_template_error_at_definition() -> None:
    with pytest.raises(TemplateError) as err:
        SemanticFunction.from_template("f", "line one\n  {{output:}}")
    assert (err.value.line, err.value.column) == (2, 3)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {"context": "c"}, "missing a required argument: 'question'"),
        ((), {"context": "c", "question": "q", "extra": 1}, "got an unexpected keyword argument 'extra'"),
        (("c", "q", "z"), {}, "too many positional arguments"),
        (("c",), {"context": "c2", "question": "q"}, "multiple values for argument 'context'"),
    ],
)
def test_bad_call_raises_type_error_naming_the_argument(args, kwargs, message) -> None:
    fn = SemanticFunction.from_template("ask", ASK)
    with pytest.raises(TypeError, match=rf"ask\(\): {message}"):
        fn(*args, **kwargs)


def test_positional_and_keyword_arguments_bind_like_python() -> None:
    fn = SemanticFunction.from_template("ask", ASK)
    assert fn.bind("c", question="q") == {"context": "c", "question": "q"}


def test_call_without_a_server_says_how_to_start_one() -> None:
    parrot_nb.disconnect()
    fn = SemanticFunction.from_template("ask", ASK)
    with pytest.raises(NotConnectedError, match="%parrot start"):
        fn("c", "q")


def test_call_returns_a_variable_immediately_and_get_returns_text(connected) -> None:
    fn = SemanticFunction.from_template("ask", ASK, max_tokens=4)
    answer = fn(context="sky", question="colour?")
    assert isinstance(answer, SemanticVariable) and answer.state == "pending"
    assert answer.get(timeout=120) == expected_text(fn, context="sky", question="colour?")
    assert answer.state == "done"


def test_several_outputs_come_back_as_a_named_tuple(connected) -> None:
    fn = SemanticFunction.from_template("pair", "A: {{output:first max_tokens=2}}\nB: {{output:second max_tokens=2}}")
    out = fn()
    assert out._fields == ("first", "second")
    assert (out.first.name, out.second.name) == ("first", "second")
    want = expected(fn)
    assert (out.first.get(timeout=120), out.second.get(timeout=120)) == (want["first"], want["second"])


def test_non_string_inputs_are_rendered_with_str(connected) -> None:
    fn = SemanticFunction.from_template("num", "N: {{input:n}} -> {{output:o max_tokens=2}}")
    assert fn(n=[1, 2]).get(timeout=120) == expected_text(fn, n="[1, 2]")
    submitted = [e for e in connected.events() if e["type"] == "SubmitCall" and e["function"]["name"] == "num"]
    assert submitted[-1]["inputs"]["n"] == {"text": "[1, 2]", "var_id": None}


def test_greedy_calls_on_the_same_prompt_give_the_same_text(connected) -> None:
    fn = SemanticFunction.from_template("det", "Same: {{input:x}} {{output:o max_tokens=5}}")
    first, second = fn(x="a"), fn(x="a")
    assert first.id != second.id  # two calls, two requests
    assert first.get(timeout=120) == second.get(timeout=120) == expected_text(fn, x="a")


def test_await_resolves_a_variable(connected) -> None:
    fn = SemanticFunction.from_template("aw", "Await: {{output:o max_tokens=3}}")
    v = fn()

    async def main() -> str:
        return await v

    assert asyncio.run(main()) == expected_text(fn)


def test_get_with_timeout_raises_timeout_error_and_keeps_running(connected) -> None:
    fn = SemanticFunction.from_template("long", "Long: {{output:o max_tokens=300 ignore_eos=true}}")
    v = fn()
    with pytest.raises(TimeoutError, match="keeps running"):
        v.get(timeout=0.01)
    assert v.get(timeout=120) == expected_text(fn)


def test_invalid_perf_is_refused() -> None:
    parrot_nb.disconnect()
    with pytest.raises(ValueError, match="latency' or 'throughput"):
        SemanticVariable(None, "a", "v", "o", "f").get(perf="fast")  # type: ignore[arg-type]


def test_displaying_a_variable_streams_it_to_its_final_text(connected, ipython_shell) -> None:
    fn = SemanticFunction.from_template("shown", "Show: {{output:o max_tokens=6}}")
    v = fn()
    from IPython.utils.capture import capture_output

    with capture_output() as captured:
        v._ipython_display_()
    assert v.state == "done"
    assert captured.outputs[0].data["text/plain"]  # the first display (pending) ...
    assert v._repr_mimebundle_()["text/plain"] == v.get()  # ... updated in place to the value


def test_a_retried_request_streams_from_the_start_again() -> None:
    from engine_server.protocol import RequestDispatched, TokenDelta

    v = SemanticVariable(None, "app", "v1", "o", "f")  # type: ignore[arg-type]
    v._on_event(RequestDispatched("app", "r", 0, 0.0))
    v._on_event(TokenDelta("app", "v1", "first attempt "))
    v._on_event(RequestDispatched("app", "r", 0, 1.0))  # the engine died; the request runs again
    v._on_event(TokenDelta("app", "v1", "second"))
    assert v.partial == "second"


def test_disconnecting_fails_running_variables_instead_of_leaving_them_waiting(connected) -> None:
    fn = SemanticFunction.from_template("cut", "Cut: {{output:o max_tokens=1500 ignore_eos=true}}")
    v = fn()
    v.activate()
    parrot_nb.disconnect()
    with pytest.raises(parrot_nb.SemanticVariableError, match="cancelled: .* is gone: it disconnected"):
        v.get(timeout=30)
