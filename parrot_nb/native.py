"""Native steps: Python functions that are nodes of the DAG and run on the engine server.

::

    @parrot_nb.native
    def retrieve(query: str, k: int = 3) -> list[str]:
        return index.search(query, k)

    docs = retrieve(query=expand(question))   # a SemanticVariable; nothing runs yet
    answer(question=question, docs=docs).get()

Arguments that are semantic variables become the step's inputs: the server passes
their values when their producers finish (a variable whose value is JSON, such as
another step's list, arrives parsed). Every other argument is a constant that
travels with the code. The step runs in one of the server's tool worker processes
(``--tool-workers``), so a chain LLM -> Python -> LLM needs no round trip through
the notebook. Its result is a ``SemanticVariable``: a str as is, anything else as
JSON (``.get()`` gives the object back, a downstream prompt gets the JSON text).

The code travels with cloudpickle: whatever the step uses from the notebook, or from
a module that is not installed as a package (a helper module beside the notebook, a
script, a test file), goes by value; what comes from installed packages goes by
reference and must be importable where the server runs. Limits per call: ``timeout``
seconds and ``memory_mb`` of memory (default: the server's ``--tool-timeout`` and
``--tool-memory-mb``).
"""

from __future__ import annotations

import functools
import html
import inspect
import linecache
import sys
import sysconfig
import threading
from collections.abc import Callable
from pathlib import Path
from types import CodeType, ModuleType
from typing import Any

from engine_server.protocol import ChunkSpec, FunctionSpec, InputValue, new_id
from parrot_nb import session
from parrot_nb.app import current_app_name
from parrot_nb.function import submit, variable_input
from parrot_nb.variable import SemanticVariable

#: The name of a native step's one output variable.
OUTPUT = "value"

_REGISTRY_LOCK = threading.Lock()


class NativeFunction:
    """A Python function made a DAG node by ``@native``; calling it returns a ``SemanticVariable``.

    ``fn`` itself stays available as ``.fn`` (call it directly to run it here).
    """

    def __init__(
        self, fn: Callable[..., Any], *, name: str | None = None, timeout: float | None = None,
        memory_mb: int | None = None,
    ) -> None:  # fmt: skip
        if not callable(fn):
            raise TypeError(f"@native takes a function, got {type(fn).__name__}")
        self.fn = fn
        default = getattr(fn, "__name__", "")
        self.name = name or (default if default.isidentifier() else "native_step")  # a lambda's is "<lambda>"
        if not self.name.isidentifier():
            raise ValueError(f"native step name {self.name!r} is not a Python identifier")
        if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
            raise ValueError(f"native step {self.name!r}: timeout must be a positive number of seconds, got {timeout!r}")
        if memory_mb is not None and (isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 1):
            raise ValueError(f"native step {self.name!r}: memory_mb must be a positive whole number, got {memory_mb!r}")
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.__signature__ = inspect.signature(fn)
        for p in self.__signature__.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(
                    f"native step {self.name!r}: parameter {p}: every argument must have a name "
                    "(variable ones become named inputs of the DAG node); drop *args and **kwargs"
                )
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> SemanticVariable:
        try:
            bound = self.__signature__.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}(): {exc}") from None
        bound.apply_defaults()
        client = session.require_client()
        inputs: dict[str, InputValue] = {}
        constants: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            if isinstance(value, SemanticVariable):
                inputs[name] = variable_input(self.name, name, value, client)
            elif _holds_variable(value):
                raise TypeError(
                    f"{self.name}(): argument {name!r} holds semantic variables inside a {type(value).__name__}; "
                    "pass each variable as an argument of its own"
                )
            else:
                constants[name] = value
        payload = dumps(self.fn, constants, self.name)
        chunks = [ChunkSpec("input", name=n) for n in inputs] + [ChunkSpec("output", name=OUTPUT)]
        spec = FunctionSpec(
            self.name, chunks, native=payload, native_timeout_s=float(self.timeout or 0.0),
            native_memory_mb=self.memory_mb or 0,
        )  # fmt: skip
        app_id = client.app_id(current_app_name())
        variable = SemanticVariable(client, app_id, new_id(), OUTPUT, self.name)
        submit(client, app_id, spec, inputs, [variable])
        return variable

    def __repr__(self) -> str:
        return f"<NativeFunction {self.name}{self.__signature__}>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        head = f"native step {self.name}{self.__signature__}"
        return {"text/plain": head, "text/html": f"<code>{html.escape(head)}</code>"}


