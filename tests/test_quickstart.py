"""The quickstart notebook runs top to bottom on the project's kernel with the default model."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from parrot_nb.demo import execute, output_text

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quickstart():
    """The quickstart, executed once for the module (what `make demo` runs)."""
    return execute(REPO / "demos" / "quickstart.ipynb", timeout=600)


def _outputs(nb) -> dict[str, str]:
    return {
        cell.source.splitlines()[0]: "\n".join(output_text(o) for o in cell.get("outputs", []))
        for cell in nb.cells
        if cell.cell_type == "code"
    }


@pytest.mark.timeout(900)
def test_quickstart_runs_top_to_bottom_on_smollm2_with_real_text_and_cache_hits(quickstart) -> None:
    nb = quickstart
    outputs = _outputs(nb)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert "engine server started" in outputs["%parrot start"] and "SmolLM2-135M-Instruct" in outputs["%parrot start"]
    assert "def " in outputs["print(code.get())  # already computed on the server, as tests' input"]
    assert "test_it" in outputs['code = write_code(task="returns the sum of two numbers")']  # the chain's end, displayed
    assert "Paris" in outputs["complete().get()"]
    status = outputs["%parrot status"]
    assert "app map-reduce: 4 requests, 4 done, 0 failed" in status
    chain = next(line for line in status.splitlines() if "3 requests, 3 done, 0 failed" in line)  # the kernel's app
    hits = re.search(r"(\d+)/(\d+) prompt tokens from cache", chain)
    assert hits and int(hits.group(1)) > 0  # write_tests reused write_code's system prompt
    assert "engine server stopped" in outputs["%parrot stop"]


@pytest.mark.timeout(900)
def test_the_widgets_show_text_in_a_terminal_and_pictures_in_the_html_copy(quickstart) -> None:
    outputs = _outputs(quickstart)
    # What a terminal shows (and `make demo` prints): the chain and the map-reduce, all done.
    assert outputs["%parrot dag"] == "DAG of every application: 6 requests (6 done)"
    assert re.search(r"^map-reduce +4 +4 +0 +0 +1 ", outputs["%parrot stats"], re.M)
    from nbconvert import HTMLExporter

    page, _ = HTMLExporter().from_notebook_node(quickstart)
    # What the HTML copy shows: the DAG as SVG with its nodes, the stats as a table.
    images = [base64.b64decode(data).decode() for data in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', page)]
    svg = next((image for image in images if "<title>DAG of every application</title>" in image), "")
    assert "combine" in svg and svg.count("#a5d6a7") == 1 + 12  # the legend's swatch, and 12 nodes drawn "done"
    assert re.search(r"""<table class=["']parrot-nb-stats["']>""", page) and "<td>map-reduce</td>" in page


@pytest.mark.timeout(900)
def test_the_structured_outputs_are_a_label_from_the_list_and_a_parsed_dict(quickstart) -> None:
    import ast

    outputs = _outputs(quickstart)
    lines = [line for line in outputs["tickets = ["].splitlines() if line]
    assert len(lines) == 3 and all(line.split()[0] in ("billing", "technical", "account", "shipping") for line in lines)
    fields = ast.literal_eval(outputs['with parrot_nb.app("triage"):'])
    assert set(fields) == {"category", "urgent"} and fields["category"] in ("billing", "technical", "account", "shipping")
    assert isinstance(fields["urgent"], bool)
    status = outputs["%parrot status"]
    assert "app triage: 3 requests, 3 done, 0 failed" in status and "app triage: 1 requests, 1 done, 0 failed" in status
