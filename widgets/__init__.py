"""Notebook widgets (DAG view, dashboard) that read protocol events.

They never reach into server state. The widgets themselves come with the widgets work.
"""
