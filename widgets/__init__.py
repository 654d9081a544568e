"""Notebook widgets that draw the engine server's work from protocol events alone.

- ``DagWidget`` (``%parrot dag [APP]``, ``parrot_nb.show_dag``): the live DAG.
- ``StatsDashboard`` (``%parrot stats``, ``parrot_nb.show_stats``): latency, cache and engine charts.

They read events and replies of ``engine_server.protocol`` through a ``parrot_nb.Client``;
they never reach into server state. Importing this package loads neither torch nor the server.
"""

from __future__ import annotations

from widgets.dag import DagWidget, show_dag
from widgets.dashboard import StatsDashboard, show_stats

__all__ = ["DagWidget", "StatsDashboard", "show_dag", "show_stats"]
