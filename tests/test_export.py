"""``parrot-nb export`` and the nbconvert exporter: notebooks in, plain-Python pipelines out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from parrot_nb import pipeline
from parrot_nb.export import ExportError, export_file, export_notebook

REPO = Path(__file__).resolve().parent.parent
DEMOS = REPO / "demos"


def _notebook(*cells) -> nbformat.NotebookNode:
    return new_notebook(cells=[c if isinstance(c, nbformat.NotebookNode) else new_code_cell(c) for c in cells])


def _write(tmp_path: Path, nb: nbformat.NotebookNode, name: str = "nb") -> Path:
    path = tmp_path / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


def _export_to(tmp_path: Path, nb: nbformat.NotebookNode, name: str = "pipe") -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(export_notebook(nb, source_name=f"{name}.ipynb"))
    return path


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "parrot_nb.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


# --------------------------------------------------------------------------- %%semantic cells


SEMANTIC_CELLS = [
    ("plain --max-tokens 8", "Q: {{input:q}}\nA: {{output:a}}\n"),
    (r'tuned --chat --temperature 0.7 --top-p 0.9 --top-k 5 --seed 42 --stop \n --stop "a b"',
     '{{role:system}}Be brief.\n{{role:user}}{{input:q}}{{output:a max_tokens=3 stop="!"}}\n'),
    ("literal", 'JSON {"k": [1, 2]} and {{ jinja }} and """quotes""" and a \\ backslash: {{output:x}}'),
]  # fmt: skip


@pytest.mark.parametrize(("line", "body"), SEMANTIC_CELLS)
def test_a_semantic_cell_exports_to_the_function_the_magic_defines(ipython_shell, tmp_path, line, body) -> None:
    from parrot_nb.magic_line import parse_semantic_line

    magic_fn = ipython_shell.run_cell_magic("semantic", line, body)
    ipython_shell.user_ns.pop(magic_fn.name, None)
    module = {}
    exec(compile(export_notebook(_notebook(f"%%semantic {line}\n{body}")), "pipe.py", "exec"), module)
    fn = module[parse_semantic_line(line).name]
    assert (fn.name, fn.template, fn.chat, fn.defaults) == (magic_fn.name, magic_fn.template, magic_fn.chat, magic_fn.defaults)
    assert fn.spec == magic_fn.spec


def test_a_semantic_cell_with_a_template_error_fails_naming_the_cell_and_the_placeholder() -> None:
    nb = _notebook(new_markdown_cell("# title"), "x = 1", "%%semantic broken\nHello {{input:who}}\nBye {{output:who}}\n")
    with pytest.raises(ExportError) as info:
        export_notebook(nb)
    message = str(info.value)
    assert message.startswith("cell 3 ('%%semantic broken'), line 3: TemplateError: ")  # the cell's line 3
    assert "line 2, column 5: {{output:who}}: output 'who' is used as an input before it is generated" in message


def test_a_semantic_cell_with_a_bad_flag_fails_naming_the_cell_and_the_flag() -> None:
    with pytest.raises(ExportError, match=r"^cell 1 \('%%semantic f --max-tokens many'\), line 1: %%semantic: argument --max-tokens: invalid int value: 'many'"):
        export_notebook(_notebook("%%semantic f --max-tokens many\n{{output:x}}"))


# --------------------------------------------------------------------------- IPython syntax


@pytest.mark.parametrize(
    ("source", "line", "says"),
    [
        ("x = 1\n%timeit x + 1", 2, "the magic %timeit x + 1 has no plain-Python form"),
        ("%%bash\necho hi", 1, "the cell magic %%bash has no plain-Python form"),
        ("import os\n\n!ls -l", 3, "the shell escape '!ls -l'"),
        ("files = !ls", 1, "'files = !ls' is IPython syntax"),
        ("len?", 1, "'len?' is IPython syntax"),
        ("from IPython.display import HTML", 1, "imports IPython"),
        ("%parrot start --engines two", 1, "argument --engines: invalid int value: 'two'"),
        ("%parrot flush", 1, "the magic %parrot flush has no plain-Python form"),
    ],
)
def test_ipython_syntax_without_a_plain_form_is_refused_naming_the_cell_and_line(source, line, says) -> None:
    nb = _notebook(new_markdown_cell("intro"), source)
    with pytest.raises(ExportError) as info:
        export_notebook(nb)
    first = source.splitlines()[0]
    assert str(info.value).startswith(f"cell 2 ({first!r}), line {line}: ")
    assert says in str(info.value)


def test_a_refused_cell_tagged_notebook_only_is_left_out() -> None:
    nb = _notebook("%timeit 1 + 1", "y = 2")
    nb.cells[0].metadata["tags"] = ["notebook-only"]
    module: dict = {}
    exec(export_notebook(nb), module)
    assert module["y"] == 2


def test_parrot_lines_become_plain_calls_and_displays_become_prints(tmp_path) -> None:
    nb = _notebook(
        "%load_ext parrot_nb\n%parrot start --model tiny --engines 2",
        "%parrot connect /tmp/server.json",
        "%parrot dag",
        "x = 6 * 7\nx",
        "x;",
        "display(x + 1)",
        "import asyncio\n\nasync def later():\n    return 'awaited'\n\nawait later()",
        "%parrot status",
        "if x:\n    %parrot stop",
    )
    source = export_notebook(nb)
    assert "_pipeline.start(model='tiny', engines=2)  # %parrot start --model tiny --engines 2" in source
    assert "_pipeline.connect('/tmp/server.json')" in source
    assert "# %parrot dag: a notebook display, left out" in source
    assert "_pipeline.show_status()  # %parrot status" in source
    assert "    _pipeline.stop()  # %parrot stop" in source
    # Run the display cells for real (the %parrot cells need a server; they are covered by the runner tests).
    display_cells = _notebook(*[c.source for c in nb.cells[3:7]])
    script = _export_to(tmp_path, display_cells)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.splitlines() == ["42", "43", "'awaited'"]  # "x;" stays quiet, as in the notebook


# --------------------------------------------------------------------------- parameters and the entry point


def test_the_parameters_cell_is_overridable_and_typed_by_its_defaults(tmp_path) -> None:
    params = new_code_cell('greeting = "hello"  # how to greet\ntimes = 2\nloud = False\nratio = 0.5\nnames = ["a"]')
    params.metadata["tags"] = ["parameters"]
    derived = "shout = greeting.upper() if loud else greeting\n\ndef run(name):\n    return [shout, name] * times"
    path = _export_to(tmp_path, _notebook(params, derived))
    loaded = pipeline.load(path, {"greeting": "hi", "times": "3", "loud": "true", "ratio": "2", "names": '["x", "y"]'})
    try:
        assert loaded.parameters == {"greeting": "hi", "times": 3, "loud": True, "ratio": 2.0, "names": ["x", "y"]}
        assert loaded.run("bo") == ["HI", "bo"] * 3  # later cells see the overrides
        defaults = pipeline.load(path)
        assert defaults.parameters["greeting"] == "hello" and defaults.fingerprint != loaded.fingerprint
    finally:
        pipeline.release()


def test_an_unknown_or_mistyped_parameter_is_refused_with_the_known_ones(tmp_path) -> None:
    params = new_code_cell("times = 2")
    params.metadata["tags"] = ["parameters"]
    path = _export_to(tmp_path, _notebook(params, "def run(x):\n    return x"))
    try:
        with pytest.raises(pipeline.PipelineError, match=r"has no parameter tims \(its parameters: times\)"):
            pipeline.load(path, {"tims": "3"})
        with pytest.raises(pipeline.PipelineError, match=r"times is a int \(default 2\), and 'three' is not one"):
            pipeline.load(path, {"times": "three"})
    finally:
        pipeline.release()


def test_a_parameters_cell_with_computed_values_is_refused_naming_the_line() -> None:
    params = new_code_cell("n = 3\nm = n * 2")
    params.metadata["tags"] = ["parameters"]
    with pytest.raises(ExportError, match=r"cell 1 \('n = 3'\), line 2: parameter 'm' is not a literal"):
        export_notebook(_notebook(params))


def test_a_pipeline_without_run_is_refused_by_the_runner_with_what_to_write(tmp_path) -> None:
    path = _export_to(tmp_path, _notebook("x = 1"))
    with pytest.raises(pipeline.PipelineError, match=r"defines no run\(\): a notebook made for export defines `def run"):
        pipeline.load(path)
    pipeline.release()


# --------------------------------------------------------------------------- the files it writes


def test_the_export_compiles_and_imports_without_ipython(tmp_path, shared_server) -> None:
    exported = tmp_path / "summarize_documents.py"
    out = subprocess.run(
        [sys.executable, "-m", "parrot_nb.cli", "export", str(DEMOS / "summarize_documents.ipynb"), "-o", str(exported)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    subprocess.run([sys.executable, "-m", "py_compile", str(exported)], check=True, timeout=60)
    # Import it for the runner (connected first, so its `%parrot start` uses that server), IPython blocked.
    code = (
        "import sys, json; sys.modules['IPython'] = None\n"
        "import parrot_nb; from parrot_nb import pipeline\n"
        f"parrot_nb.connect({str(shared_server.connection_file)!r})\n"
        f"p = pipeline.load({str(exported)!r})\n"
        "print(json.dumps([p.run.__name__, p.parameters, sorted(m for m, mod in sys.modules.items() if mod is not None and m.startswith(('IPython', 'ipykernel', 'torch')))]))\n"
        "parrot_nb.disconnect()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == ["run", {"audience": "a busy executive"}, []]


@pytest.mark.parametrize("pipeline", ["summarize_documents.py", "rca_copilot.py", "autotqa.py"])
def test_the_committed_demo_pipeline_is_the_notebooks_export(pipeline) -> None:
    notebook = Path(pipeline).with_suffix(".ipynb").name
    expected = export_file(DEMOS / notebook)
    assert (DEMOS / pipeline).read_text() == expected, (
        f"demos/{pipeline} is stale: parrot-nb export demos/{notebook} -o demos/{pipeline}"
    )


def test_export_of_a_file_that_is_not_a_notebook_says_so(tmp_path) -> None:
    bad = tmp_path / "notes.ipynb"
    bad.write_text("not json")
    out = _cli("export", str(bad))
    assert out.returncode == 1
    assert "notes.ipynb is not a Jupyter notebook" in out.stderr


def test_nbconvert_finds_the_exporter_through_the_declared_entry_point(tmp_path) -> None:
    # Install the entry point as pyproject.toml declares it (a dist-info of its own, beside the code).
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["nbconvert.exporters"]
    dist = tmp_path / "site" / "parrot_nb_entry_points-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: parrot-nb-entry-points\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(
        "[nbconvert.exporters]\n" + "".join(f"{name} = {target}\n" for name, target in declared.items())
    )
    notebook = DEMOS / "summarize_documents.ipynb"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    out = subprocess.run(
        [sys.executable, "-m", "nbconvert", "--to", "parrot-pipeline", str(notebook), "--output-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "summarize_documents.py").read_text() == export_file(notebook)


def test_a_constraint_naming_a_notebook_object_exports_with_the_pipelines_namespace(tmp_path) -> None:
    nb = _notebook(
        new_code_cell('LABELS = ["network", "disk"]'),
        new_code_cell("%%semantic triage\nIncident: {{input:i}}\nCategory: {{output:c choices=LABELS}}"),
    )
    path = _export_to(tmp_path, nb)
    source = path.read_text()
    assert "namespace=globals()" in source
    namespace: dict = {}
    exec(compile(source, str(path), "exec"), namespace)
    assert namespace["triage"].sampling("c").choices == ["network", "disk"]
