"""``jupyter nbconvert --to parrot-pipeline``: the exporter of ``parrot-nb export`` as an nbconvert exporter.

Registered under the ``nbconvert.exporters`` entry point in pyproject.toml.
"""

from __future__ import annotations

from typing import Any

from nbconvert.exporters import Exporter
from traitlets import default

from parrot_nb.export import export_notebook


class PipelineExporter(Exporter):
    """A notebook as a parrot-nb batch pipeline: plain Python that ``parrot-nb run`` runs over records."""

    export_from_notebook = "parrot-nb pipeline"
    output_mimetype = "text/x-python"

    @default("file_extension")
    def _file_extension_default(self) -> str:
        return ".py"

    def from_notebook_node(self, nb: Any, resources: dict[str, Any] | None = None, **kw: Any) -> tuple[str, dict[str, Any]]:
        nb_copy, resources = super().from_notebook_node(nb, resources, **kw)
        name = resources.get("metadata", {}).get("name") or "notebook"
        resources["output_extension"] = ".py"
        return export_notebook(nb_copy, source_name=f"{name}.ipynb"), resources
