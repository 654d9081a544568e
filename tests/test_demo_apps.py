"""The two demo applications, RCACopilot and AutoTQA, run top to bottom on the default model, and
their exported pipelines run over records from the demos' own generators."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import pytest

from parrot_nb.demo import execute, output_text
from parrot_nb.results import read_results

REPO = Path(__file__).resolve().parent.parent
DEMOS = REPO / "demos"
LABELS = ("network", "disk", "certificate", "dependency", "deployment", "quota", "memory", "config")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _outputs(nb) -> dict[str, str]:
    """Each code cell's output text, by the cell's first line."""
    return {
        cell.source.splitlines()[0]: "\n".join(output_text(o) for o in cell.get("outputs", []))
        for cell in nb.cells
        if cell.cell_type == "code"
    }


def _errors(nb) -> list[str]:
    return [output_text(o) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]


@pytest.fixture(scope="module")
def rca():
    return execute(DEMOS / "rca_copilot.ipynb", timeout=600)


@pytest.fixture(scope="module")
def autotqa():
    return execute(DEMOS / "autotqa.ipynb", timeout=600)


def test_rca_copilot_runs_top_to_bottom_and_answers_each_incident_with_a_category(rca) -> None:
    assert _errors(rca) == []
    outputs = _outputs(rca)
    answers = re.findall(r"^(INC-\d+) .*: LLM (\w+), neighbours (\w+), truth (\w+)$", outputs["for incident, out in zip(sample, outs):"], re.M)
    assert len(answers) == 4
    assert all(llm in LABELS and vote in LABELS and truth in LABELS for _, llm, vote, truth in answers)
    assert "FastText:" in outputs["import numpy as np"] and "64 dimensions" in outputs["import numpy as np"]
    handler_report = outputs["print(handle(held_out[0].to_json()))  # what the handler reports on one incident"]
    assert handler_report.startswith("Alert: ") and "Query: errors and warnings of" in handler_report
    assert "category" not in handler_report.lower()  # the handler never sees the label


def test_rca_copilot_incidents_are_apps_of_six_calls_that_share_the_instruction_prefix(rca) -> None:
    status = _outputs(rca)["%parrot status"]
    apps = re.findall(r"app rca-INC-\d+: 6 requests, 6 done, 0 failed \(closed\), (\d+)/(\d+) prompt tokens from cache", status)
    assert len(apps) == 4
    assert sum(int(hit) > 0 for hit, _ in apps) >= 3  # the first prefills the instructions, the rest reuse them


def test_rca_copilot_draws_the_dag_of_one_incident(rca) -> None:
    from nbconvert import HTMLExporter

    page, _ = HTMLExporter().from_notebook_node(rca)
    images = [base64.b64decode(data).decode() for data in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', page)]
    svg = next((image for image in images if "<title>DAG of application" in image), "")
    for step in ("collect_diagnostics", "summarize", "nearest", "describe", "vote", "predict"):
        assert step in svg, step


def test_autotqa_runs_top_to_bottom_with_read_only_sql_and_at_most_three_rounds(autotqa) -> None:
    assert _errors(autotqa) == []
    outputs = _outputs(autotqa)
    lines = outputs["held_out = tables.make_questions(db_path, seed=seed, n=12)[:3]"]
    rounds = [int(r) for r in re.findall(r"rounds: (\d+)", lines)]
    assert len(rounds) == 3 and all(1 <= r <= 3 for r in rounds)
    assert len(re.findall(r"^  SQL: (SELECT|WITH) .*;$", lines, re.M)) == 3
    assert "correct" in lines.replace("wrong", "")  # SmolLM2 answers at least one of these three right
    status = outputs["%parrot status"]
    # Per question: examples, plan, SQL; per round: execute, critique; between rounds: a revision.
    total = 3 * len(rounds) + 2 * sum(rounds) + sum(r - 1 for r in rounds)
    assert f"app autotqa: {total} requests, {total} done, 0 failed" in status


def _run_export_over(pipeline: Path, generated: Path, tmp_path: Path, n: int = 2) -> list[dict]:
    """Run the committed export with `parrot-nb run --model smollm2` over the first ``n`` generated records."""
    records, output = tmp_path / "records.jsonl", tmp_path / "results.jsonl"
    records.write_text("".join(generated.read_text().splitlines(keepends=True)[:n]))
    out = subprocess.run(
        [sys.executable, "-m", "parrot_nb.cli", "run", str(pipeline), "--inputs", str(records), "--output", str(output),
         "--model", "smollm2", "--concurrency", "2"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = sorted(read_results(output)[1], key=lambda line: line["record"])
    assert [line["record"] for line in lines] == list(range(n))
    return lines


def test_the_rca_pipeline_runs_over_an_incident_stream(rca, tmp_path) -> None:
    stream = tmp_path / "stream.jsonl"
    subprocess.run([sys.executable, str(DEMOS / "incidents.py"), "-n", "400", "--seed", "0", "--stream", "-o", str(stream)],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    lines = _run_export_over(DEMOS / "rca_copilot.py", stream, tmp_path)
    for line in lines:
        assert line["output"]["category"] in LABELS and line["output"]["neighbour_vote"] in LABELS
        assert line["output"]["summary"].strip() and len(line["output"]["neighbours"]) == 5
    # The stream's first incidents are the notebook's first held-out ones; the neighbours' vote has no sampling in it.
    notebook = re.findall(r"neighbours (\w+), truth", _outputs(rca)["for incident, out in zip(sample, outs):"])
    assert [line["output"]["neighbour_vote"] for line in lines] == notebook[:2]


def test_the_autotqa_pipeline_answers_questions_from_the_generator(tmp_path) -> None:
    questions = tmp_path / "questions.jsonl"
    subprocess.run([sys.executable, str(DEMOS / "tables.py"), "--db", str(tmp_path / "shop.sqlite"), "--questions",
                    str(questions), "-n", "12"], check=True, capture_output=True, timeout=120)  # fmt: skip
    for line in _run_export_over(DEMOS / "autotqa.py", questions, tmp_path):
        output = line["output"]
        assert output["sql"].startswith(("SELECT", "WITH")) and 1 <= output["rounds"] <= 3
        assert output["verdict"] in ("accept", "revise")
        assert set(output["result"]) >= {"ok"}
