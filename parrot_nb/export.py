"""Export a notebook to a batch pipeline: a plain Python module that imports without IPython.

How a notebook is written for export (docs/ARCHITECTURE.md, "Export and the runner"):

- ``%%semantic`` cells become ``SemanticFunction.from_template`` definitions (same name, template
  and defaults; the magic line goes through the magic's own parser, ``parrot_nb.magic_line``).
- The cell tagged ``parameters`` (papermill's convention) holds ``NAME = literal`` lines; they become
  the pipeline's parameters, which ``parrot-nb run --param NAME=VALUE`` overrides.
- ``def run(...)``, in any code cell, is the work for one record: the runner calls it with the
  record's fields as keyword arguments and writes what it returns (semantic variables, or dicts and
  lists of them, resolved as throughput work). A notebook without it exports to a script.
- Cells tagged ``notebook-only`` are left out: try-outs on a sample, status displays, widgets.
- ``%parrot start|connect|stop|disconnect|status`` become calls of ``parrot_nb.pipeline``; a cell's
  last bare expression (what the notebook displays) and ``display(x)`` print it, a top-level
  ``await`` waits; ``%parrot dag|stats`` (displays) and ``%load_ext parrot_nb`` are dropped. Any
  other magic, shell escape (``!``), help line (``?``) or IPython import is refused, naming the cell
  and the line.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parrot_nb.function import check_definition, names_used
from parrot_nb.magic_line import MagicLineError, cell_template, parse_semantic_line, parse_start_words
from parrot_nb.pipeline import ENTRY_POINT
from parrot_nb.template import TemplateError

PARAMETERS_TAG = "parameters"
SKIP_TAG = "notebook-only"
RUNTIME = "_pipeline"  # the name exported code calls parrot_nb.pipeline by
DISPLAY_ONLY_PARROT = ("dag", "stats")  # %parrot subcommands that only draw in the notebook


class ExportError(ValueError):
    """A notebook that cannot become a pipeline; the message names the cell and the line."""


@dataclass(frozen=True)
class _Cell:
    number: int  # 1-based position in the notebook, markdown cells included
    kind: str
    source: str
    tags: tuple[str, ...]

    def where(self, line: int | None = None) -> str:
        first = self.source.strip().splitlines()[0] if self.source.strip() else ""
        if len(first) > 60:
            first = first[:57] + "..."
        at = f"cell {self.number} ({first!r})" if first else f"cell {self.number}"
        return f"{at}, line {line}" if line is not None else at


def export_file(path: str | os.PathLike[str]) -> str:
    """The pipeline module for the notebook at ``path``."""
    import nbformat

    path = Path(path)
    try:
        nb = nbformat.read(path, as_version=4)
    except FileNotFoundError:
        raise ExportError(f"{path}: no such notebook") from None
    except Exception as exc:  # nbformat raises several kinds for a file that is not a notebook
        raise ExportError(f"{path} is not a Jupyter notebook nbformat can read: {exc}") from None
    return export_notebook(nb, source_name=path.name)


def export_notebook(nb: Any, source_name: str = "notebook.ipynb") -> str:
    """The pipeline module (Python source) for an nbformat v4 notebook."""
    cells = [
        _Cell(i, c.get("cell_type", "code"), _source(c), tuple(c.get("metadata", {}).get("tags", ())))
        for i, c in enumerate(nb.get("cells", ()), 1)
    ]
    parameter_cells = [c for c in cells if c.kind == "code" and PARAMETERS_TAG in c.tags and SKIP_TAG not in c.tags]
    if len(parameter_cells) > 1:
        raise ExportError(
            f"{parameter_cells[0].where()} and {parameter_cells[1].where()} are both tagged {PARAMETERS_TAG!r}; "
            "a pipeline has one parameters cell"
        )
    body: list[str] = []
    for cell in cells:
        if cell.kind == "markdown":
            body.append(f"# ── cell {cell.number} (markdown)\n" + _comment(cell.source))
        elif cell.kind != "code" or not cell.source.strip():
            continue
        elif SKIP_TAG in cell.tags:
            body.append(f"# ── cell {cell.number}: tagged {SKIP_TAG!r}, left out")
        elif cell.source.lstrip().startswith("%%"):
            body.append(_cell_magic(cell))
        elif PARAMETERS_TAG in cell.tags:
            body.append(_parameters(cell))
        else:
            body.append(f"# ── cell {cell.number}\n" + _code(cell))
    module = _header(source_name, body) + "\n\n".join(body) + "\n"
    try:
        compile(module, source_name, "exec")
    except SyntaxError as exc:  # each cell compiled on its own; this would be a bug of the exporter
        raise ExportError(f"the pipeline exported from {source_name} does not compile: {exc}") from None
    return module


def _header(source_name: str, body: list[str]) -> str:
    tree = ast.parse("\n\n".join(body))
    entry = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == ENTRY_POINT), None)
    if entry is not None:
        args = ast.unparse(entry.args)
        usage = (
            f"Each record is a JSON object whose fields are the arguments of {ENTRY_POINT}({args}).\n"
            "Run it over a JSONL file of records, one application per record:\n\n"
            "    parrot-nb run THIS_FILE.py --inputs records.jsonl --output results.jsonl"
        )
    else:
        usage = (
            f"The notebook defines no {ENTRY_POINT}(record fields...), so this is a script: python THIS_FILE.py"
        )
    return (
        f'"""Batch pipeline exported from {source_name} by `parrot-nb export`.\n\n{usage}\n"""\n\n'
        f"import parrot_nb\nimport parrot_nb.pipeline as {RUNTIME}\nfrom parrot_nb import SemanticFunction\n\n"
    )


def _source(cell: Any) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _comment(text: str) -> str:
    return "\n".join(f"# {line}".rstrip() for line in text.splitlines())


# --------------------------------------------------------------------------- %%semantic cells


def _cell_magic(cell: _Cell) -> str:
    first, _, body = cell.source.lstrip().partition("\n")
    magic, _, line = first[2:].partition(" ")
    if magic != "semantic":
        raise ExportError(
            f"{cell.where(1)}: the cell magic %%{magic} has no plain-Python form in a pipeline; "
            f"rewrite the cell in Python, or tag it {SKIP_TAG!r} to leave it out"
        )
    magic_line = cell.source[: len(cell.source) - len(cell.source.lstrip())].count("\n") + 1
    try:
        parsed = parse_semantic_line(line)
    except MagicLineError as exc:
        raise ExportError(f"{cell.where(magic_line)}: {exc}") from None
    template = cell_template(body)
    try:
        # Names in constraint options (json=Plan) resolve when the pipeline defines the function.
        definition, _ = check_definition(parsed.name, template, chat=parsed.chat, defaults=parsed.defaults)
    except TemplateError as exc:  # its line counts from the template's first line, the one after the magic's
        raise ExportError(f"{cell.where(magic_line + exc.line)}: TemplateError: {exc}") from None
    except ValueError as exc:  # a bad default (a flag's value) or name: it is on the magic line
        raise ExportError(f"{cell.where(magic_line)}: {exc}") from None
    options = (["chat=True"] if parsed.chat else []) + [f"{k}={v!r}" for k, v in parsed.defaults.items()]
    if names_used(definition):
        options.append("namespace=globals()")
    args = ",\n".join(f"    {a}" for a in [repr(parsed.name), _string_literal(template), *options])
    return f"# ── cell {cell.number}: {first}\n{parsed.name} = SemanticFunction.from_template(\n{args},\n)"


def _string_literal(text: str) -> str:
    """A Python literal for ``text``: a readable triple-quoted block when that is exact, else repr."""
    readable = (
        '"""' not in text
        and "\\" not in text
        and not text.endswith('"')
        and all(ch.isprintable() or ch in "\n\t" for ch in text)
    )
    literal = f'"""\\\n{text}"""' if readable else repr(text)
    assert ast.literal_eval(literal) == text
    return literal


