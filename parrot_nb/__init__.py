"""parrot-nb: multi-call LLM applications in Jupyter, served by a DAG-aware engine server.

Light on purpose: importing this package loads neither torch nor triton.
"""

from __future__ import annotations

from typing import Any

from parrot_nb.app import app
from parrot_nb.client import Client, ServerError, ServerGoneError
from parrot_nb.function import SemanticFunction, semantic_function
from parrot_nb.native import NativeFunction, native
from parrot_nb.session import NotConnectedError, ServerStartError, connect, disconnect, start, status, stop
from parrot_nb.template import TemplateError
from parrot_nb.variable import SemanticVariable, SemanticVariableError

__version__ = "0.1.0"

__all__ = [
    "Client",
    "NativeFunction",
    "NotConnectedError",
    "SemanticFunction",
    "SemanticVariable",
    "SemanticVariableError",
    "ServerError",
    "ServerGoneError",
    "ServerStartError",
    "TemplateError",
    "app",
    "connect",
    "disconnect",
    "native",
    "semantic_function",
    "start",
    "status",
    "show_dag",
    "show_stats",
    "stop",
]


def show_dag(app: str | None = None) -> Any:
    """A live widget of the DAG of application ``app`` (every application when None); see ``widgets.DagWidget``."""
    from widgets.dag import show_dag as show

    return show(app)


def show_stats() -> Any:
    """A live dashboard of latency, prefix-cache hits and engine load; see ``widgets.StatsDashboard``."""
    from widgets.dashboard import show_stats as show

    return show()


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext parrot_nb``: register ``%%semantic`` and ``%parrot``."""
    from parrot_nb.magics import ParrotMagics

    ipython.register_magics(ParrotMagics)
