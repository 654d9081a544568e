"""The quickstart notebook runs top to bottom on the project's kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from parrot_nb.demo import execute, output_text

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_runs_top_to_bottom_with_the_parrot_nb_kernel() -> None:
    nb = execute(REPO / "demos" / "quickstart.ipynb", timeout=300)
    outputs = {
        cell.source.splitlines()[0]: "\n".join(output_text(o) for o in cell.get("outputs", []))
        for cell in nb.cells
        if cell.cell_type == "code"
    }
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert "engine server started" in outputs["%parrot start"]
    assert "semantic function write_code(task) -> code" in outputs["%%semantic write_code --max-tokens 24"]
    status = outputs["%parrot status"]
    assert "app map-reduce: 4 requests, 4 done, 0 failed" in status
    assert "3 requests, 3 done, 0 failed" in status  # write_code, write_tests, review
    assert "engine server stopped" in outputs["%parrot stop"]
