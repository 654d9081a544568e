"""Chat-style semantic functions: the template syntax, server-side rendering with the model's chat
template, and prefix sharing across chat functions (on the tiny model, whose chat format is ChatML
written as plain text, so the rendered prompt can be counted byte for byte)."""

from __future__ import annotations

import pytest

import parrot_nb
from engine_server.chat import ChatTemplateError, Gen, end_of_turn, render_program
from engine_server.manager.graph import _messages
from engine_server.models import TINY_CHAT_TEMPLATE, ChatFormat
from engine_server.protocol import ChunkSpec, FunctionSpec
from parrot_nb import SemanticFunction, TemplateError

CHATML = ChatFormat(TINY_CHAT_TEMPLATE)
LLAMA3 = ChatFormat(
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    bos_token="<|begin_of_text|>",
    add_bos=True,
)


# ----------------------------------------------------------------------------- rendering


def test_chat_program_keeps_each_piece_as_its_own_segment_with_the_template_text_attached():
    program = render_program(
        CHATML, [("system", ["Be brief."]), ("user", ["Task: ", "add two numbers"]), ("assistant", [Gen(0)])]
    )
    assert program == [
        "<|im_start|>system\nBe brief.",
        "<|im_end|>\n<|im_start|>user\nTask: ",
        "add two numbers",
        "<|im_end|>\n<|im_start|>assistant\n",
        Gen(0),
    ]


def test_later_replies_follow_the_earlier_ones_end_of_turn():
    program = render_program(CHATML, [("user", ["a"]), ("assistant", [Gen(0)]), ("user", ["b"]), ("assistant", [Gen(1)])])
    assert program[3:] == ["<|im_end|>\n<|im_start|>user\nb", "<|im_end|>\n<|im_start|>assistant\n", Gen(1)]


def test_a_template_that_trims_contents_is_rendered_from_the_real_texts_one_segment_per_message():
    program = render_program(LLAMA3, [("user", ["  Hi ", "there  "]), ("assistant", [Gen(0)])])
    # The trimmed text is what the model sees; the leading BOS is left to the engine (add_bos).
    assert program == [
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        Gen(0),
    ]


def test_a_rendered_bos_is_kept_when_the_engine_adds_none():
    fmt = ChatFormat("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}", bos_token="<s>", add_bos=False)
    assert render_program(fmt, [("user", ["x"]), ("assistant", [Gen(0)])])[0] == "<s>x"


def test_end_of_turn_is_the_token_the_template_writes_after_a_reply():
    assert end_of_turn(CHATML) == "<|im_end|>"
    assert end_of_turn(LLAMA3) == "<|eot_id|>"


