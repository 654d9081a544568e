"""What an exported pipeline calls, and how the runner loads one.

An exported pipeline (``parrot-nb export``) is plain Python: its ``%parrot`` lines became calls of
``start``/``connect``/``stop``/``disconnect``/``show_status`` here, its display-only lines calls of
``show``, its top-level ``await`` calls of ``wait``, and its ``parameters`` cell ends in a call of
``parameters``. Run as a script (``python pipeline.py``), these behave as the magics did. Loaded
by the runner (``load``), the runner owns the engine server: ``start`` and ``connect`` use the
server the runner connected to when there is one, and ``stop`` leaves it running for the records.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parrot_nb import session
from parrot_nb.variable import SemanticVariable

ENTRY_POINT = "run"


class PipelineError(ValueError):
    """A pipeline that cannot run as asked (no entry point, an unknown parameter...); the message says what to do."""


@dataclass
class _Loading:
    """The runner's load in progress: the overrides to apply and what the pipeline declared."""

    overrides: dict[str, str]
    declared: dict[str, Any] | None = None


_loading: _Loading | None = None  # set while the runner imports a pipeline
_started = False  # this process's server was started by start() below
_connected = False  # ... or connected to by connect() below
_runner_owns_server = False  # a pipeline loaded by the runner: the server is the runner's


# --------------------------------------------------------------------------- what exported code calls


def start(**options: Any) -> None:
    """``%parrot start``: start an engine server, unless one is connected already (the runner's)."""
    global _started
    if session.current_client() is not None:
        return
    session.start(**options)
    _started = True


def connect(connection_file: str | None = None) -> None:
    """``%parrot connect``: attach to a running server, unless one is connected already."""
    global _connected
    if session.current_client() is not None:
        return
    session.connect(connection_file)
    _connected = True


def stop() -> None:
    """``%parrot stop``: stop the server that ``start`` started here (the runner stops its own at the end)."""
    global _started, _connected
    if _runner_owns_server:
        return
    if _started and session.current_client() is not None:
        session.stop()
    elif _connected:
        session.disconnect()
    _started = _connected = False


def disconnect() -> None:
    """``%parrot disconnect``: drop the connection ``connect`` or ``start`` made here, leaving the server running."""
    global _started, _connected
    if _runner_owns_server:
        return
    if _started or _connected:
        session.disconnect()
    _started = _connected = False


def show_status() -> None:
    """``%parrot status``: print the server's engines and applications."""
    print(session.format_status(session.status()))


def show(value: Any) -> None:
    """What a notebook does with a cell's last expression: request a variable and print its value, or print the value."""
    if value is None:
        return
    if isinstance(value, SemanticVariable):
        print(value.get())
    else:
        print(repr(value))


def wait(value: Any) -> Any:
    """A notebook's top-level ``await``: a variable's value, or what a coroutine returns."""
    if isinstance(value, SemanticVariable):
        return value.get()
    if inspect.isawaitable(value):
        import asyncio

        async def result() -> Any:
            return await value

        return asyncio.run(result())
    raise TypeError(f"object {type(value).__name__} can't be used in 'await' expression")


def parameters(**defaults: Any) -> dict[str, Any]:
    """The pipeline's parameters: the ``parameters`` cell's values, with the runner's ``--param`` overrides."""
    if _loading is None:
        return dict(defaults)
    if _loading.declared is not None:
        raise PipelineError("a pipeline declares its parameters once (its notebook's one cell tagged 'parameters')")
    values = dict(defaults)
    for name, text in _loading.overrides.items():
        if name in defaults:
            values[name] = convert_parameter(name, text, defaults[name])
    _loading.declared = values
    return values


def convert_parameter(name: str, text: str, default: Any) -> Any:
    """A ``--param NAME=VALUE`` value, read as the type of the parameter's default."""
    kind = type(default)
    try:
        if kind is str:
            return text
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        value = json.loads(text)
    except ValueError as exc:
        raise PipelineError(
            f"--param {name}={text}: {name} is a {kind.__name__} (default {default!r}), and {text!r} is not one ({exc})"
        ) from None
    if default is not None and type(value) is not kind:
        raise PipelineError(f"--param {name}={text}: {name} is a {kind.__name__} (default {default!r}); give it as JSON")
    return value


# --------------------------------------------------------------------------- loading a pipeline for the runner


@dataclass
class Pipeline:
    """A loaded pipeline: its module, its entry point and its parameters."""

    path: Path
    module: Any
    run: Callable[..., Any]
    parameters: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def name(self) -> str:
        return self.path.stem


def load(path: str | os.PathLike[str], overrides: dict[str, str] | None = None) -> Pipeline:
    """Import the pipeline at ``path`` with ``--param`` overrides, for the runner.

    The fingerprint covers the pipeline's source and its effective parameters: a results file
    written by another pipeline, or with other parameters, is refused by it. Its directory
    goes first on ``sys.path``, as with ``python PIPELINE.py``: modules beside it import.
    """
    global _loading, _runner_owns_server
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such pipeline file; make one with `parrot-nb export NOTEBOOK.ipynb -o {path}`")
    source = path.read_bytes()
    overrides = dict(overrides or {})
    module_name = f"parrot_pipeline_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PipelineError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    # As `python pipeline.py` would: modules beside the pipeline (its notebook's helpers) import.
    here = str(path.resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    _loading = _Loading(overrides)
    _runner_owns_server = True
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        declared = _loading.declared
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    finally:
        _loading = None
    unknown = sorted(set(overrides) - set(declared or {}))
    if unknown:
        known = ", ".join(sorted(declared)) if declared else "none: its notebook has no cell tagged 'parameters'"
        raise PipelineError(f"{path} has no parameter {', '.join(unknown)} (its parameters: {known})")
    run = getattr(module, ENTRY_POINT, None)
    if not callable(run):
        raise PipelineError(
            f"{path} defines no {ENTRY_POINT}(): a notebook made for export defines `def {ENTRY_POINT}(...)`, the "
            "work for one record (its arguments are the record's fields; it returns the record's semantic variables). "
            f"Without one, run it once as a script: python {path}"
        )
    if inspect.iscoroutinefunction(run):
        raise PipelineError(f"{path}: {ENTRY_POINT}() is async; make it a plain def that returns semantic variables")
    params = declared or {}
    digest = hashlib.sha256(source)
    digest.update(json.dumps(params, sort_keys=True, default=repr).encode())
    return Pipeline(path, module, run, params, digest.hexdigest()[:16])


def release() -> None:
    """After a run: the server belongs to whoever connects next, and the module-level state is reset."""
    global _runner_owns_server, _started, _connected
    _runner_owns_server = _started = _connected = False


def started_here() -> bool:
    """Whether the pipeline's own ``%parrot start`` started this process's server (the runner then stops it)."""
    return _started
