"""``parrot-nb run``: exported pipelines over JSONL records, on a real engine server (the tiny model).

The runner runs as its own process (the CLI), so that it can be interrupted and killed for real.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from parrot_nb.demo import execute, output_text
from parrot_nb.export import export_file, export_notebook
from parrot_nb.results import read_results

REPO = Path(__file__).resolve().parent.parent
DEMOS = REPO / "demos"
PIPELINE = DEMOS / "summarize_documents.py"
# Demo applications whose records are not documents and whose constrained outputs need a real model:
# tests/test_demo_apps.py runs their exports on the default model, over their own generators' records.
DEFAULT_MODEL_DEMOS = ("autotqa.ipynb", "rca_copilot.ipynb")


def _records(tmp_path: Path, n: int, *extra_lines: str) -> Path:
    """The first ``n`` demo documents (cycled), then ``extra_lines`` as they are."""
    docs = (DEMOS / "documents.jsonl").read_text().splitlines()
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join([docs[i % len(docs)] for i in range(n)] + list(extra_lines)) + "\n")
    return path


def _run_args(server, inputs: Path, output: Path, *more: str, pipeline: Path = PIPELINE) -> list[str]:
    return [sys.executable, "-m", "parrot_nb.cli", "run", str(pipeline), "--inputs", str(inputs), "--output", str(output),
            "--server", str(server.connection_file), *more]  # fmt: skip


def _run(server, inputs: Path, output: Path, *more: str, pipeline: Path = PIPELINE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_run_args(server, inputs, output, *more, pipeline=pipeline), capture_output=True, text=True, cwd=REPO, timeout=300)


def _lines(output: Path) -> list[dict]:
    return read_results(output)[1]


def _wait_for_results(output: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (output.exists() and output.read_bytes().count(b"\n") >= count + 1):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run wrote too little in time"
        time.sleep(0.02)


def _pipeline(tmp_path: Path, run_source: str) -> Path:
    path = tmp_path / "pipe.py"
    path.write_text(export_notebook(new_notebook(cells=[new_code_cell(run_source)]), source_name="pipe.ipynb"))
    return path


# --------------------------------------------------------------------------- records in, results out


def test_each_record_is_written_once_with_its_index_line_and_outputs(shared_server, tmp_path) -> None:
    inputs, output = _records(tmp_path, 6), tmp_path / "out.jsonl"
    out = _run(shared_server, inputs, output, "--concurrency", "4")
    assert out.returncode == 0, out.stderr
    header, lines = read_results(output)
    assert header["format"] == "parrot-nb results" and header["pipeline"] == "summarize_documents.py"
    assert header["parameters"] == {"audience": "a busy executive"}
    assert sorted(line["record"] for line in lines) == list(range(6))
    for line in lines:
        assert line["line"] == line["record"] + 1
        assert set(line["output"]) == {"summary", "title"}
        assert all(isinstance(v, str) and v for v in line["output"].values())
    assert "6 of 6 records (0 failed)" in out.stderr


def test_each_record_runs_as_its_own_throughput_application(shared_server, tmp_path) -> None:
    inputs, output = _records(tmp_path, 3), tmp_path / "out.jsonl"
    start = time.time()
    assert _run(shared_server, inputs, output).returncode == 0
    events = [e for e in shared_server.events() if e.get("dir") == "event" and e["t"] >= start]
    apps = {e["app_id"]: e["name"] for e in events if e["type"] == "AppStats"}
    assert sorted(name.rsplit("#", 1)[1] for name in apps.values()) == ["0", "1", "2"]
    assert len({name.rsplit("#", 1)[0] for name in apps.values()}) == 1  # one run's prefix
    queued = [e for e in events if e["type"] == "RequestQueued" and e["app_id"] in apps]
    assert len(queued) == 3 * 4  # per record: three parts summarised, one combine
    assert {e["perf"] for e in queued} == {"throughput"}


def test_a_rerun_skips_the_records_already_written(shared_server, tmp_path) -> None:
    inputs, output = _records(tmp_path, 3), tmp_path / "out.jsonl"
    assert _run(shared_server, inputs, output).returncode == 0
    before = output.read_bytes()
    out = _run(shared_server, inputs, output)
    assert out.returncode == 0
    assert output.read_bytes() == before
    assert "3 of 3 records (0 failed); this run wrote 0" in out.stderr


def test_bad_records_are_written_as_errors_with_their_line_numbers_and_the_run_goes_on(shared_server, tmp_path) -> None:
    inputs = _records(tmp_path, 2, '{"id": "x", "text": "no document field"}', "{not json", "", '["a list"]')
    output = tmp_path / "out.jsonl"
    out = _run(shared_server, inputs, output)
    assert out.returncode == 0, out.stderr
    by_record = {line["record"]: line for line in _lines(output)}
    assert sorted(by_record) == [0, 1, 2, 3, 4]  # the blank line 5 is no record
    assert "output" in by_record[0] and "output" in by_record[1]
    assert by_record[2]["error"] == "line 3: the record has no field 'document', which run(document: str) needs"
    assert by_record[3]["line"] == 4 and by_record[3]["error"].startswith("line 4 of records.jsonl is not valid JSON")
    assert by_record[4]["line"] == 6 and "line 6 of records.jsonl is a JSON list, not an object" in by_record[4]["error"]
    assert "5 of 5 records (3 failed)" in out.stderr


def test_a_record_whose_run_raises_is_written_with_the_error(shared_server, tmp_path) -> None:
    pipe = _pipeline(tmp_path, "def run(n):\n    return {'inverse': 1 / n}")
    inputs = tmp_path / "records.jsonl"
    inputs.write_text('{"n": 4}\n{"n": 0}\n{"n": 2}\n')
    output = tmp_path / "out.jsonl"
    out = _run(shared_server, inputs, output, pipeline=pipe)
    assert out.returncode == 0, out.stderr
    by_record = {line["record"]: line for line in _lines(output)}
    assert by_record[0]["output"] == {"inverse": 0.25} and by_record[2]["output"] == {"inverse": 0.5}
    assert by_record[1]["error"] == "line 2: ZeroDivisionError: division by zero"


def test_an_output_file_of_another_pipeline_or_other_parameters_is_refused(shared_server, tmp_path) -> None:
    inputs, output = _records(tmp_path, 1), tmp_path / "out.jsonl"
    assert _run(shared_server, inputs, output).returncode == 0
    before = output.read_bytes()
    out = _run(shared_server, inputs, output, "--param", "audience=a child")
    assert out.returncode == 1
    assert "holds results of another pipeline or other parameters" in out.stderr
    assert "'a busy executive'" in out.stderr and "'a child'" in out.stderr and "give --output a new file name" in out.stderr
    assert output.read_bytes() == before


def test_a_half_written_last_line_is_cut_off_and_its_record_runs_again(shared_server, tmp_path) -> None:
    inputs, output = _records(tmp_path, 3), tmp_path / "out.jsonl"
    assert _run(shared_server, inputs, output).returncode == 0
    data = output.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    lost = json.loads(data[last_start:])["record"]
    output.write_bytes(data[: last_start + 25])  # as if killed in the middle of writing the last line
    out = _run(shared_server, inputs, output)
    assert out.returncode == 0, out.stderr
    assert "cut off a half-written last line" in out.stderr
    records = [line["record"] for line in _lines(output)]
    assert sorted(records) == [0, 1, 2] and records[-1] == lost


# --------------------------------------------------------------------------- interruptions


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_yields_each_record_exactly_once(shared_server, tmp_path) -> None:
    inputs, output = _records(tmp_path, 40), tmp_path / "out.jsonl"
    proc = subprocess.Popen(_run_args(shared_server, inputs, output, "--concurrency", "4"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        _wait_for_results(output, 5, proc)
        proc.kill()
    finally:
        proc.kill()
        proc.communicate()
    killed_at = [line["record"] for line in _lines(output)] if output.read_bytes().endswith(b"\n") else None
    assert killed_at is None or 5 <= len(killed_at) < 40  # mid-run
    out = _run(shared_server, inputs, output, "--concurrency", "4")
    assert out.returncode == 0, out.stderr
    records = [line["record"] for line in _lines(output)]
    assert sorted(records) == list(range(40))  # every record, none twice
    assert all("output" in line for line in _lines(output))


@pytest.mark.slow
def test_ctrl_c_cancels_the_records_in_flight_keeps_the_written_ones_and_says_how_to_resume(shared_server, tmp_path) -> None:
    # The first three records finish at once; the others decode for seconds, so records are surely in
    # flight (with requests on the server to cancel) when Ctrl-C lands after the third is written.
    pipe = _pipeline(tmp_path, (
        "quick = parrot_nb.SemanticFunction.from_template('quick', 'Quick {{input:n}}: {{output:o max_tokens=2}}')\n"
        "slow = parrot_nb.SemanticFunction.from_template('slow', 'Slow {{input:n}}: {{output:o max_tokens=500 ignore_eos=true}}')\n"
        "def run(n):\n"
        "    return (quick if n < 3 else slow)(n=n)"
    ))  # fmt: skip
    inputs, output = tmp_path / "records.jsonl", tmp_path / "out.jsonl"
    inputs.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(12)))
    args = _run_args(shared_server, inputs, output, "--concurrency", "4", pipeline=pipe)
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_results(output, 3, proc)
        interrupted_at = time.time()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    written = [line["record"] for line in _lines(output)]
    assert 3 <= len(written) < 12 and len(set(written)) == len(written)
    assert f"interrupted: {output} holds {len(written)} of 12 records" in stderr
    assert "To resume, run the same command again:\n  parrot-nb run " in stderr and f"--output {output}" in stderr
    cancelled = [e for e in shared_server.events() if e["type"] == "RequestCancelled" and e["t"] >= interrupted_at - 1]
    assert cancelled and all("the pipeline run was interrupted" in e["reason"] for e in cancelled)
    out = _run(shared_server, inputs, output, "--concurrency", "4", pipeline=pipe)
    assert out.returncode == 0, out.stderr
    assert sorted(line["record"] for line in _lines(output)) == list(range(12))


# --------------------------------------------------------------------------- the notebook and its pipeline


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_at_temperature_0_the_pipeline_gives_the_notebooks_outputs(shared_server, tmp_path) -> None:
    # The demo notebook, on the tiny model (the test's only change), tries run() on the first 3 documents.
    nb = nbformat.read(DEMOS / "summarize_documents.ipynb", as_version=4)
    start = next(c for c in nb.cells if c.source == "%parrot start")
    start.source = "%parrot start --model tiny"
    nbformat.write(nb, tmp_path / "summarize_documents.ipynb")
    shutil.copy(DEMOS / "documents.jsonl", tmp_path / "documents.jsonl")
    executed = execute(tmp_path / "summarize_documents.ipynb", timeout=300)
    printed = next(
        "".join(output_text(o) for o in c.outputs) for c in executed.cells if c.source.startswith("import json")
    )
    notebook = {r["record"]: r["output"] for r in map(json.loads, printed.splitlines())}
    assert sorted(notebook) == [0, 1, 2]

    inputs, output = _records(tmp_path, 3), tmp_path / "out.jsonl"
    pipeline = tmp_path / "pipeline.py"
    pipeline.write_text(export_file(tmp_path / "summarize_documents.ipynb"))
    out = _run(shared_server, inputs, output, "--concurrency", "16", pipeline=pipeline)
    assert out.returncode == 0, out.stderr
    assert {line["record"]: line["output"] for line in _lines(output)} == notebook


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("notebook", sorted(p.name for p in DEMOS.glob("*.ipynb") if p.name not in DEFAULT_MODEL_DEMOS))
def test_the_export_of_every_demo_notebook_imports_and_runs(notebook, shared_server, tmp_path) -> None:
    exported = tmp_path / Path(notebook).with_suffix(".py").name
    exported.write_text(export_file(DEMOS / notebook))
    if "\ndef run(" in exported.read_text():
        inputs, output = _records(tmp_path, 2), tmp_path / "out.jsonl"
        out = _run(shared_server, inputs, output, pipeline=exported)
        assert out.returncode == 0, out.stderr
        assert [sorted(line) for line in _lines(output)] == [["line", "output", "record"]] * 2
    else:  # a notebook without run() exports to a script that does what the notebook does, once
        env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
        out = subprocess.run([sys.executable, str(exported)], capture_output=True, text=True, cwd=DEMOS, env=env, timeout=800)
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr
        assert out.stdout.strip(), "the script printed nothing of what the notebook displays"


@pytest.mark.slow
def test_in_a_notebook_the_progress_bar_is_a_widget(shared_server, tmp_path) -> None:
    inputs, output = _records(tmp_path, 2), tmp_path / "out.jsonl"
    nb = new_notebook(cells=[
        new_code_cell(f"import parrot_nb\nparrot_nb.connect({str(shared_server.connection_file)!r})"),
        new_code_cell(
            "from parrot_nb.runner import run_pipeline\n"
            f"summary = run_pipeline({str(PIPELINE)!r}, {str(inputs)!r}, {str(output)!r}, concurrency=2)\n"
            "print(summary.written, summary.failed)"
        ),
        new_code_cell("parrot_nb.disconnect()"),
    ])  # fmt: skip
    nbformat.write(nb, tmp_path / "run.ipynb")
    executed = execute(tmp_path / "run.ipynb", timeout=300)
    outputs = executed.cells[1].outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    assert "2 0" in "".join(output_text(o) for o in outputs)
    assert sorted(line["record"] for line in _lines(output)) == [0, 1]


def test_a_pipeline_imports_the_modules_beside_it(shared_server, tmp_path) -> None:
    (tmp_path / "record_helpers.py").write_text("def shout(text):\n    return text.upper() + '!'\n")
    pipe = _pipeline(tmp_path, "import record_helpers\n\ndef run(text):\n    return record_helpers.shout(text)")
    inputs, output = tmp_path / "records.jsonl", tmp_path / "out.jsonl"
    inputs.write_text('{"text": "squawk"}\n')
    out = _run(shared_server, inputs, output, pipeline=pipe)  # run from the repository, not the pipeline's folder
    assert out.returncode == 0, out.stderr
    assert [line["output"] for line in _lines(output)] == ["SQUAWK!"]


# --------------------------------------------------------------------------- the command line


def test_run_without_a_server_or_a_start_line_says_what_to_pass(tmp_path) -> None:
    pipe = _pipeline(tmp_path, "def run(n):\n    return n")
    inputs = tmp_path / "records.jsonl"
    inputs.write_text('{"n": 1}\n')
    out = subprocess.run(
        [sys.executable, "-m", "parrot_nb.cli", "run", str(pipe), "--inputs", str(inputs), "--output", str(tmp_path / "o.jsonl")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert "no engine server" in out.stderr and "pass --server CONNECTION_FILE or --model MODEL" in out.stderr


def test_run_with_missing_inputs_or_a_bad_param_says_which(shared_server, tmp_path) -> None:
    out = _run(shared_server, tmp_path / "missing.jsonl", tmp_path / "o.jsonl")
    assert out.returncode == 2 and "--inputs" in out.stderr and "missing.jsonl: no such file" in out.stderr
    out = _run(shared_server, _records(tmp_path, 1), tmp_path / "o.jsonl", "--param", "audience")
    assert out.returncode == 2 and "--param 'audience': expected NAME=VALUE" in out.stderr
    out = _run(shared_server, _records(tmp_path, 1), tmp_path / "o.jsonl", "--param", "audiense=x")
    assert out.returncode == 1 and "has no parameter audiense (its parameters: audience)" in out.stderr


def test_run_help_describes_its_flags() -> None:
    out = subprocess.run([sys.executable, "-m", "parrot_nb.cli", "run", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0
    for flag in ("--inputs", "--output", "--concurrency", "--param", "--server", "--model", "--engines", "--no-progress"):
        assert flag in out.stdout
    assert "skips the records the file holds" in " ".join(out.stdout.split())
