"""The parrot-nb engine server: manager (DAG execution, scheduling) and engine workers.

It knows no notebook: nothing here imports ``parrot_nb`` or ``widgets``.
"""

__version__ = "0.1.0"
