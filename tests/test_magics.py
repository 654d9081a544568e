"""``%%semantic`` and ``%parrot`` through a real IPython InteractiveShell.

The shell is IPython's own test shell (``IPython.testing.globalipapp``), with
``%load_ext parrot_nb`` as a notebook would do it; servers are real engine
servers (conftest's ``shared_server`` / ``connected``, or ``%parrot start``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator

import pytest

import parrot_nb
from engine_server.protocol import CONNECTION_PREFIX, runtime_dir
from parrot_nb import session
from engine_server.protocol import pid_alive
from parrot_nb.magics import PARROT_USAGE
from tests.tiny_oracle import expected, expected_text

# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def shell(ipython_shell):
    return ipython_shell


@pytest.fixture
def ip(shell) -> Iterator:
    """The shell, with no engine server connected, and its namespace restored afterwards."""
    session.disconnect()
    before = set(shell.user_ns)
    yield shell
    for name in set(shell.user_ns) - before:
        shell.user_ns.pop(name, None)
    _cleanup_session()


def _cleanup_session() -> None:
    """Disconnect, and stop a server this process started if a test left it running."""
    server = session._server
    session.disconnect()
    if server is not None and server.poll() is None:
        server.terminate()
        try:
            server.wait(20)
        except Exception:
            server.kill()
            server.wait()
    session._server = None


def _define(ip, line: str, body: str):
    return ip.run_cell_magic("semantic", line, body)


# --------------------------------------------------------------------------- %%semantic: definitions


def test_semantic_defines_function_in_user_ns_with_inputs_and_outputs(ip):
    result = ip.run_cell(
        "%%semantic summarize\n"
        "Text: {{input:text}}\n"
        "Audience: {{input:audience}}\n"
        "Summary: {{output:summary}}\n"
    )
    assert result.success, result.error_in_exec
    fn = ip.user_ns["summarize"]
    assert isinstance(fn, parrot_nb.SemanticFunction)
    assert fn.name == "summarize"
    assert fn.inputs == ("text", "audience")
    assert fn.outputs == ("summary",)


def test_semantic_magic_returns_the_function_it_defines(ip):
    fn = _define(ip, "echo", "Say {{input:x}}: {{output:y}}\n")
    assert fn is ip.user_ns["echo"]


def test_semantic_flags_become_sampling_defaults(ip):
    line = r"tuned --max-tokens 8 --temperature 0.7 --top-p 0.9 --top-k 5 --seed 42 --stop \n --stop END"
    fn = _define(ip, line, "Q: {{input:q}}\nA: {{output:a}}\n")
    s = fn.sampling("a")
    assert s.max_tokens == 8
    assert s.temperature == pytest.approx(0.7)
    assert s.top_p == pytest.approx(0.9)
    assert s.top_k == 5
    assert s.seed == 42
    assert list(s.stop) == ["\n", "END"]  # the escape on the magic line is decoded


def test_semantic_without_flags_uses_sampling_spec_defaults(ip):
    fn = _define(ip, "plain", "Q: {{input:q}}\nA: {{output:a}}\n")
    assert fn.defaults == {}
    s = fn.sampling("a")
    assert s.seed is None
    assert list(s.stop) == []


def test_semantic_placeholder_option_overrides_flag(ip):
    fn = _define(
        ip,
        "pair --max-tokens 8 --temperature 0.5 --stop END",
        'A: {{output:a max_tokens=3 stop="!"}}\nB: {{output:b}}\n',
    )
    a, b = fn.sampling("a"), fn.sampling("b")
    assert (a.max_tokens, a.temperature, list(a.stop)) == (3, 0.5, ["!"])
    assert (b.max_tokens, b.temperature, list(b.stop)) == (8, 0.5, ["END"])


def test_semantic_quoted_stop_flag_is_unquoted_and_unescaped(ip):
    fn = _define(ip, r'qstop --stop "\n\n" --stop "a b"', "Q: {{input:q}}\nA: {{output:a}}\n")
    assert list(fn.sampling("a").stop) == ["\n\n", "a b"]


def test_semantic_stop_flag_with_escape_keeps_non_ascii_text(ip):
    fn = _define(ip, r"ustop --stop é\n", "Q: {{input:q}}\nA: {{output:a}}\n")
    assert list(fn.sampling("a").stop) == ["é\n"]


def test_semantic_magic_line_is_not_variable_expanded(ip):
    ip.user_ns["x"] = 5
    result = ip.run_cell("%%semantic noexp --stop $x --stop {x}\nQ: {{input:q}}\nA: {{output:a}}\n")
    assert result.success, result.error_in_exec
    assert list(ip.user_ns["noexp"].sampling("a").stop) == ["$x", "{x}"]


def test_semantic_body_keeps_braces_json_and_dollars_literally(ip):
    ip.user_ns["x"] = 5
    body = (
        'Reply as JSON: {"name": "{x}", "tags": [{"k": 1}]}\n'
        "Jinja-like {{ foo }} and ${x} and $x stay, as do {{x: 1}} and a lone } or {\n"
        "Input: {{input:q}}\n"
        "JSON: {{output:json}}\n"
    )
    result = ip.run_cell("%%semantic jsonish\n" + body)
    assert result.success, result.error_in_exec
    fn = ip.user_ns["jsonish"]
    assert fn.template == body[:-1]
    assert fn.inputs == ("q",)
    assert fn.parsed.render({"q": "Q", "json": "J"}) == body[:-1].replace("{{input:q}}", "Q").replace(
        "{{output:json}}", "J"
    )


def test_semantic_drops_only_the_final_newline(ip):
    fn = _define(ip, "trail", "A {{output:x}}\n\n")
    assert fn.template == "A {{output:x}}\n"


def test_semantic_body_without_final_newline_is_kept_whole(ip):
    fn = _define(ip, "whole", "A {{output:x}} end")
    assert fn.template == "A {{output:x}} end"


# --------------------------------------------------------------------------- %%semantic: errors


def test_semantic_bad_template_raises_template_error_naming_line_and_column(ip, capsys):
    with pytest.raises(parrot_nb.TemplateError) as info:
        _define(ip, "broken", "first line\nsecond {{output:}}\n")
    assert (info.value.line, info.value.column) == (2, 8)
    assert "line 2, column 8" in str(info.value)
    assert "broken" in str(info.value)
    assert "line 2, column 8" in capsys.readouterr().out  # shown without IPython's traceback noise
    assert "broken" not in ip.user_ns


def test_semantic_bad_template_in_a_cell_fails_the_cell_and_defines_nothing(ip):
    result = ip.run_cell("%%semantic broken2\nno output here\n")
    assert not result.success
    assert isinstance(result.error_in_exec, parrot_nb.TemplateError)
    assert "broken2" not in ip.user_ns


def test_semantic_bad_flag_value_raises_naming_the_option_and_defines_nothing(ip):
    with pytest.raises(ValueError, match="max_tokens"):
        _define(ip, "badflag --max-tokens 0", "A: {{output:a}}\n")
    assert "badflag" not in ip.user_ns


def test_semantic_out_of_range_top_p_flag_is_rejected(ip):
    with pytest.raises(ValueError, match="top_p"):
        _define(ip, "badtopp --top-p 1.5", "A: {{output:a}}\n")
    assert "badtopp" not in ip.user_ns


def test_semantic_failed_redefinition_keeps_the_previous_function(ip):
    first = _define(ip, "keep", "A: {{output:a}}\n")
    with pytest.raises(parrot_nb.TemplateError):
        _define(ip, "keep", "A: {{output:a}} {{outptu:b}}\n")
    assert ip.user_ns["keep"] is first


def test_semantic_name_that_is_not_an_identifier_is_rejected(ip):
    with pytest.raises(ValueError, match="identifier"):
        _define(ip, "not-a-name", "A: {{output:a}}\n")
    assert "not-a-name" not in ip.user_ns


# --------------------------------------------------------------------------- calling without a server


def test_call_with_missing_input_raises_type_error_naming_it(ip):
    fn = _define(ip, "two_in", "{{input:a}} and {{input:b}}: {{output:c}}\n")
    with pytest.raises(TypeError, match=r"two_in\(\).*'b'"):
        fn("only a")


def test_call_with_unexpected_input_raises_type_error_naming_it(ip):
    fn = _define(ip, "one_in", "{{input:a}}: {{output:c}}\n")
    with pytest.raises(TypeError, match=r"one_in\(\).*'zzz'"):
        fn(a="x", zzz="y")


def test_call_without_a_server_raises_not_connected_mentioning_parrot_start(ip):
    fn = _define(ip, "lonely", "{{input:a}}: {{output:c}}\n")
    with pytest.raises(parrot_nb.NotConnectedError, match="%parrot start"):
        fn("x")


def test_parrot_status_without_a_server_raises_not_connected(ip):
    with pytest.raises(parrot_nb.NotConnectedError):
        ip.run_line_magic("parrot", "status")


# --------------------------------------------------------------------------- calling with a server


def test_call_returns_a_pending_variable_and_get_returns_text(ip, connected):
    fn = _define(ip, "greet", "Hello {{input:who}}! {{output:reply max_tokens=4}}\n")
    var = fn(who="world")
    assert isinstance(var, parrot_nb.SemanticVariable)
    assert var.name == "reply" and var.function == "greet"
    parrot_nb.status()  # a full round trip: had the call started, the server's log would say so
    assert [e for e in connected.events() if e["type"] == "RequestQueued" and e["function"] == "greet"] == []
    value = var.get(timeout=60)
    assert value == expected_text(fn, who="world")
    assert var.ready and var.state == "done"
    assert var.get(timeout=1) == value


def test_call_through_a_cell_binds_the_result_in_user_ns(ip, connected):
    _define(ip, "cellcall", "Hi {{input:who}} {{output:r max_tokens=2}}\n")
    result = ip.run_cell("v = cellcall('there')\ntext = v.get(timeout=60)")
    assert result.success, result.error_in_exec
    assert isinstance(ip.user_ns["v"], parrot_nb.SemanticVariable)
    assert ip.user_ns["text"] == expected_text(ip.user_ns["cellcall"], who="there")


def test_two_output_template_returns_named_tuple_of_variables(ip, connected):
    fn = _define(ip, "qa --max-tokens 3", "Topic {{input:t}}\nQuestion: {{output:question}}\nAnswer: {{output:answer}}\n")
    result = fn("cats")
    assert isinstance(result, tuple) and len(result) == 2
    assert result._fields == ("question", "answer")
    assert [v.name for v in result] == ["question", "answer"]
    assert result.question is result[0] and result.answer is result[1]
    want = expected(fn, t="cats")
    assert result.answer.get(timeout=60) == want["answer"]
    assert result.question.get(timeout=60) == want["question"]


def test_calls_in_two_apps_show_up_as_two_applications(ip, connected):
    fn = _define(ip, "appcall", "Hi {{input:who}} {{output:r max_tokens=2}}\n")
    with parrot_nb.app("notebook-a"):
        va = fn("a")
    with parrot_nb.app("notebook-b"):
        vb = fn("b")
    assert va.get(timeout=60) == expected_text(fn, who="a")
    assert vb.get(timeout=60) == expected_text(fn, who="b")
    assert va.app_id != vb.app_id
    apps = {a.name: a for a in parrot_nb.status().apps}
    assert {"notebook-a", "notebook-b"} <= set(apps)
    assert apps["notebook-a"].app_id == va.app_id and apps["notebook-b"].app_id == vb.app_id
    assert apps["notebook-a"].requests >= 1 and apps["notebook-b"].requests >= 1


def test_calls_outside_an_app_block_use_the_notebook_default_app(ip, connected):
    fn = _define(ip, "defaultapp", "Hi {{input:who}} {{output:r max_tokens=2}}\n")
    v = fn("x")
    names = {a.app_id: a.name for a in parrot_nb.status().apps}
    assert names[v.app_id] == f"notebook-{os.getpid()}"


def test_parrot_status_lists_engines_and_apps(ip, connected):
    out = repr(ip.run_line_magic("parrot", "status"))
    assert f"pid {connected.info.pid}" in out
    assert "engine 0:" in out


def test_parrot_start_refuses_while_connected(ip, connected):
    with pytest.raises(RuntimeError, match="already connected"):
        ip.run_line_magic("parrot", "start")
    assert session.current_client() is not None


# --------------------------------------------------------------------------- %parrot


def test_parrot_start_status_stop(ip, capsys):
    ip.run_line_magic("parrot", "start")
    try:
        assert "engine server started" in capsys.readouterr().out
        client = session.current_client()
        assert client is not None
        pid = client.info.pid
        assert pid_alive(pid)
        status = repr(ip.run_line_magic("parrot", "status"))
        assert f"pid {pid}" in status
        assert "engine 0:" in status
        assert "model SmolLM2-135M-Instruct (Q4_1)" in status  # the default, named
        ip.run_line_magic("parrot", "stop")
        assert "engine server stopped" in capsys.readouterr().out
        assert session._client is None
        assert session.current_client() is None
        assert not pid_alive(pid)
    finally:
        _cleanup_session()


def test_parrot_start_passes_engine_sizing_to_the_server(ip, capsys):
    ip.run_line_magic("parrot", "start --model tiny --max-running 5 --kv-cache-mb 2")
    try:
        deadline = time.monotonic() + 120
        while not (engines := session.status().engines) or engines[0].kv_blocks_total == 0:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert (engines[0].capacity, engines[0].kv_blocks_total) == (5, 64)  # 2 MiB / 32 KiB blocks
    finally:
        ip.run_line_magic("parrot", "stop")
        _cleanup_session()


def test_parrot_start_with_a_bad_engine_size_shows_the_servers_reason(ip):
    with pytest.raises(session.ServerStartError, match="--max-running: must be at least 1"):
        ip.run_line_magic("parrot", "start --max-running 0")
    assert session.current_client() is None


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_parrot_start_on_cuda_runs_one_engine_per_visible_gpu_each_pinned_to_its_own(ip, monkeypatch, capsys):
    # The same rule as `parrot-nb serve` (test_server); without CUDA here the engines cannot
    # start, but the server has already planned them, one per GPU the user left visible.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    ip.run_line_magic("parrot", "start --model tiny --device cuda")
    try:
        assert "2 engines)" in capsys.readouterr().out
        assert [(e.engine_id, e.gpu) for e in parrot_nb.status().engines] == [(0, "3"), (1, "5")]
        shown = repr(ip.run_line_magic("parrot", "status"))
        assert "engine 0 on GPU 3:" in shown and "engine 1 on GPU 5:" in shown
    finally:
        ip.run_line_magic("parrot", "stop")


def test_parrot_start_on_cpu_runs_one_engine(ip, capsys):
    ip.run_line_magic("parrot", "start --model tiny")
    try:
        assert "1 engine)" in capsys.readouterr().out
        assert [(e.engine_id, e.gpu) for e in parrot_nb.status().engines] == [(0, "")]
    finally:
        ip.run_line_magic("parrot", "stop")


def test_parrot_start_with_bad_option_raises_value_error_with_usage(ip):
    with pytest.raises(ValueError, match="--engines N"):
        ip.run_line_magic("parrot", "start --device tpu")
    assert session._server is None and session.current_client() is None


def test_parrot_start_with_an_unknown_argument_names_it(ip):
    with pytest.raises(ValueError, match="unknown argument\\(s\\) --bogus"):
        ip.run_line_magic("parrot", "start --bogus")
    assert session.current_client() is None


def test_parrot_connect_file_attaches_to_the_server(ip, shared_server, capsys):
    ip.run_line_magic("parrot", f"connect {shared_server.connection_file}")
    client = session.current_client()
    assert client is not None
    assert client.info.pid == shared_server.info.pid
    assert f"pid {shared_server.info.pid}" in capsys.readouterr().out
    assert parrot_nb.status().pid == shared_server.info.pid


def test_parrot_connect_without_argument_finds_the_server_in_the_runtime_dir(ip, shared_server):
    # shared_server writes its connection file under tmp; put a copy where Jupyter's runtime dir is.
    rdir = runtime_dir()
    rdir.mkdir(parents=True, exist_ok=True)
    copy = rdir / f"{CONNECTION_PREFIX}magics-test-{os.getpid()}.json"
    shutil.copyfile(shared_server.connection_file, copy)
    now = time.time() + 5  # newest of all, whatever other tests left behind
    os.utime(copy, (now, now))
    try:
        ip.run_line_magic("parrot", "connect")
        client = session.current_client()
        assert client is not None and client.info.pid == shared_server.info.pid
    finally:
        copy.unlink()


def test_parrot_connect_without_argument_and_no_server_raises_file_not_found(ip, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="%parrot start"):
        ip.run_line_magic("parrot", "connect")
    assert session.current_client() is None


def test_parrot_connect_nonexistent_file_raises_file_not_found_naming_it(ip, tmp_path):
    missing = tmp_path / "no-such-server.json"
    with pytest.raises(FileNotFoundError) as info:
        ip.run_line_magic("parrot", f"connect {missing}")
    assert str(missing) in str(info.value)
    assert session.current_client() is None


def test_parrot_disconnect_leaves_the_server_running(ip, shared_server, capsys):
    ip.run_line_magic("parrot", f"connect {shared_server.connection_file}")
    ip.run_line_magic("parrot", "disconnect")
    assert "keeps running" in capsys.readouterr().out
    assert session.current_client() is None
    assert shared_server.proc.poll() is None


def test_parrot_unknown_command_raises_value_error_listing_usage(ip):
    with pytest.raises(ValueError) as info:
        ip.run_line_magic("parrot", "bogus")
    message = str(info.value)
    assert "'bogus'" in message
    assert PARROT_USAGE in message


def test_parrot_alone_prints_usage(ip, capsys):
    assert ip.run_line_magic("parrot", "") is None
    out = capsys.readouterr().out
    assert out.strip() == PARROT_USAGE.strip()
    for command in ("start", "connect", "status", "stop", "disconnect"):
        assert f"%parrot {command}" in out


# --------------------------------------------------------------------------- %%semantic: constrained outputs


def test_a_constraint_naming_a_notebook_object_resolves_in_the_user_namespace(ip):
    ip.run_cell('LABELS = ["network", "disk"]\nPLAN = {"type": "array", "items": {"type": "string"}}')
    fn = _define(ip, "triage", "Incident: {{input:i}}\nCategory: {{output:c choices=LABELS}}\nSteps: {{output:s json=PLAN}}\n")
    assert fn.sampling("c").choices == ["network", "disk"]
    assert json.loads(fn.sampling("s").json) == {"type": "array", "items": {"type": "string"}}


def test_a_constraint_naming_an_undefined_object_fails_the_cell_naming_the_placeholder(ip, capsys):
    result = ip.run_cell("%%semantic triage\nIncident: {{input:i}}\nCategory: {{output:c choices=LABELZ}}\n")
    assert not result.success
    assert "line 2, column 30: {{output:c choices=LABELZ}}: choices=LABELZ names a Python object, but 'LABELZ' is not defined" in capsys.readouterr().out
    assert "triage" not in ip.user_ns