def native(
    fn: Callable[..., Any] | None = None, /, *, name: str | None = None, timeout: float | None = None,
    memory_mb: int | None = None,
) -> Any:  # fmt: skip
    """Decorator: make a Python function a native step of the DAG (see this module's docs).

    ``@native``, or ``@native(timeout=5, memory_mb=512)``.
    """

    def wrap(f: Callable[..., Any]) -> NativeFunction:
        return NativeFunction(f, name=name, timeout=timeout, memory_mb=memory_mb)

    return wrap(fn) if fn is not None else wrap


def dumps(fn: Callable[..., Any], constants: dict[str, Any], name: str) -> bytes:
    """cloudpickle ``(fn, constants, source)``; every local module (not an installed package) goes by value.

    ``source["files"]`` maps file names to their lines: the file (or notebook cell) the
    function was defined in, first, then the local modules it names. Code sent by value
    loses its file name; with these a traceback on the server shows the user's code.
    """
    import cloudpickle

    every_local = _local_modules()
    source = {"files": _source_files(fn, every_local)}
    with _REGISTRY_LOCK:  # cloudpickle's by-value registry is global; calls come from several threads
        registered = set(cloudpickle.list_registry_pickle_by_value())
        local = [m for m in every_local if m.__name__ not in registered]
        for module in local:
            cloudpickle.register_pickle_by_value(module)
        try:
            return cloudpickle.dumps((fn, constants, source))
        except Exception as exc:
            raise TypeError(
                f"{name}(): the function or one of its constant arguments cannot be sent to the server "
                f"({type(exc).__name__}: {exc}); pass values that can be pickled (no open files, sockets or locks)"
            ) from None
        finally:
            for module in local:
                cloudpickle.unregister_pickle_by_value(module)


def _local_modules() -> list[ModuleType]:
    """The imported modules that are not installed packages (a helper module beside the notebook, a test file).

    The server cannot import them, so whatever the step uses from them (a function, a class, the
    step itself) travels by value. ``__main__``'s objects travel by value anyway.
    """
    found = []
    for name, module in list(sys.modules.items()):
        if name == "__main__" or not isinstance(module, ModuleType) or "." in name:
            continue  # a submodule goes with its top-level package
        path = getattr(module, "__file__", None)
        if path and not _installed_file(path, name):
            found.append(module)
    return found


def _source_files(fn: Callable[..., Any], local: list[ModuleType]) -> dict[str, list[str]]:
    """The lines of ``fn``'s own file, then of the local modules it names (a module, or a function or class of one)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return {}
    files = {code.co_filename: linecache.getlines(code.co_filename)}
    scope = dict(fn.__globals__)
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):  # names it closes over, too
        try:
            scope[name] = cell.cell_contents
        except ValueError:  # a cell not filled yet
            pass
    names, stack = set(code.co_freevars), [code]
    while stack:  # the function's names, and those of the functions and classes nested in it
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if isinstance(k, CodeType))
    tops = {m.__name__ for m in local}
    for name in names:
        value = scope.get(name)
        module_name = value.__name__ if isinstance(value, ModuleType) else getattr(value, "__module__", None)
        module = sys.modules.get(module_name) if isinstance(module_name, str) else None
        path = getattr(module, "__file__", None)
        if path and path not in files and module_name.split(".")[0] in tops:
            files[path] = linecache.getlines(path)
    return files


@functools.lru_cache(maxsize=4096)
def _installed_file(path: str, name: str) -> bool:
    """Whether the module at ``path`` comes from an installed package or the standard library (the server has it)."""
    here = Path(path).resolve()
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib", "platstdlib")}
    if any(here.is_relative_to(Path(r).resolve()) for r in roots):
        return True
    # Our own packages (an editable install) are on the server as well.
    return name in ("parrot_nb", "engine_server", "widgets", "kernels")


def _holds_variable(value: Any) -> bool:
    """Whether a list, tuple, set or dict holds a semantic variable, at any depth."""
    if isinstance(value, SemanticVariable):
        return True
    if isinstance(value, dict):
        return any(_holds_variable(v) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_holds_variable(v) for v in value)
    return False