# --------------------------------------------------------------------------- the parameters cell


def _parameters(cell: _Cell) -> str:
    code = _code(cell)
    names = []
    for node in ast.parse(code).body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else getattr(node, "target", None)
        value = getattr(node, "value", None)
        if not isinstance(node, (ast.Assign, ast.AnnAssign)) or not isinstance(target, ast.Name) or value is None:
            raise ExportError(
                f"{cell.where(node.lineno)}: a parameters cell holds only `NAME = value` lines (value a literal), "
                "which --param can override"
            )
        try:
            ast.literal_eval(value)
        except ValueError:
            raise ExportError(
                f"{cell.where(node.lineno)}: parameter {target.id!r} is not a literal (a string, number, "
                "bool, None, list or dict); compute derived values in a later cell"
            ) from None
        names.append(target.id)
    override = f"globals().update({RUNTIME}.parameters({', '.join(f'{n}={n}' for n in names)}))"
    return (
        f"# ── cell {cell.number}: parameters; `parrot-nb run --param NAME=VALUE` overrides them\n"
        f"{code}\n{override}"
    )


# --------------------------------------------------------------------------- code cells


def _code(cell: _Cell) -> str:
    """A code cell as plain Python; every line keeps its line number, so errors point into the cell."""
    lines = [_line(cell, n, line) for n, line in enumerate(cell.source.splitlines(), 1)]
    source = "\n".join(lines)
    try:
        tree = compile(source, cell.where(), "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    except SyntaxError as exc:
        raise ExportError(f"{cell.where(exc.lineno)}: SyntaxError: {exc.msg}") from None
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        if any(n.split(".")[0] == "IPython" for n in names):
            raise ExportError(
                f"{cell.where(node.lineno)}: imports IPython, which a pipeline runs without; "
                f"use plain Python (print for display), or tag the cell {SKIP_TAG!r}"
            )
    magic_lines = {n for n, (old, new) in enumerate(zip(cell.source.splitlines(), lines), 1) if old != new}
    edits = _top_level_awaits(tree) + _display_calls(tree) + _last_expression(tree, lines, magic_lines)
    return _apply(lines, edits)


_MAGIC_ASSIGNMENT = re.compile(r"^[\w.,\s\[\]()]+=\s*[%!]")
_HELP = re.compile(r"^(\?\??[\w.]+|[\w.]+\?\??)$")


def _line(cell: _Cell, number: int, line: str) -> str:
    stripped = line.lstrip()
    indent = line[: len(line) - len(stripped)]
    if stripped.startswith("%"):
        return indent + _line_magic(cell, number, stripped[1:], indent)
    if stripped.startswith("!"):
        raise ExportError(
            f"{cell.where(number)}: the shell escape {stripped!r} has no place in a pipeline; "
            f"use subprocess, or tag the cell {SKIP_TAG!r}"
        )
    if _HELP.match(stripped) or _MAGIC_ASSIGNMENT.match(stripped):
        raise ExportError(
            f"{cell.where(number)}: {stripped!r} is IPython syntax with no plain-Python form; "
            f"rewrite it, or tag the cell {SKIP_TAG!r}"
        )
    return line


def _line_magic(cell: _Cell, number: int, text: str, indent: str) -> str:
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ExportError(f"{cell.where(number)}: cannot parse %{text}: {exc}") from None
    magic, args = (words[0], words[1:]) if words else ("", [])
    dropped = "pass  # " if indent else "# "
    if magic in ("load_ext", "reload_ext") and args == ["parrot_nb"]:
        return f"{dropped}%{text}: parrot_nb is imported above"
    if magic == "parrot" and args:
        command, rest = args[0], args[1:]
        if command == "start":
            try:
                options = parse_start_words(rest)
            except MagicLineError as exc:
                raise ExportError(f"{cell.where(number)}: {exc}") from None
            defaults = parse_start_words([])
            given = ", ".join(f"{k}={v!r}" for k, v in options.items() if v != defaults[k] or k == "model")
            return f"{RUNTIME}.start({given})  # %{text}"
        if command in ("connect", "stop", "disconnect", "status") and (command == "connect" or not rest):
            if command == "connect" and len(rest) > 1:
                raise ExportError(f"{cell.where(number)}: usage: %parrot connect [CONNECTION_FILE]")
            call = {"connect": f"connect({rest[0]!r})" if rest else "connect()", "status": "show_status()"}.get(command, f"{command}()")
            return f"{RUNTIME}.{call}  # %{text}"
        if command in DISPLAY_ONLY_PARROT:
            return f"{dropped}%{text}: a notebook display, left out of the pipeline"
    raise ExportError(
        f"{cell.where(number)}: the magic %{text} has no plain-Python form in a pipeline; "
        f"remove it, or tag the cell {SKIP_TAG!r} to leave the cell out"
    )


# Source edits, each (line, column, end line, end column, replacement), lines 1-based and columns
# in characters; applied from the last to the first.
_Edit = tuple[int, int, int, int, str]


def _top_level_awaits(tree: ast.Module) -> list[_Edit]:
    """``await x`` outside an async function becomes ``_pipeline.wait(x)``."""
    edits: list[_Edit] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.AsyncFunctionDef, ast.FunctionDef, ast.Lambda, ast.ClassDef)):
                continue  # awaits inside a function belong to it
            if isinstance(child, ast.Await):
                v = child.value
                edits.append((child.lineno, child.col_offset, v.lineno, v.col_offset, f"{RUNTIME}.wait("))
                edits.append((child.end_lineno, child.end_col_offset, child.end_lineno, child.end_col_offset, ")"))  # type: ignore[arg-type]
            visit(child)

    visit(tree)
    return edits


