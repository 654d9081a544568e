"""Applications: the unit of scheduling and of the dashboard.

By default every call made from one notebook kernel (one Python process)
belongs to one application; ``with parrot_nb.app("name"):`` groups calls
explicitly. Applications are opened on the server on first use.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_current: ContextVar[str | None] = ContextVar("parrot_nb_app", default=None)


def default_app_name() -> str:
    return f"notebook-{os.getpid()}"


def current_app_name() -> str:
    """The application that calls made here belong to."""
    return _current.get() or default_app_name()


@contextmanager
def app(name: str) -> Iterator[str]:
    """Make calls inside the block part of the application ``name``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("an application name must be a non-empty string")
    token = _current.set(name)
    try:
        yield name
    finally:
        _current.reset(token)
