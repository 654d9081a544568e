"""The layering rules of the architecture, checked on the source and in a fresh interpreter."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _imports(package: str) -> dict[str, set[str]]:
    """Top-level module names each file of ``package`` imports (anywhere in the file)."""
    found: dict[str, set[str]] = {}
    for path in (REPO / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(REPO))] = names
    return found


def _violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path} imports {name}"
        for path, names in _imports(package).items()
        for name in sorted(names)
        if name.split(".")[0] in forbidden or any(name.startswith(f + ".") or name == f for f in forbidden)
    ]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("parrot_nb", ("torch", "triton", "kernels", "engine_server.engine", "engine_server.manager", "engine_server.server")),
        ("engine_server", ("parrot_nb", "widgets")),
        ("engine_server/manager", ("torch", "triton")),
        ("kernels", ("parrot_nb", "engine_server", "widgets")),
        ("widgets", ("torch", "triton", "kernels", "engine_server.engine", "engine_server.manager", "engine_server.server",
                     "engine_server.history")),
    ],
)
def test_package_does_not_import_what_its_layer_forbids(package: str, forbidden: tuple[str, ...]) -> None:
    assert _violations(package, forbidden) == []


def test_importing_parrot_nb_loads_neither_torch_nor_triton() -> None:
    code = (
        "import sys, json, parrot_nb; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'kernels'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(out.stdout) == []


def test_importing_the_widgets_loads_neither_torch_nor_the_server() -> None:
    code = (
        "import sys, json, widgets; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'kernels') "
        "or m.startswith(('engine_server.server', 'engine_server.manager', 'engine_server.engine')))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(out.stdout) == []


def test_the_server_reads_a_gguf_chat_template_without_loading_torch() -> None:
    code = (
        "import sys, json; from engine_server.server import EngineServer; "
        "from engine_server.models import chat_format, resolve_model; "
        "fmt = chat_format(resolve_model(None)); "
        "print(json.dumps([bool(fmt)] + sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'kernels'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(out.stdout) == [True]
