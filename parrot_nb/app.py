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
    """Make calls inside the block part of the application ``name``.

    When the block ends, the application is closed on the server as soon as every
    variable made in it is done or dropped, so the server can free it; a later block
    with the same name opens a new application.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError("an application name must be a non-empty string")
    token = _current.set(name)
    try:
        yield name
    finally:
        _current.reset(token)
        if _current.get() != name:  # the outermost block of this name
            from parrot_nb import session

            client = session.current_client()
            if client is not None:
                client.close_app_when_settled(name)