def _display_calls(tree: ast.Module) -> list[_Edit]:
    """``display(x)`` (IPython's builtin) becomes ``_pipeline.show(x)``, unless the notebook defines ``display``."""
    defined = {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
    } | {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    if "display" in defined:
        return []
    return [
        (n.func.lineno, n.func.col_offset, n.func.end_lineno, n.func.end_col_offset, f"{RUNTIME}.show")  # type: ignore[misc]
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "display" and not n.keywords
    ]


def _last_expression(tree: ast.Module, lines: list[str], magic_lines: set[int]) -> list[_Edit]:
    """The notebook displays a cell's last bare expression (unless it ends in ';'): the pipeline prints it."""
    if not tree.body or not isinstance(tree.body[-1], ast.Expr) or tree.body[-1].lineno in magic_lines:
        return []  # a magic's translation prints what the magic printed, if anything
    node = tree.body[-1]
    value = node.value
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in ("print", "display"):
        return []
    rest = lines[node.end_lineno - 1][_column(lines, node.end_lineno, node.end_col_offset):]  # type: ignore[arg-type]
    if rest.lstrip().startswith(";"):
        return []
    return [
        (node.lineno, node.col_offset, node.lineno, node.col_offset, f"{RUNTIME}.show("),
        (node.end_lineno, node.end_col_offset, node.end_lineno, node.end_col_offset, ")"),  # type: ignore[list-item]
    ]


def _column(lines: list[str], lineno: int, byte_offset: int) -> int:
    """ast's columns count UTF-8 bytes; strings count characters."""
    return len(lines[lineno - 1].encode()[:byte_offset].decode())


def _apply(lines: list[str], edits: list[_Edit]) -> str:
    lines = list(lines)
    spans = [(ln, _column(lines, ln, c), eln, _column(lines, eln, ec), text) for ln, c, eln, ec, text in edits]
    # Last first; at one position, a replacement (wider) before an insertion, so the insertion lands in front.
    for ln, c, eln, ec, text in sorted(spans, key=lambda e: (e[0], e[1], e[2], e[3]), reverse=True):
        if ln == eln:
            lines[ln - 1] = lines[ln - 1][:c] + text + lines[ln - 1][ec:]
        else:
            lines[ln - 1 : eln] = [lines[ln - 1][:c] + text + lines[eln - 1][ec:]]
    return "\n".join(lines)