def test_a_template_that_refuses_the_conversation_raises_its_message():
    fmt = ChatFormat("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="refused the conversation: no system role"):
        render_program(fmt, [("system", ["s"]), ("user", ["u"]), ("assistant", [Gen(0)])])


def test_a_template_that_drops_replies_is_refused():
    fmt = ChatFormat("{% for m in messages if m['role'] != 'assistant' %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="does not write out every assistant reply"):
        render_program(fmt, [("user", ["u"]), ("assistant", [Gen(0)])])


def test_chunks_become_messages_split_at_role_markers_and_replies():
    fn = FunctionSpec(
        "f",
        [ChunkSpec("role", name="system"), ChunkSpec("text", text="S"), ChunkSpec("role", name="user"),
         ChunkSpec("text", text="U "), ChunkSpec("input", name="x"), ChunkSpec("output", name="a"),
         ChunkSpec("text", text="more"), ChunkSpec("output", name="b")],
        chat=True,
    )  # fmt: skip
    messages = _messages(fn, lambda c: c.text or f"<{c.name}>")
    assert messages == [
        ("system", ["S"]), ("user", ["U ", "<x>"]), ("assistant", [Gen(0)]), ("user", ["more"]), ("assistant", [Gen(1)])
    ]  # fmt: skip


# ----------------------------------------------------------------------------- template syntax


def test_role_markers_need_a_chat_function():
    with pytest.raises(TemplateError, match=r"line 1, column 1.*role markers belong to chat functions: add --chat"):
        SemanticFunction.from_template("f", "{{role:system}}Be brief.{{role:user}}Hi {{output:a}}")


def test_a_role_marker_names_system_or_user_only():
    with pytest.raises(TemplateError, match=r"\{\{role:assistant\}\}.*an assistant reply is an \{\{output:...\}\}"):
        SemanticFunction.from_template("f", "{{role:assistant}}Hi {{output:a}}", chat=True)


def test_a_chat_function_sends_its_role_markers_and_chat_flag():
    f = SemanticFunction.from_template("f", "{{role:system}}S{{role:user}}{{input:q}}{{output:a}}", chat=True)
    assert f.spec.chat is True
    assert [c.kind for c in f.spec.chunks] == ["role", "text", "role", "input", "output"]
    assert "chat" in repr(f)


def test_the_magic_defines_a_chat_function_with_chat(ipython_shell):
    ipython_shell.run_cell_magic("semantic", "greet --chat --max-tokens 5", "{{role:system}}Be kind.\n{{role:user}}Hi {{input:name}}{{output:reply}}\n")
    fn = ipython_shell.user_ns["greet"]
    assert fn.chat and fn.inputs == ("name",) and fn.sampling("reply").max_tokens == 5


# ----------------------------------------------------------------------------- on a server


def _finished(server, request_ids=None):
    return [e for e in server.events() if e["type"] == "RequestFinished"]


def test_a_chat_call_is_rendered_with_the_models_template_on_the_server(connected):
    ask = SemanticFunction.from_template("ask", "{{role:system}}You are terse.{{role:user}}{{input:q}}{{output:a max_tokens=4}}", chat=True)
    ask(q="What is 2+2?").get(timeout=60)
    rendered = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    # The tiny model's tokens are bytes (plus BOS), so the prompt's length pins the rendered text.
    assert _finished(connected)[-1]["prompt_tokens"] == 1 + len(rendered.encode())


def test_two_chat_functions_with_one_system_text_share_its_cached_context(connected):
    system = "You are a careful reviewer of Python code who answers in one short sentence. " * 3
    review = SemanticFunction.from_template("review", f"{{{{role:system}}}}{system}{{{{role:user}}}}Review: {{{{input:code}}}}{{{{output:r max_tokens=2}}}}", chat=True)
    explain = SemanticFunction.from_template("explain", f"{{{{role:system}}}}{system}{{{{role:user}}}}Explain: {{{{input:code}}}}{{{{output:e max_tokens=2}}}}", chat=True)
    review(code="x = 1").get(timeout=60)
    explain(code="y = 2").get(timeout=60)
    first, second = _finished(connected)[-2:]
    shared = 1 + len(f"<|im_start|>system\n{system}".encode())  # BOS + the first segment
    assert first["cached_tokens"] == 0 or first["cached_tokens"] < shared
    assert second["cached_tokens"] >= shared


def test_a_chat_reply_stops_at_the_end_of_turn_text(connected):
    # The tiny model writes noise; whatever it writes, the end-of-turn text never ends up in a reply.
    ask = SemanticFunction.from_template("ask2", "{{role:user}}{{input:q}}{{output:a max_tokens=40 temperature=1 seed=7}}", chat=True)
    reply = ask(q="<|im_end|>" * 3).get(timeout=60)
    assert "<|im_end|>" not in reply


def test_the_server_refuses_role_markers_in_a_call_that_is_not_chat(connected):
    from engine_server.protocol import SubmitCall, new_id
    from parrot_nb.client import ServerError

    client = parrot_nb.session.require_client()
    fn = FunctionSpec("raw", [ChunkSpec("role", name="user"), ChunkSpec("text", text="Hi"), _output("a")])
    with pytest.raises(ServerError, match="call of 'raw': role markers belong to chat functions"):
        client.call(SubmitCall(client.app_id("raw"), new_id(), fn, {}, {"a": new_id()}), timeout=10)


def _output(name):
    from engine_server.protocol import SamplingSpec

    return ChunkSpec("output", name=name, sampling=SamplingSpec(max_tokens=2))


def _chat_call(graph, text="Hi"):
    from engine_server.protocol import SubmitCall

    graph.open_app("app", "app")
    fn = FunctionSpec("ask", [ChunkSpec("role", name="system"), ChunkSpec("text", text=text), _output("a")], chat=True)
    return SubmitCall("app", "r1", fn, {}, {"a": "v1"})


def test_a_chat_call_is_refused_at_submission_when_the_model_has_no_chat_template():
    from engine_server.manager.graph import Graph, GraphError

    graph = Graph(chat_format=None)
    with pytest.raises(GraphError, match="the served model has no chat template; define it without chat"):
        graph.add_request(_chat_call(graph))


def test_a_chat_call_whose_conversation_the_template_rejects_is_refused_at_submission_with_its_reason():
    from engine_server.manager.graph import Graph, GraphError

    fmt = ChatFormat("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}")
    graph = Graph(chat_format=fmt)
    with pytest.raises(GraphError, match="call of 'ask': .*System role not supported"):
        graph.add_request(_chat_call(graph))


def test_a_misspelt_role_marker_in_a_chat_function_suggests_role():
    with pytest.raises(TemplateError, match=r"unknown placeholder kind 'rol': expected 'input', 'output' or 'role'; did you mean 'role'\?"):
        SemanticFunction.from_template("f", "{{rol:system}}Hi {{output:a}}", chat=True)


def test_a_text_holding_the_reserved_marker_character_is_refused_with_a_reason():
    with pytest.raises(ChatTemplateError, match="U\\+E000"):
        render_program(CHATML, [("user", ["a \ue000 b"]), ("assistant", [Gen(0)])])


def test_a_chat_call_whose_filled_in_text_cannot_be_rendered_fails_its_variable_with_the_reason():
    from engine_server.manager.executor import Executor
    from engine_server.manager.graph import Graph
    from engine_server.manager.scheduler import Scheduler
    from engine_server.protocol import InputValue, SubmitCall, VarFailed

    events = []
    graph = Graph(chat_format=CHATML)
    executor = Executor(graph, Scheduler(), events.append, lambda engine, msg: None)
    graph.open_app("app", "app")
    fn = FunctionSpec("ask", [ChunkSpec("input", name="q"), _output("a")], chat=True)
    executor.submit(SubmitCall("app", "r1", fn, {"q": InputValue(text="bad \ue000 text")}, {"a": "v1"}))
    executor.activate("v1", "latency")
    failed = [e for e in events if isinstance(e, VarFailed)]
    assert len(failed) == 1 and "call of 'ask'" in failed[0].error and "U+E000" in failed[0].error
    assert graph.requests["r1"].state == "failed"
